"""``ModelSpec``: one ``[[models]]`` table of the models TOML file, validated.

Metadata travels with the model (timm's ``PretrainedCfg`` is the model for this): preprocessing
(input size, mean/std, resize mode), labels, and the CAM target layer as a dotted module name.
Relative ``weights`` and ``labels`` paths are resolved against the TOML file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.errors import ConfigError

Source = Literal["builtin", "torchvision", "timm", "torchscript", "export"]
ResizeMode = Literal["stretch", "center_crop"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpec(BaseModel):
    """How to build, label and feed one model. Unset fields get per-source defaults.

    ``builtin`` models (see ``service.models.loaders.BUILTINS``) fill in their own architecture,
    class count, labels, native input size and normalisation; every field may still be set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", description="URL-safe model name")
    source: Source = "builtin"
    architecture: str | None = Field(
        None, description="builtin name, torchvision/timm architecture; unset: the name (builtin)"
    )
    weights: Path | None = Field(None, description="state_dict (torchvision/timm) or TorchScript file")
    num_classes: int | None = Field(None, ge=1, description="unset: 1000, the labels' count, or measured")
    labels: str | None = Field(None, description="'imagenet' or a text file with one label per line")
    input_size: tuple[int, int, int] | None = Field(None, description="[C, H, W]; unset: [3, 224, 224]")
    mean: tuple[float, ...] | None = Field(None, min_length=1, description="per channel, inputs in [0, 1]")
    std: tuple[float, ...] | None = Field(None, min_length=1)
    resize: ResizeMode = "stretch"
    target_layer: str | None = Field(None, description="CAM layer; unset: auto-detected")
    device: str | None = Field(None, description="auto | cpu | cuda | cuda:N; unset: the service's")

    def __init__(self, **data: Any) -> None:
        """Keyword construction; a validation failure raises ``ConfigError`` (not pydantic's error)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            detail = _describe(exc)
            raise ConfigError(f"model {data.get('name', '?')!r}: {detail}", detail=detail) from None

    @field_validator("weights", mode="after")
    @classmethod
    def _expand_weights(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("labels", mode="after")
    @classmethod
    def _expand_labels(cls, value: str | None) -> str | None:
        return value if value is None or value == "imagenet" else str(Path(value).expanduser())

    @field_validator("input_size", mode="after")
    @classmethod
    def _check_input_size(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is None:
            return value
        c, h, w = value
        if c not in (1, 3):
            raise ValueError("input_size channels must be 1 or 3")
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise ValueError("input_size height and width must be in [8, 4096]")
        return value

    @field_validator("std", mode="after")
    @classmethod
    def _check_std(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any(s <= 0 for s in value):
            raise ValueError("std values must be > 0")
        return value

    @field_validator("device", mode="after")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is None:
            return value
        v = value.strip().lower()
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _check_source_fields(self) -> ModelSpec:
        if self.source in ("torchvision", "timm") and not self.architecture:
            raise ValueError(f"source {self.source!r} needs an architecture")
        if self.source == "torchscript" and self.weights is None:
            raise ValueError("source 'torchscript' needs weights (the TorchScript file)")
        if self.source == "export" and self.weights is None:
            raise ValueError("source 'export' needs weights (the .pt2 file of torch.export.save)")
        if self.source == "builtin" and self.weights is not None:
            raise ValueError("builtin models ship their own weights; use source 'timm' for other files")
        for label, path in (("weights", self.weights), ("labels", self.labels)):
            if path is not None and path != "imagenet" and not Path(path).is_file():
                raise ValueError(f"{label} file not found: {path}")
        channels = self.input_size[0] if self.input_size else 3
        for label, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise ValueError(f"{label} needs 1 or {channels} values (got {len(values)})")
        return self


def _relative_to(base: Path, value: Any) -> Any:
    """``value`` (a path from the TOML) anchored at ``base`` when relative; other values unchanged."""
    if not isinstance(value, str) or value == "imagenet":
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def parse_spec(data: dict[str, Any], *, base_dir: Path | None = None, where: str = "model") -> ModelSpec:
    """Validate one table (relative ``weights``/``labels`` paths anchored at ``base_dir``);
    ``ConfigError`` names the table and each bad field."""
    if base_dir is not None:
        data = {k: _relative_to(base_dir, v) if k in ("weights", "labels") else v for k, v in data.items()}
    try:
        return ModelSpec.model_validate(data)  # runs ModelSpec.__init__, which raises ConfigError
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.extra.get('detail', exc.message)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_config(path: str | Path) -> list[ModelSpec]:
    """Read a models TOML file: one ``[[models]]`` table per model, at least one."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"models config not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read models config {path}: {exc}") from None
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {', '.join(unknown)} (expected [[models]] tables)")
    tables = data.get("models")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: expected one or more [[models]] tables")
    base = path.resolve().parent
    specs = [parse_spec(t, base_dir=base, where=f"{path}: models[{i}]") for i, t in enumerate(tables)]
    check_unique(specs)
    return specs


def check_unique(specs: list[ModelSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"model name {spec.name!r} is configured twice")
        seen.add(spec.name)
