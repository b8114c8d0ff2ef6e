"""The model registry: every configured model, loaded once at start-up, resident on its device.

A ``LoadedModel`` carries its metadata with it (labels, preprocessing, the CAM target layer) and
the engine's ``ModelHandle``. Lookups explain themselves: an unknown name lists the known ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from service.config import Settings
from service.errors import (
    ConfigError,
    ModelLoadError,
    ModelUnavailable,
    SaliencyError,
    TargetOutOfRange,
    UnknownLayer,
    UnknownModel,
)
from service.explainers import ExplainParams, ModelHandle, Targets, all_methods, explain
from service.explainers.layers import layer_names, supports_hooks
from service.imaging.geometry import Geometry, preprocess
from service.models.loaders import (
    BUILTIN_MEAN,
    BUILTIN_STD,
    IMAGENET_CLASSES,
    build_module,
    get_builtin,
    read_labels,
)
from service.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, check_unique, load_config

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"

# warm-up: a cheap member of each method family and of each distinct code path (gradient CAM,
# gradient-free CAM, input gradients, rectified backward, path integral, noise wrapper), tiny
# settings; Score-CAM is left out (one forward per channel: a minute on a CPU for 1280 channels)
WARMUP_PREFERENCE: tuple[str, ...] = (
    "gradcam",
    "eigencam",
    "saliency",
    "guided_backprop",
    "integrated_gradients",
    "smoothgrad",
)
WARMUP_PARAMS = ExplainParams(steps=2, samples=2, seed=0)
WARMUP_TARGETS = Targets.given([[0]])


def resolve_device(setting: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``."""
    v = setting.strip().lower()
    if v == "auto":
        v = "cuda" if torch.cuda.is_available() else "cpu"
    if v == "cpu":
        return torch.device("cpu")
    if v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting!r} was requested but CUDA is not available")
        index = torch.cuda.current_device() if v == "cuda" else int(v[5:])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {setting!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N (got {setting!r})")


# ------------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LoadedModel:
    """A resident model with everything needed to feed, explain and describe it."""

    spec: ModelSpec
    name: str
    source: str
    architecture: str
    num_classes: int
    input_size: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Literal["stretch", "center_crop"]
    labels: list[str]
    handle: ModelHandle
    device: torch.device
    ready: bool = False
    failed_methods: dict[str, str] = field(default_factory=dict)  # name → why (from warm-up)
    _methods: list[str] | None = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        return self.handle.module

    @property
    def target_layer(self) -> str | None:
        return self.handle.target_layer

    def label(self, index: int) -> str:
        """The label of class ``index``; ``TargetOutOfRange`` outside ``[0, num_classes)``."""
        if not 0 <= index < self.num_classes:
            raise TargetOutOfRange(f"class {index} is outside [0, {self.num_classes})", field="target")
        return self.labels[index]

    def methods(self) -> list[str]:
        """Names of the registered methods that work on this model, in registry order: each
        method is asked (``Method.offered``); warm-up failures are withdrawn."""
        if self._methods is None:
            self._methods = [m.name for m in all_methods() if m.offered(self.handle)]
        return [name for name in self._methods if name not in self.failed_methods]

    def info(self) -> dict[str, Any]:
        """``ModelInfo`` of the API contract."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "device": str(self.device),
            "target_layer": self.handle.target_layer,
            "methods": self.methods(),
            "ready": self.ready,
            "error": None,
        }

    def layers(self) -> list[dict[str, Any]]:
        """The layers CAM methods can use on this model (``GET /v1/models/{model}/layers``)."""
        return self.handle.layers().describe(self.handle.target_layer)

    def preprocess(self, image: Image.Image) -> tuple[Tensor, Geometry]:
        """The model's normalised (C, H, W) float32 input for ``image`` (CPU) and its geometry."""
        return preprocess(image, self.input_size, self.mean, self.std, self.resize)

    def example_input(self) -> Tensor:
        """A (1, C, H, W) grey image at the model's input size, on its device."""
        return torch.zeros(1, *self.input_size, device=self.device)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def load_model(
    spec: ModelSpec,
    device: torch.device,
    *,
    batch_memory_bytes: int | None = None,
    max_copies: int = 4,
) -> LoadedModel:
    """Build, check and place one model: eval mode, parameter gradients off, on ``device``;
    ``batch_memory_bytes`` and ``max_copies`` bound its memory (``ModelHandle``)."""
    started = time.perf_counter()
    builtin = get_builtin(spec.architecture or spec.name) if spec.source == "builtin" else None
    input_size = spec.input_size or (builtin.input_size if builtin else (3, 224, 224))
    channels = input_size[0]
    mean = _per_channel(spec.mean or (BUILTIN_MEAN if builtin else IMAGENET_MEAN), channels)
    std = _per_channel(spec.std or (BUILTIN_STD if builtin else IMAGENET_STD), channels)
    labels = read_labels(spec.labels or ("imagenet" if builtin else None))
    num_classes = spec.num_classes or (len(labels) if labels else None)
    if builtin is not None or (num_classes is None and spec.source not in ("torchscript", "export")):
        num_classes = num_classes or IMAGENET_CLASSES
    if builtin is not None and num_classes != IMAGENET_CLASSES:
        raise ConfigError(f"model {spec.name!r}: builtin models have {IMAGENET_CLASSES} classes")

    module = build_module(spec, num_classes or IMAGENET_CLASSES)
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)

    example = torch.zeros(1, *input_size, device=device)
    measured = _probe(spec, module, example)
    _probe_batch(spec, module, example)
    if num_classes is None:
        num_classes = measured
    if measured != num_classes:
        raise ConfigError(f"model {spec.name!r} outputs {measured} classes, configured for {num_classes}")
    if labels is None:
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ConfigError(f"model {spec.name!r}: {len(labels)} labels for {num_classes} classes")

    handle = ModelHandle(
        module=module,
        mean=mean,
        std=std,
        target_layer=_configured_layer(spec, module),
        name=spec.name,
        input_size=input_size,
        fresh=(lambda: build_module(spec, num_classes)) if spec.source == "export" else None,
        batch_memory_bytes=batch_memory_bytes,
        max_copies=max_copies,
    )
    _check_layers(spec, handle)
    if batch_memory_bytes is not None:
        handle.pass_bytes()  # measured now: requests read it while an explanation holds the lock
    architecture = spec.architecture or (
        spec.name if builtin else str(getattr(module, "original_name", type(module).__name__))
    )
    model = LoadedModel(
        spec=spec,
        name=spec.name,
        source=spec.source,
        architecture=architecture,
        num_classes=num_classes,
        input_size=input_size,
        mean=mean,
        std=std,
        resize=spec.resize,
        labels=labels,
        handle=handle,
        device=device,
    )
    log.info(
        "loaded model %s (%s %s, %d classes, input %s, target layer %s) on %s in %.1f s",
        spec.name,
        spec.source,
        architecture,
        num_classes,
        "×".join(map(str, input_size)),
        handle.target_layer,
        device,
        time.perf_counter() - started,
    )
    return model


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return tuple(values) * channels if len(values) == 1 else tuple(values)


def _probe(spec: ModelSpec, module: nn.Module, example: Tensor) -> int:
    """One forward pass on a blank input; the number of classes the model outputs."""
    try:
        with torch.inference_mode():
            out = module(example)
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.name!r} fails on a {tuple(example.shape)} input: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelLoadError(f"model {spec.name!r} must return logits shaped (N, classes), got {shape}")
    return int(out.shape[1])


def _probe_batch(spec: ModelSpec, module: nn.Module, example: Tensor) -> None:
    """The engine runs images and steps in batches: the model must take more than one image."""
    try:
        with torch.inference_mode():
            module(example.expand(2, *example.shape[1:]))
    except Exception as exc:
        hint = " (export it with a dynamic batch dimension)" if spec.source == "export" else ""
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ModelLoadError(f"model {spec.name!r} fails on a batch of 2 images{hint}: {first}") from None


def _configured_layer(spec: ModelSpec, module: nn.Module) -> str | None:
    """The configured CAM layer, checked to be a module of the model (``None``: measure it)."""
    if spec.target_layer is None:
        return None
    names = layer_names(module)  # not get_submodule: TorchScript modules lack it
    if spec.target_layer not in names:
        exc = UnknownLayer(spec.target_layer, names)
        raise ConfigError(f"model {spec.name!r}: target_layer: {exc.message}")
    return spec.target_layer


def _check_layers(spec: ModelSpec, handle: ModelHandle) -> None:
    """Measure the CAM layers now (at the model's input size, before any request); the configured
    layer must be one of them; without one, the measured default is the model's target layer."""
    if not supports_hooks(handle.module):
        handle.target_layer = handle.default_layer()  # by structure; CAM methods need hooks anyway
        return
    table = handle.layers()
    if spec.target_layer is not None:
        try:
            table.get(spec.target_layer)
        except UnknownLayer as exc:
            raise ConfigError(f"model {spec.name!r}: target_layer: {exc.message}") from None
        return
    handle.target_layer = table.default
    if table.default is None:
        log.warning(
            "model %s: no layer gives CAM methods a map (set target_layer in its config): no CAM methods",
            spec.name,
        )


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class FailedModel:
    """A configured model that could not be loaded or warmed up, and why (a problem, no internals)."""

    spec: ModelSpec
    code: str
    title: str
    detail: str

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def of(cls, spec: ModelSpec, exc: BaseException) -> FailedModel:
        if isinstance(exc, SaliencyError):
            return cls(spec, exc.code, exc.title, exc.message)
        return cls(spec, "model-load-error", "Model load error", f"{type(exc).__name__} (see the server log)")

    def error(self) -> ModelUnavailable:
        return ModelUnavailable(f"model {self.name!r} is unavailable: {self.detail}")

    def info(self) -> dict[str, Any]:
        """``ModelInfo`` with ``ready: false`` and the ``error`` problem."""
        spec = self.spec
        return {
            "name": spec.name,
            "source": spec.source,
            "architecture": spec.architecture or spec.name,
            "num_classes": spec.num_classes,
            "input_size": list(spec.input_size) if spec.input_size else None,
            "device": spec.device or "",
            "target_layer": spec.target_layer,
            "methods": [],
            "ready": False,
            "error": {
                "type": PROBLEM_PREFIX + self.code,
                "title": self.title,
                "status": 503,
                "detail": self.detail,
            },
        }


PROBLEM_PREFIX = "urn:saliency:problem:"


class ModelRegistry:
    """Every configured model by name, in configuration order; those that failed to load or warm
    up are kept apart (``failed``): listed, answered with 503, never taking the others down."""

    def __init__(self, models: list[LoadedModel], failed: list[FailedModel] | None = None) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, FailedModel] = {}
        self._order: list[str] = []
        entries: list[LoadedModel | FailedModel] = [*models, *(failed or [])]
        for entry in entries:
            if entry.name in self._order:
                raise ConfigError(f"model name {entry.name!r} is configured twice")
            self._order.append(entry.name)
            if isinstance(entry, FailedModel):
                self._failed[entry.name] = entry
            else:
                self._models[entry.name] = entry

    @classmethod
    def from_settings(cls, settings: Settings, only: Collection[str] | None = None) -> ModelRegistry:
        """The models of ``settings.models_config``, or the builtin default model without one. A
        model that fails to load is kept as failed; the others serve. ``only``: load just these
        (the CLI's in-process runs); ``UnknownModel`` lists the configured names otherwise."""
        if settings.models_config is not None:
            specs = load_config(settings.models_config)
        else:
            specs = [ModelSpec(name=DEFAULT_MODEL, source="builtin")]
        if only is not None:
            configured = [spec.name for spec in specs]
            for name in only:
                if name not in configured:
                    raise UnknownModel(name, configured)
            specs = [spec for spec in specs if spec.name in only]
        return cls.from_specs(
            specs,
            device=settings.device,
            isolate=True,
            batch_memory_bytes=settings.batch_memory_bytes,
            max_copies=settings.prepared_copies,
        )

    @classmethod
    def from_specs(
        cls,
        specs: list[ModelSpec],
        *,
        device: str = "auto",
        isolate: bool = False,
        batch_memory_bytes: int | None = None,
        max_copies: int = 4,
    ) -> ModelRegistry:
        """Load each spec on its own device, else on ``device``. ``isolate``: a model that fails to
        load is recorded as failed (logged) instead of failing the whole registry. The memory
        bounds go to each model's handle (``load_model``)."""
        check_unique(specs)
        if not specs:
            raise ConfigError("no models configured")
        loaded: list[LoadedModel] = []
        failed: list[FailedModel] = []
        for spec in specs:
            try:
                where = resolve_device(spec.device or device)
                loaded.append(
                    load_model(spec, where, batch_memory_bytes=batch_memory_bytes, max_copies=max_copies)
                )
            except Exception as exc:
                if not isolate:
                    raise
                log.exception("model %s failed to load; the other models serve", spec.name)
                failed.append(FailedModel.of(spec, exc))
        registry = cls(loaded, failed)
        registry._order = [spec.name for spec in specs]
        return registry

    def get(self, name: str) -> LoadedModel:
        """The model; ``UnknownModel`` (404) for an unknown name, ``ModelUnavailable`` (503) for
        one that failed to load or warm up."""
        if name in self._failed:
            raise self._failed[name].error()
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModel(name, self._order) from None

    def names(self) -> list[str]:
        return list(self._models)

    def info(self, name: str) -> dict[str, Any]:
        """``ModelInfo`` of one configured model, a failed one included (with its ``error``)."""
        if name in self._failed:
            return self._failed[name].info()
        return self.get(name).info()

    def infos(self) -> list[dict[str, Any]]:
        """``ModelInfo`` of every configured model, failed ones included, in configuration order."""
        entries = {
            **{n: m.info() for n, m in self._models.items()},
            **{n: f.info() for n, f in self._failed.items()},
        }
        return [entries[n] for n in self._order]

    def failures(self) -> dict[str, str]:
        """Why each failed model is unavailable."""
        return {n: f.detail for n, f in self._failed.items()}

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    @property
    def ready(self) -> bool:
        """Every configured model loaded and warmed up (a failed one keeps the service unready)."""
        return bool(self._models) and not self._failed and all(m.ready for m in self._models.values())

    def mark_ready(self) -> None:
        """Declare every model ready without a warm-up (``SALIENCY_WARMUP=false``)."""
        for model in self._models.values():
            model.ready = True

    def warmup(self) -> None:
        """Run one method of each family once per model on a blank input, then mark it ready.

        A method that fails here is logged and withdrawn from that model's ``methods()``.
        """
        for model in list(self._models.values()):
            started = time.perf_counter()
            try:
                plan = warmup_plan(model)
            except Exception as exc:  # the model's own probes fail: it cannot serve
                log.exception("warm-up of %s failed; the model is unavailable", model.name)
                self._fail(model, exc)
                continue
            for name in plan:
                try:
                    explain(model.handle, model.example_input(), name, WARMUP_PARAMS, targets=WARMUP_TARGETS)
                except Exception as exc:
                    log.exception("warm-up of %s on %s failed; the method is withdrawn", name, model.name)
                    model.failed_methods[name] = f"{type(exc).__name__}: {exc}"
            if plan and not model.methods():
                self._fail(model, ModelLoadError(f"every method failed its warm-up: {model.failed_methods}"))
                continue
            model.ready = True
            log.info("warmed up %s in %.1f s", model.name, time.perf_counter() - started)

    def _fail(self, model: LoadedModel, exc: BaseException) -> None:
        del self._models[model.name]
        self._failed[model.name] = FailedModel.of(model.spec, exc)


def warmup_plan(model: LoadedModel) -> list[str]:
    """The preferred methods this model supports, then the first of any family still uncovered."""
    available = {m.name: m for m in all_methods() if m.name in model.methods()}
    plan = [name for name in WARMUP_PREFERENCE if name in available]
    covered = {available[name].family for name in plan}
    for name, method in available.items():
        if method.family not in covered:
            plan.append(name)
            covered.add(method.family)
    return plan
