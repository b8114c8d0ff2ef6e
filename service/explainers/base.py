"""The engine's core: the model handle and what it offers, results, the method registry with
each method's needs, and the chunked pass runner.

Pure torch: nothing here (or anywhere under ``service.explainers``) imports the web layer. The
parameters are declared in ``params``, the targets in ``targets``.

A *method* turns a flat batch of ``(image, target)`` pairs into maps. The engine (``engine.explain``)
flattens the targets into pairs, takes the model replica's lock, runs the method and reshapes
the result to ``(N, K, ...)``. Methods never touch the caller's model: they run on the
handle's private prepared copy, and every hook they add lives inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from service import knobs
from service.errors import (
    Cancelled,
    DuplicateName,
    InvalidParameter,
    MethodNotApplicable,
    SaliencyError,
    UnknownLayer,
    UnknownMethod,
)
from service.explainers.attention_capture import capturable
from service.explainers.entry import Entry, entry_of
from service.explainers.figures import CAM_HEATMAP, Figure
from service.explainers.layers import (
    FALLBACK_ACTIVATION_RATIO,
    NCHW,
    LayerTable,
    LayerView,
    activation_bytes,
    describe_layers,
    has_scripted_parts,
    layer_before_head,
    supports_hooks,
)
from service.explainers.params import ExplainParams, params_schema
from service.explainers.precision import Precision, bf16_copy
from service.explainers.precision import autocast as precision_autocast
from service.explainers.prepare import prepare_model
from service.explainers.rectifiers import rectifier_calls
from service.explainers.targets import choose

Family = Literal["cam", "gradient", "path", "perturbation", "attention"]

#: What a method can need of a model (``Method.needs``; ``ModelHandle.offers`` says what it has):
#: ``gradients``: a backward pass to the input; ``hooks``: Python forward hooks on submodules
#: (TorchScript refuses them); ``layer``: a spatial target layer (the request's or the model's);
#: ``python_forward``: a forward pass run as Python code, so that a torch function mode sees every
#: call (the rectifier rules; TorchScript code hides its calls); ``rectifiers``: at least one
#: ReLU-family activation in the forward pass (Guided Backprop and Deconvnet define their rule
#: there; a model with only smooth activations would get a plain gradient from them);
#: ``attention``: self-attention blocks whose probabilities can be captured, over the model's
#: prefix and patch tokens, pooled by its class token or token mean (``attention_capture``).
Need = Literal["gradients", "hooks", "layer", "python_forward", "rectifiers", "attention"]

NEED_TEXT: dict[str, str] = {
    "gradients": "a backward pass to the input",
    "hooks": "forward hooks on the model's layers, which TorchScript modules refuse",
    "layer": "a spatial target layer, which this model lacks (set target_layer in its config)",
    "python_forward": "to rewrite the backward pass of ReLUs, which TorchScript code hides",
    "rectifiers": (
        "ReLU-family activations, whose backward pass its rule rewrites; this model has none (its "
        "activations are smooth, e.g. GELU or SiLU, where the rule is not defined and the result "
        "would be a plain gradient): use saliency, input_x_gradient or integrated_gradients"
    ),
    "attention": (
        "self-attention blocks whose probabilities can be captured (timm ViT/DeiT/EVA or "
        "torchvision ViT, pooled by the class token or the token mean; not windowed attention as in Swin)"
    ),
}


# ------------------------------------------------------------------------------------------------
# the model as the engine sees it
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ModelHandle:
    """A classifier plus what the engine must know about it.

    ``module`` is the shared model (eval mode, never modified by the engine). Methods run on
    ``prepared()``: a private copy made once, with parameter gradients off and, where numerically
    equivalent, speed-ups (see ``service.explainers.prepare``). ``lock`` serialises explanations
    on this replica, so concurrent callers get exactly what they would get one after the other.
    """

    module: nn.Module
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    target_layer: str | None = None
    name: str = "model"
    optimize: bool = True
    #: (C, H, W) the model takes; probes use it (a ViT accepts no other size). Unset: C × 64 × 64.
    input_size: tuple[int, int, int] | None = None
    #: makes a new instance of the model where a deep copy cannot (a ``torch.export`` program)
    fresh: Callable[[], nn.Module] | None = field(default=None, repr=False)
    #: activation memory one engine call may use, in bytes: ``batch_size`` is clamped to it
    #: (``max_batch``); ``None``: no bound (a library caller's handle)
    batch_memory_bytes: int | None = None
    #: private copies kept (one per CAM layer a request named), the least recently used dropped
    max_copies: int = 4
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _prepared: OrderedDict[tuple[str | None, Precision], nn.Module] = field(
        default_factory=OrderedDict, repr=False
    )
    _pass_bytes: int | None = field(default=None, repr=False)
    _measured: dict[str, bool] = field(default_factory=dict, repr=False)
    _layers: LayerTable | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def prepared(self, keep: str | None = None, precision: Precision = "fp32") -> nn.Module:
        """The private copy methods run on; ``keep`` names a layer whose output must stay exact.
        ``precision="bf16"``: the bf16 copy (``precision.bf16_copy``), cached beside the fp32 ones."""
        key = (keep, precision)
        with self.lock:
            if key not in self._prepared:
                # a running call holds its copy by reference: dropping it here frees it after
                while len(self._prepared) >= max(1, self.max_copies):
                    self._prepared.popitem(last=False)
                copy = prepare_model(self.module, keep=keep, optimize=self.optimize, fresh=self.fresh)
                if precision == "bf16":
                    copy = bf16_copy(copy, self.probe_input())
                self._prepared[key] = copy
            self._prepared.move_to_end(key)
            return self._prepared[key]

    def pass_bytes(self) -> int:
        """Memory one image's pass takes, measured once: the outputs of every module on a forward
        of the private copy (``activation_bytes``), twice (their gradients on the way back). A
        module that refuses hooks (TorchScript) is assumed at ``FALLBACK_ACTIVATION_RATIO`` times
        its input."""
        if self._pass_bytes is not None:
            return self._pass_bytes
        with self.lock:
            if self._pass_bytes is None:
                example = self.probe_input()
                if supports_hooks(self.module):
                    per_image = activation_bytes(self.prepared(), example) // int(example.shape[0])
                else:
                    per_image = FALLBACK_ACTIVATION_RATIO * example[0].numel() * example.element_size()
                self._pass_bytes = 2 * max(1, per_image)
            return self._pass_bytes

    def max_batch(self) -> int | None:
        """The largest ``batch_size`` whose passes fit ``batch_memory_bytes`` (at least 1). The
        registry measures ``pass_bytes`` at load, so this never waits for the replica's lock."""
        if self.batch_memory_bytes is None:
            return None
        return max(1, self.batch_memory_bytes // self.pass_bytes())

    def pixel_bounds(self, channels: int) -> tuple[Tensor, Tensor]:
        """Normalised values of pixel intensity 0 and 1, each shaped (C, 1, 1), on ``device``."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        lo = ((0.0 - mean) / std).view(-1, 1, 1)
        hi = ((1.0 - mean) / std).view(-1, 1, 1)
        return lo, hi

    def layers(self) -> LayerTable:
        """The layers CAM methods can use, their layouts and the default (``describe_layers``),
        measured once on the private copy at the model's input size. A module that refuses hooks
        (TorchScript) lists none; its default layer is found by structure."""
        if self._layers is not None:  # measured once; no lock needed to read it (an explanation holds it)
            return self._layers
        with self.lock:
            if self._layers is None:
                if supports_hooks(self.module):
                    self._layers = describe_layers(self.prepared(), self.probe_input())
                else:
                    self._layers = LayerTable([], layer_before_head(self.module))
            return self._layers

    def default_layer(self) -> str | None:
        """The configured CAM target layer, else the measured default (``None``: no CAM layer)."""
        return self.target_layer if self.target_layer is not None else self.layers().default

    def resolve_layer(self, requested: str | None) -> str:
        """The CAM target layer: the request's, else the configured one, else the measured default;
        ``UnknownLayer`` (422) unless it is one CAM methods can use."""
        name = requested or self.default_layer()
        if name is None:
            raise UnknownLayer("(default)", self.layers().names(), usable=True, reason="no default layer")
        self.layers().get(name)
        return name

    def layer_view(self, name: str) -> LayerView:
        """How ``name``'s output reads as a map (``nchw``, ``nhwc`` or ``tokens``)."""
        return self.layers().get(name).view

    def offers(self, asked: Iterable[str] = NEED_TEXT) -> frozenset[str]:
        """Which of the ``asked`` needs (``Need``) this model meets; each is measured once, when
        first asked: ``layer`` when a target layer is configured or measured (``default_layer``),
        ``rectifiers`` when a forward pass runs at least one ReLU-family activation, ``attention``
        when a forward pass of the private copy exposes its attention probabilities
        (``attention_capture.capturable``)."""
        return frozenset(need for need in asked if self._offers(need))

    def _offers(self, need: str) -> bool:
        if need == "layer":
            return self.default_layer() is not None
        known = self._measured.get(need)
        if known is not None:  # measured once; read without the lock a running explanation holds
            return known
        with self.lock:
            if need not in self._measured:
                self._measured[need] = self._measure(need)
            return self._measured[need]

    def _measure(self, need: str) -> bool:
        if need == "gradients":
            return True
        if need == "hooks":
            return supports_hooks(self.module)
        if need == "python_forward":
            return not has_scripted_parts(self.module)
        if need == "rectifiers":
            # a forward pass of the shared model under a thread-local mode: nothing is registered on it
            return self._offers("python_forward") and rectifier_calls(self.module, self.probe_input(1)) > 0
        if need == "attention":
            # measured on the private copy: capturing switches its fused attention off for a moment
            return (
                self._offers("hooks")
                and self._offers("python_forward")
                and capturable(self.prepared(), self.probe_input())
            )
        raise ValueError(f"unknown need {need!r}")

    def twin(self, module: nn.Module, name: str) -> ModelHandle:
        """A handle of ``module``, another instance of this model's architecture (a sanity
        check's randomised copy): same preprocessing, target layer and input size, the measured
        layer table shared (the layers' names, layouts and shapes do not depend on the weights),
        no optimisation (its copies are made once and dropped)."""
        other = ModelHandle(
            module=module,
            mean=self.mean,
            std=self.std,
            target_layer=self.target_layer,
            name=name,
            optimize=False,
            input_size=self.input_size,
            batch_memory_bytes=self.batch_memory_bytes,
            max_copies=1,
        )
        other._layers = self.layers() if supports_hooks(self.module) else None
        other._pass_bytes = self._pass_bytes
        return other

    def drop_copies(self) -> None:
        """Forget the private copies: the next call copies ``module`` as it is now (a sanity
        check's copy changes between its explanations; a served model never does)."""
        with self.lock:
            self._prepared.clear()

    def probe_input(self, batch: int = 2) -> Tensor:
        """A seeded random batch at the model's input size, on its device (for measuring the model)."""
        c, h, w = self.input_size or (len(self.mean) if len(self.mean) > 1 else 3, 64, 64)
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class Attribution:
    """What a method returns for a flat batch of M (image, target) pairs.

    ``maps`` may have any spatial size (CAM maps come at layer resolution); the engine upsamples
    them bilinearly to the input size. ``attributions`` is the raw per-channel attribution of
    gradient and path methods, at input resolution. ``delta`` is IG's completeness gap.
    """

    maps: Tensor
    attributions: Tensor | None = None
    delta: Tensor | None = None
    #: methods that score their own targets (``Method.picks_targets``): the logits (M, classes)
    #: of each row's clean input and the row's target, the top-1 class where it was ``PREDICTED``
    logits: Tensor | None = None
    targets: Tensor | None = None


@dataclass
class Explanation:
    """The engine's answer for N images × K targets (all tensors float32 on the CPU)."""

    method: str
    params: ExplainParams  # as resolved: seed drawn, layer filled in for CAM methods
    maps: Tensor  # (N, K, H, W)
    targets: Tensor  # (N, K) int64
    scores: Tensor  # (N, K) softmax probability of each target
    logits: Tensor  # (N, K) raw output of each target
    attributions: Tensor | None = None  # (N, K, C, H, W)
    completeness_delta: Tensor | None = None  # (N, K)
    signed: bool = False

    def select(self, rows: slice) -> Explanation:
        """The explanation of a contiguous range of images (the batcher splits with this)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return replace(
            self,
            maps=self.maps[rows],
            targets=self.targets[rows],
            scores=self.scores[rows],
            logits=self.logits[rows],
            attributions=cut(self.attributions),
            completeness_delta=cut(self.completeness_delta),
        )


# ------------------------------------------------------------------------------------------------
# the run context a method receives
# ------------------------------------------------------------------------------------------------
ProgressFn = Callable[[float], None]
CancelFn = Callable[[], bool]


@dataclass
class RunContext:
    """Per-call state handed to a method: the prepared model, parameters, progress and cancel."""

    handle: ModelHandle
    model: nn.Module
    params: ExplainParams
    total_passes: int = 1
    progress: ProgressFn | None = None
    cancel: CancelFn | None = None
    layer: str | None = None
    view: LayerView = NCHW  # how the layer's output reads as a map
    done_passes: int = 0

    @property
    def device(self) -> torch.device:
        return self.handle.device

    @property
    def batch_size(self) -> int:
        return self.params.batch_size

    @property
    def seed(self) -> int:
        assert self.params.seed is not None, "the engine resolves the seed before a method runs"
        return self.params.seed

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on the model's device when the call runs in bf16; a no-op in fp32."""
        return precision_autocast(self.device, self.params.precision)

    def entry(self) -> Entry | None:
        """The model copy's checked affine entry (``entry.entry_of``: found once per copy), or
        ``None`` when the model has none or the handle runs its model as given (``optimize=False``)."""
        if not self.handle.optimize:
            return None
        return entry_of(self.model, self.handle.probe_input, self.autocast)

    def as_map(self, t: Tensor) -> Tensor:
        """The target layer's output (or its gradient) as a map (n, C, h, w)."""
        return self.view.to_map(t)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled by the caller")

    def advance(self, passes: int) -> None:
        """Report ``passes`` finished forward/backward passes; checks for cancellation."""
        self.done_passes += passes
        if self.progress is not None:
            self.progress(min(1.0, self.done_passes / max(1, self.total_passes)))
        self.check_cancel()

    def chunks(self, total: int, size: int | None = None) -> Iterator[slice]:
        """Slices of ``range(total)`` of at most ``size`` (default ``batch_size``)."""
        step = max(1, size or self.batch_size)
        for start in range(0, total, step):
            self.check_cancel()
            yield slice(start, min(total, start + step))

    def forward(self, x: Tensor) -> Tensor:
        """The model's logits for ``x`` in float32 (under bf16 autocast for a bf16 call)."""
        with self.autocast():
            out = self.model(x)
        if not isinstance(out, Tensor):
            raise TypeError("the model must return a tensor of logits")
        return out.float()

    def input_gradients(self, x: Tensor, targets: Tensor, *, clean: bool = False) -> Gradient:
        """∂ logit[target] / ∂ x for each row, with the rows' logits. One forward+backward.

        Only the input requires grad, so no parameter gradient is ever computed. ``clean``: these
        rows are the engine's input rows, so their ``PREDICTED`` targets become their top-1
        class and explicit ones are range-checked (``targets.choose``).
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(x)
            if clean:
                targets = choose(logits, targets)
            selected = logits.gather(1, targets.view(-1, 1)).squeeze(1)
            (grad,) = torch.autograd.grad(selected.sum(), x)
        return Gradient(grad=grad.float(), logits=logits.detach(), targets=targets)


@dataclass
class Gradient:
    """One forward + backward over a chunk of rows."""

    grad: Tensor  # ∂ logit[target] / ∂ (the input, or a layer's activations), float32
    logits: Tensor  # (n, classes) float32, detached
    targets: Tensor  # (n,) the rows' targets (chosen, for clean rows)
    act: Tensor | None = None  # the layer's activations, for layer gradients


# ------------------------------------------------------------------------------------------------
# the method registry
# ------------------------------------------------------------------------------------------------
class Method(ABC):
    """One attribution method. Subclasses set the class attributes and implement ``attribute``."""

    name: ClassVar[str]
    family: ClassVar[Family]
    description: ClassVar[str]
    paper: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset({"batch_size", "precision"})
    signed: ClassVar[bool] = False
    #: what the method needs of a model (see ``Need``); ``applicable`` compares it with what the
    #: model offers, then asks ``check`` for anything method-specific
    needs: ClassVar[frozenset[Need]] = frozenset({"gradients"})
    #: True when ``attribute`` runs every row's clean input through the model exactly once before
    #: it needs the row's target (``input_gradients`` / ``layer_gradients`` with ``clean=True``,
    #: IG's endpoint pass), chooses ``PREDICTED`` targets there (``targets.choose``) and returns
    #: those logits and targets in its ``Attribution``: the engine then runs no scoring pass of
    #: its own for top-1 or explicit targets.
    picks_targets: ClassVar[bool] = False
    #: how its maps are shown unless a request says otherwise: the rendering parameters' defaults,
    #: as its paper's figures show them (a preset of ``service.explainers.figures``)
    rendering: ClassVar[Figure] = CAM_HEATMAP
    #: whether the sanity check (Adebayo et al. 2018, cascading randomisation) applies: the map
    #: is computed from the model's weights, so it should change as they are randomised. A method
    #: that does not read the weights (an edge detector) declares ``False``: it would fail it.
    sanity_check: ClassVar[bool] = True
    #: its own defaults of parameters declared with a per-method default (``method_default``
    #: knobs it ``uses``), as its paper or the authors' code sets them: they fill what a request
    #: leaves unset (``ExplainParams.for_method``)
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: its own upper bounds of parameters it ``uses``, tighter than the declared ones (which
    #: allow what the most demanding method needs): ``check_limits`` refuses more
    limits: ClassVar[Mapping[str, int | float]] = {}

    @property
    def needs_layer(self) -> bool:
        return "layer" in self.needs

    def applicable(self, handle: ModelHandle, params: ExplainParams) -> None:
        """``MethodNotApplicable`` unless this model offers what the method needs (``require``)
        and ``check`` accepts it: the question the model registry asks."""
        self.require(handle, params)
        self.check(handle, params)

    def require(self, handle: ModelHandle, params: ExplainParams) -> None:
        """``MethodNotApplicable`` naming what the model lacks of ``needs`` (a layer named in
        ``params`` stands in for the model's own)."""
        asked = self.needs - _named(params)
        missing = sorted(asked - handle.offers(asked))
        if missing:
            raise MethodNotApplicable(
                f"{self.name} needs {'; and '.join(NEED_TEXT[n] for n in missing)}: it cannot explain "
                f"model {handle.name!r}",
                field="method",
            )

    def offered(self, handle: ModelHandle) -> bool:
        """Whether the method works on this model with its default parameters (never raises a
        domain error: for lists of applicable methods)."""
        try:
            self.applicable(handle, ExplainParams(layer=handle.target_layer))
        except (SaliencyError, RuntimeError, TypeError, ValueError):
            return False
        return True

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:  # noqa: B027
        """Method-specific: raise ``MethodNotApplicable`` if this model cannot be explained this way."""

    def passes(self, params: ExplainParams) -> int:
        """Forward/backward passes per (image, target) pair, before the model is seen: the nominal
        count progress starts from."""
        return 1

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        """Passes per (image, target) pair on this model (``params`` resolved: the layer set): the
        count the synchronous budget and the job caps use. Methods whose passes depend on the
        model (channels of the layer, attention blocks) override it."""
        return self.passes(params)

    @abstractmethod
    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        """Attribute ``targets[i]`` for image ``x[i]``; ``x`` is (M, C, H, W) on the model's device."""

    def check_limits(self, params: ExplainParams) -> None:
        """``InvalidParameter`` naming the first parameter above this method's own bound."""
        for name, top in self.limits.items():
            value = getattr(params, name)
            if value is not None and value > top:
                raise InvalidParameter(f"{self.name}: {name} must be ≤ {top} (got {value})", field=name)

    def parameters_schema(self) -> dict[str, Any]:
        return params_schema(self.uses, self.defaults, self.limits)


def _named(params: ExplainParams) -> frozenset[str]:
    """What a request supplies itself: a layer it names stands in for the model's own."""
    return frozenset({"layer"}) if params.layer else frozenset()


_REGISTRY: dict[str, Method] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise DuplicateName(f"method {cls.name!r} is registered twice")
    wrong = sorted(set(cls.defaults) - (knobs.method_default_names(ExplainParams) & cls.uses))
    if wrong:
        raise TypeError(
            f"{cls.name}: defaults of parameters it does not use or without a per-method default: {wrong}"
        )
    ExplainParams(**cls.defaults)  # valid values (InvalidParameter otherwise)
    if not set(cls.limits) <= cls.uses:
        raise TypeError(
            f"{cls.name}: limits of parameters it does not use: {sorted(set(cls.limits) - cls.uses)}"
        )
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(name, _REGISTRY) from None


def all_methods() -> list[Method]:
    _load_all()
    return list(_REGISTRY.values())


def method_names() -> list[str]:
    return [m.name for m in all_methods()]


def _load_all() -> None:
    import service.explainers  # noqa: F401  (importing the package registers every method)
