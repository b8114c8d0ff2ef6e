"""The private, attribution-ready copy of a model.

``prepare_model`` never modifies the model it is given: it deep-copies it, switches the copy to
eval mode and turns every parameter's gradient off, so explanation backward passes compute input
(or activation) gradients only. With ``optimize`` it then makes the copy cheaper to run, without
changing what it computes beyond float32 rounding and without changing its module tree:

* **BatchNorm folding.** An eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` is an
  affine map per channel, so it folds into the convolution's weight and bias (Ioffe & Szegedy
  2015; the standard inference rewrite). The BatchNorm's place in the tree is taken by an identity
  (``FoldedBatchNorm``) or, for timm's ``BatchNormAct2d``, by a module that keeps its ``drop`` and
  ``act`` children (``FoldedBatchNormAct``). Every dotted name stays resolvable and every container
  still runs its own ``forward``, so hooks on ``layer4`` or ``features`` fire as before (an fx
  rewrite would call the leaves directly and silently skip them).
* **channels_last** weights and buffers (so every convolution runs on NHWC kernels; the input
  may stay NCHW, the first convolution converts). Measured on this project's shared 2-core CPU
  (torch 2.14, oneDNN, 2 threads; medians of 3–5 interleaved rounds), batch-32 224×224
  forward + input-gradient, as a fraction of the eager model's time:

  ======================  ===========  =============  ======================
  model                   BN folded    channels_last  folded + channels_last
  ======================  ===========  =============  ======================
  resnet18                0.97×        0.92×          0.80×
  tf_efficientnet_lite0   0.59×        0.73×          0.45×
  ======================  ===========  =============  ======================

  channels_last helps on the CPU as it does with cuDNN on CUDA, so it is used on both whenever
  the model has a convolution.

* **TF "SAME" convolutions without a padded copy.** timm's ``Conv2dSame`` (the layer of
  TensorFlow-ported weights: the default EfficientNet-Lite0, the ``tf_`` models) pads its input on
  every call: a full copy of a high-resolution activation on the way forward, a zero-filled one
  and a slice on the way back (on EfficientNet-Lite0 at 224², ~15 % of a forward + input-gradient
  pass, by ``torch.profiler``). Its padding at stride 2 on an even side puts one more row (column)
  after the input than before; that is the same as a symmetric padding by the larger amount with a
  kernel one tap wider whose first tap is zero, so it runs as a plain convolution
  (``SamePadding``, the module's own ``forward`` replaced on the instance: class, tree and hooks
  unchanged), in float32 (in bf16 the widened depthwise kernels' backward is slower than the
  copy). Any other padding (a dilated kernel) keeps the copy. On the default model, IG-32's bare
  passes through the prepared copy took 0.59× the eager model's time before, 0.56× after
  (``benchmarks/methods.py --model default --methods integrated_gradients --repeats 5``, the
  floor ÷ the eager floor, run at both revisions).

Conv→BN pairs are found without tracing: one forward pass on a random input, with hooks that
record each convolution's output tensor and each BatchNorm's input tensor. A pair folds only when
the BatchNorm's input *is* the convolution's output (the same object), nothing else consumed that
tensor (checked with a ``TorchFunctionMode`` that sees every torch call), each module ran once,
the convolution's weight is not shared and neither module carries hooks or parametrizations, and
the ``keep`` layer's output is not that tensor (hooking a folded convolution would see the
BatchNorm's output). Finally the optimised copy's logits and input gradients are compared with the
unoptimised copy's on the same random input (``_equivalent``); if they differ beyond rounding, the plain
copy is returned instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

#: Input sizes tried for the probing forward pass (some models only accept their native size).
PROBE_SIZES = (64, 224)
#: Tolerance of the equivalence check, relative to the largest magnitude of the compared tensor.
RTOL = 1e-4
#: Tolerance of the input-gradient check, in relative L2 norm (see ``_equivalent``).
GRAD_RTOL = 5e-2

__all__ = [
    "FoldedBatchNorm",
    "FoldedBatchNormAct",
    "SamePadding",
    "close",
    "fold_pairs",
    "prepare_model",
    "unpad_same_convs",
]


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter's gradient off.

    A TorchScript module cannot be deep-copied safely (its parameters come back as non-leaf
    tensors) and takes no Python hooks anyway, so it is used as it is: the engine only asks it for
    input gradients (``torch.autograd.grad`` with respect to the input, which neither computes
    nor stores parameter gradients) and never changes it.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return module
    return _owned(copy.deepcopy(module))


def _owned(module: nn.Module) -> nn.Module:
    """A module of our own, in eval mode with every parameter's gradient off."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def prepare_model(
    module: nn.Module,
    *,
    keep: str | None = None,
    optimize: bool = True,
    fresh: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """A private copy of ``module`` for attribution; ``keep`` names a layer whose output must stay exact.

    The given module is never modified (not its parameters, flags, hooks or children). Without
    ``optimize`` the copy is only switched to eval mode with parameter gradients off. A TorchScript
    module is returned as it is (``private_copy``): it can neither be copied safely nor hooked.
    ``fresh`` makes a new instance of the model where a deep copy cannot (a ``torch.export``
    program is loaded again from its file).
    """
    plain = _owned(fresh().to(_device_of(module))) if fresh is not None else private_copy(module)
    if not optimize or plain is module or isinstance(plain, torch.jit.ScriptModule):
        return plain  # TorchScript is used as it is (see ``private_copy``): nothing to rewrite
    try:
        return _optimized(plain, keep)
    except Exception:  # an optimisation must never make a model unusable
        log.warning("model optimisation failed; using the plain copy", exc_info=True)
        return plain


# ------------------------------------------------------------------------------------------------
# replacements that keep the module tree
# ------------------------------------------------------------------------------------------------
class FoldedBatchNorm(nn.Identity):
    """Stands where a ``BatchNorm2d`` was after it was folded into the preceding convolution."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded"


class FoldedBatchNormAct(nn.Module):
    """Stands where timm's ``BatchNormAct2d`` was: its BatchNorm folded, its ``drop`` and ``act`` kept."""

    def __init__(self, num_features: int, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.num_features = num_features
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(self.drop(x))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded"


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
def _optimized(plain: nn.Module, keep: str | None) -> nn.Module:
    device = _device_of(plain)
    probe = _probe(plain, keep)
    if probe is None:
        return plain
    fast = copy.deepcopy(plain)
    folded = fold_pairs(fast, probe.pairs)
    unpadded = unpad_same_convs(fast)
    channels_last = device.type in {"cpu", "cuda"} and _has_conv(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if not folded and not channels_last and not unpadded:
        return plain
    if not _equivalent(plain, fast, probe.x, float64=device.type != "cpu"):
        log.warning("optimised copy differs from the model beyond rounding; using the plain copy")
        return plain
    log.debug(
        "prepared model: %d BatchNorms folded, %d SAME convolutions unpadded, channels_last=%s",
        len(folded),
        unpadded,
        channels_last,
    )
    return fast


# ------------------------------------------------------------------------------------------------
# TF "SAME" padding without a padded copy
# ------------------------------------------------------------------------------------------------
def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one side of ``size``, split (before, after) as timm's
    ``pad_same`` splits its ``get_same_padding``."""
    from timm.layers.padding import get_same_padding

    total = int(get_same_padding(size, kernel, stride, dilation))
    return total // 2, total - total // 2


class SamePadding:
    """The ``forward`` of a ``Conv2dSame``, padding inside the convolution: symmetric padding
    runs as is; one more row/column after than before runs as a symmetric padding by the larger
    amount with a zero tap prepended to the kernel (out[i] = Σ_k w[k]·x[s·i − before + k] either
    way); anything else pads a copy as timm does: dilation, and bf16 arithmetic (oneDNN's bf16
    depthwise backward with the widened, even kernel is ~3× slower than the copy it saves:
    EfficientNet-Lite0's 6×6 at 56², 220 ms against 80 ms for a batch of 32, on AVX512-BF16).
    Picklable and deep-copyable."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: Tensor) -> Tensor:
        c = self.conv
        (kh, kw), (sh, sw), (dh, dw) = c.kernel_size, c.stride, c.dilation
        bh, ah = _same_padding(int(x.shape[-2]), kh, sh, dh)
        bw, aw = _same_padding(int(x.shape[-1]), kw, sw, dw)
        fp32 = c.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        if not fp32 or (dh, dw) != (1, 1) or ah - bh not in (0, 1) or aw - bw not in (0, 1):
            padded = nn.functional.pad(x, (bw, aw, bh, ah))
            return nn.functional.conv2d(padded, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
        weight = c.weight
        if ah > bh or aw > bw:
            weight = nn.functional.pad(weight, (aw - bw, 0, ah - bh, 0))
        return nn.functional.conv2d(x, weight, c.bias, c.stride, (ah, aw), c.dilation, c.groups)


def unpad_same_convs(model: nn.Module) -> int:
    """Give every timm ``Conv2dSame`` (zero padding of its own) of ``model`` the ``SamePadding``
    forward; returns how many."""
    timm = sys.modules.get("timm")  # not imported: the model has no timm layer
    if timm is None:
        return 0
    count = 0
    for module in model.modules():
        if (
            isinstance(module, timm.layers.Conv2dSame)
            and module.padding == (0, 0)
            and module.padding_mode == "zeros"
            and "forward" not in vars(module)
        ):
            module.forward = SamePadding(module)
            count += 1
    return count


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _random_input(model: nn.Module, size: int) -> Tensor:
    """A seeded (1, C, size, size) normal input; the global RNG is left alone."""
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, size, size, generator=g).to(_device_of(model))


# ------------------------------------------------------------------------------------------------
# finding conv→BN pairs
# ------------------------------------------------------------------------------------------------
@dataclass
class _Probe:
    x: Tensor
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)


def _bn_kind(m: nn.Module) -> str | None:
    """'bn' for a plain eval BatchNorm2d, 'bnact' for timm's BatchNormAct2d, else None."""
    if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None or m.running_var is None:
        return None
    if type(m).forward is nn.BatchNorm2d.forward:
        return "bn"
    with contextlib.suppress(ImportError):
        from timm.layers.norm_act import BatchNormAct2d

        if isinstance(m, BatchNormAct2d) and type(m).forward is BatchNormAct2d.forward:
            return "bnact"
    return None


def _linear_conv(m: nn.Module) -> bool:
    """A Conv2d whose output is linear in ``weight`` and ``bias`` as stored (no weight standardisation)."""
    if not isinstance(m, nn.Conv2d):
        return False
    if type(m).forward is nn.Conv2d.forward:
        return True
    with contextlib.suppress(ImportError):
        from timm.layers.conv2d_same import Conv2dSame

        return type(m) is Conv2dSame
    return False


def _hooked(m: nn.Module) -> bool:
    if torch.nn.utils.parametrize.is_parametrized(m):
        return True
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, a, None) for a in attrs)


class _Consumers(TorchFunctionMode):
    """Counts, per watched tensor, the torch calls that read it outside the allowed modules."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, int] = {}  # id(tensor) -> calls outside BatchNorms
        self.inside = 0  # depth of BatchNorm forwards currently running

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.inside == 0 and self.watched:
            for a in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(a, Tensor) and id(a) in self.watched:
                    self.watched[id(a)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _removing(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, keep: str | None) -> _Probe | None:
    """Run one forward pass recording tensors; return the foldable (conv, BN) pairs."""
    convs = {n: m for n, m in model.named_modules() if _linear_conv(m) and not _hooked(m)}
    bns = {n: m for n, m in model.named_modules() if _bn_kind(m) is not None and not _hooked(m)}
    if not convs or not bns:
        return None
    keep_module = model.get_submodule(keep) if keep else None
    conv_out: dict[str, list[Tensor]] = {n: [] for n in convs}
    bn_in: dict[str, list[Tensor]] = {n: [] for n in bns}
    kept: list[Tensor] = []
    mode = _Consumers()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_conv(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor):
                conv_out[name].append(out)  # the reference keeps the id unique
                mode.watched[id(out)] = 0

        return hook

    def on_bn_enter(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[object, ...]) -> None:
            mode.inside += 1
            if inputs and isinstance(inputs[0], Tensor):
                bn_in[name].append(inputs[0])

        return hook

    def on_bn_exit(_m: nn.Module, _i: object, _o: object) -> None:
        mode.inside -= 1

    def on_keep(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            kept.append(out)

    x = None
    with _removing(handles):
        for n, m in convs.items():
            handles.append(m.register_forward_hook(on_conv(n)))
        for n, m in bns.items():
            handles.append(m.register_forward_pre_hook(on_bn_enter(n)))
            handles.append(m.register_forward_hook(on_bn_exit))
        if keep_module is not None:
            handles.append(keep_module.register_forward_hook(on_keep))
        for size in PROBE_SIZES:
            x = _random_input(model, size)
            for v in (*conv_out.values(), *bn_in.values(), kept):
                v.clear()
            mode.watched.clear()
            mode.inside = 0
            try:
                with torch.no_grad(), mode:
                    model(x)
                break
            except Exception:
                x = None
    if x is None:
        return None

    shared = _shared_parameters(model)
    kept_ids = {id(t) for t in kept}
    out_owner = {id(ts[0]): n for n, ts in conv_out.items() if len(ts) == 1}
    probe = _Probe(x=x)
    for bn_name, inputs in bn_in.items():
        if len(inputs) != 1:
            continue
        t = inputs[0]
        conv_name = out_owner.get(id(t))
        if conv_name is None or mode.watched.get(id(t), 1) != 0 or id(t) in kept_ids:
            continue
        conv, bn = convs[conv_name], bns[bn_name]
        if id(conv.weight) in shared or (conv.bias is not None and id(conv.bias) in shared):
            continue
        if conv.out_channels != bn.num_features:
            continue
        probe.pairs.append((conv_name, bn_name))
    return probe


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


# ------------------------------------------------------------------------------------------------
# folding
# ------------------------------------------------------------------------------------------------
def fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold each named BatchNorm into its named convolution, in place on ``model`` (a private copy).

    The caller guarantees the BatchNorm's only input is the convolution's output. Returns the pairs
    folded.
    """
    done = []
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        kind = _bn_kind(bn)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or kind is None:
            continue
        _fold_into(conv, bn)
        replacement: nn.Module = (
            FoldedBatchNormAct(bn.num_features, bn.get_submodule("drop"), bn.get_submodule("act"))
            if kind == "bnact"
            else FoldedBatchNorm(bn.num_features)
        )
        _set_submodule(model, bn_name, replacement.train(bn.training))
        done.append((conv_name, bn_name))
    return done


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv ← bn ∘ conv: W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β, computed in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    w = conv.weight
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    shape = (-1,) + (1,) * (w.dim() - 1)
    conv.weight = nn.Parameter((w.double() * scale.view(shape)).to(w.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------------------------------
# checking
# ------------------------------------------------------------------------------------------------
def _equivalent(reference: nn.Module, candidate: nn.Module, x: Tensor, *, float64: bool = False) -> bool:
    """Same logits and same input gradient (of the logits' sum), up to float32 rounding.

    Logits are compared element-wise: max error ≤ ``RTOL`` × their largest magnitude. A wrong fold
    (a missed consumer, a convolution that is not linear in its weight) shows there at full scale.
    The gradient check only guards against a backward that is wrong, not one rounded differently:
    gradients are discontinuous at every ReLU/ReLU6 kink and max-pool tie, and in a randomly
    initialised network a rounding-level change can flip one deep unit whose gradient spreads over
    much of the input (seen: 0.4 % relative L2 on tf_efficientnet_lite0 with random BatchNorm
    statistics, vanishing when the input moves by 1e-4, and exact in float64). So gradients are
    compared in relative L2 norm with ``GRAD_RTOL``.

    With ``float64`` (used off the CPU) both copies are compared in double precision: cuDNN runs
    float32 convolutions in TF32 by default, whose rounding (~1e-3) would hide nothing but fail
    the check.
    """
    if float64:
        reference, candidate = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
        x = x.double()

    def run(model: nn.Module) -> tuple[Tensor, Tensor]:
        xi = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(xi)
            if not isinstance(out, Tensor):
                raise TypeError("the model must return a tensor")
            (grad,) = torch.autograd.grad(out.float().sum(), xi)
        return out.detach().float(), grad.float()

    ref_out, ref_grad = run(reference)
    new_out, new_grad = run(candidate)
    return close(ref_out, new_out, RTOL, norm=False) and close(ref_grad, new_grad, GRAD_RTOL, norm=True)


def close(a: Tensor, b: Tensor, rtol: float, *, norm: bool) -> bool:
    """``b`` equals ``a`` up to ``rtol`` of ``a``'s scale: max-abs error (or L2 error, with ``norm``)."""
    if a.shape != b.shape:
        return False
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return False
    if a.numel() == 0:
        return True
    a, b = a.double(), b.double()
    if norm:
        return float(torch.linalg.vector_norm(a - b)) <= rtol * float(torch.linalg.vector_norm(a))
    return float((a - b).abs().max()) <= rtol * float(a.abs().max())
