"""The engine's core: parameters, results, the method registry and the chunked pass runner.

Pure torch: nothing here (or anywhere under ``service.explainers``) imports the web layer.

A *method* turns a flat batch of ``(image, target)`` pairs into maps. The engine (``engine.explain``)
resolves targets, flattens top-k into pairs, takes the model replica's lock, runs the method and
reshapes the result to ``(N, K, ...)``. Methods never touch the caller's model: they run on the
handle's private prepared copy, and every hook they add lives inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from service.errors import DuplicateName, InvalidParameter, TargetOutOfRange, UnknownMethod

Family = Literal["cam", "gradient", "path", "perturbation"]
Baseline = Literal["black", "white", "mean", "blur", "uniform"]
Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]

BASELINES: tuple[str, ...] = get_args(Baseline)
RULES: tuple[str, ...] = get_args(Rule)

MAX_STEPS = 512
MAX_SAMPLES = 256


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExplainParams:
    """Every knob a method may read. Each method declares the subset it uses (``Method.uses``).

    ``batch_size`` is a memory knob only: results never depend on it, nor on which other images
    share a batch (noise is drawn per image from ``seed``).
    """

    layer: str | None = field(default=None, metadata={"doc": "dotted module name (CAM methods)"})
    steps: int = field(default=32, metadata={"doc": "integration steps", "min": 1, "max": MAX_STEPS})
    samples: int = field(default=16, metadata={"doc": "noisy samples", "min": 1, "max": MAX_SAMPLES})
    noise_level: float = field(
        default=0.15, metadata={"doc": "σ as a fraction of the input's value range", "min": 0.0, "max": 1.0}
    )
    baseline: Baseline = field(default="black", metadata={"doc": "IG baseline"})
    rule: Rule = field(default="gausslegendre", metadata={"doc": "IG integration rule"})
    seed: int | None = field(default=None, metadata={"doc": "noise seed; same seed, same result"})
    batch_size: int = field(
        default=32, metadata={"doc": "passes run at once (memory knob)", "min": 1, "max": 1024}
    )
    autocast: bool = field(default=False, metadata={"doc": "bf16 autocast (CUDA only)"})

    def validate(self) -> ExplainParams:
        """Raise ``InvalidParameter`` naming the field when a value is out of its range."""
        for f in fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                if lo is not None and value < lo:
                    raise InvalidParameter(f"{f.name} must be ≥ {lo} (got {value})", field=f.name)
                if hi is not None and value > hi:
                    raise InvalidParameter(f"{f.name} must be ≤ {hi} (got {value})", field=f.name)
        if self.baseline not in BASELINES:
            raise InvalidParameter(f"baseline must be one of {', '.join(BASELINES)}", field="baseline")
        if self.rule not in RULES:
            raise InvalidParameter(f"rule must be one of {', '.join(RULES)}", field="rule")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidParameter("seed must be in [0, 2**63)", field="seed")
        return self

    def with_(self, **changes: Any) -> ExplainParams:
        return replace(self, **changes)


def params_schema(names: frozenset[str]) -> dict[str, Any]:
    """JSON Schema of the named ``ExplainParams`` fields (for ``GET /v1/methods``)."""
    props: dict[str, Any] = {}
    defaults = ExplainParams()
    for f in fields(ExplainParams):
        if f.name not in names:
            continue
        default = getattr(defaults, f.name)
        prop: dict[str, Any] = {"description": f.metadata.get("doc", f.name), "default": default}
        if f.name in {"baseline", "rule"}:
            prop.update(type="string", enum=list(BASELINES if f.name == "baseline" else RULES))
        elif f.name in {"layer"}:
            prop.update(type=["string", "null"])
        elif f.name == "seed":
            prop.update(type=["integer", "null"], minimum=0)
        elif isinstance(default, bool):
            prop.update(type="boolean")
        elif isinstance(default, int):
            prop.update(type="integer")
        else:
            prop.update(type="number")
        for key, js in (("min", "minimum"), ("max", "maximum")):
            if key in f.metadata:
                prop[js] = f.metadata[key]
        props[f.name] = prop
    return {"type": "object", "properties": props}


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
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _prepared: dict[str | None, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def prepared(self, keep: str | None = None) -> nn.Module:
        """The private copy methods run on; ``keep`` names a layer whose output must stay exact."""
        from service.explainers.prepare import prepare_model

        with self.lock:
            if keep not in self._prepared:
                self._prepared[keep] = prepare_model(self.module, keep=keep, optimize=self.optimize)
            return self._prepared[keep]

    def pixel_bounds(self, channels: int) -> tuple[Tensor, Tensor]:
        """Normalised values of pixel intensity 0 and 1, each shaped (C, 1, 1), on ``device``."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        lo = ((0.0 - mean) / std).view(-1, 1, 1)
        hi = ((1.0 - mean) / std).view(-1, 1, 1)
        return lo, hi

    def resolve_layer(self, requested: str | None) -> str:
        """The CAM target layer: the request's, else the configured one, else auto-detected."""
        from service.explainers.layers import find_target_layer, get_layer

        name = requested or self.target_layer
        if name is None:
            name = find_target_layer(self.module, self.input_example())
            self.target_layer = name
        get_layer(self.module, name)  # raises UnknownLayer listing the valid names
        return name

    def input_example(self, size: int = 64) -> Tensor:
        return torch.zeros(1, len(self.mean) if len(self.mean) > 1 else 3, size, size, device=self.device)


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


def check_target_range(targets: Tensor, num_classes: int) -> None:
    """``TargetOutOfRange`` unless every class index is in ``[0, num_classes)``."""
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        raise TargetOutOfRange(f"target {int(targets[bad][0])} is outside [0, {num_classes})", field="target")


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
    done_passes: int = 0
    #: Set by the engine when the method's own clean pass supplies the targets' scores
    #: (``Method.picks_targets``): the (logits, targets) of each chunk, in row order.
    picked: list[tuple[Tensor, Tensor]] | None = None
    #: With ``picked``: True when that pass also chooses each row's target (its top-1 class).
    pick_top1: bool = False

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
        """bf16 autocast when asked for and on CUDA; a no-op otherwise."""
        if self.params.autocast and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def check_cancel(self) -> None:
        from service.errors import Cancelled

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
        """The model's logits for ``x`` in float32 (under autocast if enabled)."""
        with self.autocast():
            out = self.model(x)
        if not isinstance(out, Tensor):
            raise TypeError("the model must return a tensor of logits")
        return out.float()

    def pick(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The targets of these clean rows, recorded with their logits when the engine asked.

        Outside ``picked`` mode: ``targets`` as given. In it: each row's top-1 class when
        ``pick_top1``, else ``targets`` checked against the class count (``TargetOutOfRange``);
        either way (logits, targets) is appended to ``picked`` for the engine's scores. This is how
        a method's first pass replaces the separate forward the engine would otherwise run.
        """
        if self.picked is None:
            return targets
        logits = logits.detach().float()
        if self.pick_top1:
            targets = logits.argmax(dim=1)
        else:
            check_target_range(targets, logits.shape[1])
        self.picked.append((logits, targets))
        return targets

    def input_gradients(self, x: Tensor, targets: Tensor, *, clean: bool = False) -> tuple[Tensor, Tensor]:
        """∂ logit[target] / ∂ x for each row, and the rows' target logits. One forward+backward.

        Only the input requires grad, so no parameter gradient is ever computed. ``clean``: these
        rows are the engine's input rows, so their logits go through ``pick`` (which may choose
        the targets).
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(x)
            if clean:
                targets = self.pick(logits, targets)
            selected = logits.gather(1, targets.view(-1, 1)).squeeze(1)
            (grad,) = torch.autograd.grad(selected.sum(), x)
        return grad.float(), selected.detach()


# ------------------------------------------------------------------------------------------------
# the method registry
# ------------------------------------------------------------------------------------------------
class Method(ABC):
    """One attribution method. Subclasses set the class attributes and implement ``attribute``."""

    name: ClassVar[str]
    family: ClassVar[Family]
    description: ClassVar[str]
    paper: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset({"batch_size", "autocast"})
    signed: ClassVar[bool] = False
    needs_layer: ClassVar[bool] = False
    #: True when ``attribute`` passes every row's clean-input logits through ``RunContext.pick``
    #: exactly once, in row order, before it needs the row's target (``input_gradients`` and
    #: ``layer_gradients`` with ``clean=True``, IG's endpoint pass): the engine then takes the
    #: scores, and the top-1 targets, from that pass instead of running a forward pass of its own.
    picks_targets: ClassVar[bool] = False

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:  # noqa: B027
        """Raise ``MethodNotApplicable`` if this model cannot be explained this way."""

    def passes(self, params: ExplainParams) -> int:
        """Forward/backward passes per (image, target) pair: the cost used for limits and progress."""
        return 1

    @abstractmethod
    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        """Attribute ``targets[i]`` for image ``x[i]``; ``x`` is (M, C, H, W) on the model's device."""

    def parameters_schema(self) -> dict[str, Any]:
        return params_schema(self.uses)


_REGISTRY: dict[str, Method] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise DuplicateName(f"method {cls.name!r} is registered twice")
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


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter's gradient off.

    A TorchScript module cannot be deep-copied safely (its parameters come back as non-leaf
    tensors) and takes no Python hooks anyway, so it is used as it is: the engine only asks it for
    input gradients (``torch.autograd.grad`` with respect to the input, which neither computes
    nor stores parameter gradients) and never changes it.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return module
    clone = copy.deepcopy(module)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone
