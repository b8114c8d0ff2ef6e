"""bf16 explanations: where they can run, which methods may use them, and how the model runs them.

``precision="bf16"`` runs the model's passes in bfloat16 on the matrix units of the device: CUDA
GPUs with native bf16 (Ampere and later) and CPUs whose oneDNN kernels have bf16 instructions
(Intel AMX-BF16, or AVX512-BF16 on Intel Cooper Lake+ and AMD Zen 4+). Elsewhere bf16 would be
emulated, slower than fp32, so it is refused (``PrecisionUnavailable``, 422) rather than run.
``precision="auto"`` picks bf16 only where it pays (``bf16_pays``: CUDA, or a CPU with AMX).

bf16 keeps 8 bits of mantissa: a method may serve bf16 maps only when they were measured to agree
with its fp32 maps (``BF16_FIDELITY``: Pearson r of the maps on the default model, EfficientNet-Lite0
with its trained weights, over skimage's sample photos; ``benchmarks/precision.py`` prints the
table). A method missing from the table — every method whose fidelity was not measured, or was
measured too low — is refused for bf16 with a 422 naming the methods that are offered.

What runs in bf16: the model's passes under ``torch.autocast`` (convolutions and linear layers in
bf16; autocast keeps reductions such as softmax in fp32) on the bf16 attribution copy
(``bf16_copy``: conv and linear weights stored in bf16 once, so no call re-casts them), except
its input-adjacent stages, which stay in fp32 (``fp32_region``: plain autocast leaves IG-32 at
r ≈ 0.85–0.89 on the default model; with them in fp32, r ≥ 0.99). Accumulations that decide the
result stay in fp32 in the methods themselves: IG's weighted sum over steps and its completeness
delta, the noise wrapper's mean over samples and CAM channel weights (the gradients and
activations are read as fp32 before they are combined).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from service.errors import PrecisionUnavailable

Precision = Literal["fp32", "bf16"]

#: The lowest Pearson r of a method's bf16 map against its fp32 map over the sample photos on the
#: default model (EfficientNet-Lite0, trained weights), measured with ``benchmarks/precision.py``
#: at the default parameters. Only the methods listed here may run in bf16; the threshold a
#: method must meet to be listed is ``MIN_FIDELITY``. The tests re-measure each entry on two photos.
BF16_FIDELITY: dict[str, float] = {
    "gradcam": 0.9998,
    "saliency": 0.9610,
    "guided_backprop": 0.9984,
    "integrated_gradients": 0.9919,
    "smoothgrad": 0.9810,
}

#: A method is offered in bf16 only if its maps agree with fp32 at least this well.
MIN_FIDELITY = 0.95

_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_has(probe_names: tuple[str, ...], flags: tuple[str, ...]) -> bool:
    """Whether torch's CPU probes (private but present since torch 2.3) say yes to any of
    ``probe_names``; without them, whether ``/proc/cpuinfo`` (Linux) lists any of ``flags``."""
    probes = [getattr(torch.cpu, n, None) for n in probe_names]
    known = [p for p in probes if callable(p)]
    if known:
        with contextlib.suppress(Exception):
            return any(bool(p()) for p in known)
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    listed = {
        f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }
    return any(f in listed for f in flags)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions oneDNN uses (AMX-BF16 or AVX512-BF16)."""
    return _cpu_has(("_is_amx_tile_supported", "_is_avx512_bf16_supported"), _CPU_FLAGS)


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where bf16 pays."""
    return _cpu_has(("_is_amx_tile_supported",), ("amx_bf16",))


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively: a CUDA device with bf16 units, or a CPU with them."""
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no including_emulation argument
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 is reliably faster than fp32 on ``device``, so ``auto`` picks it: a CUDA GPU
    with bf16, or a CPU with AMX. On a CPU with AVX512-BF16 only (AMD Zen 4, Intel Cooper Lake),
    measured with ``benchmarks/methods.py --precision bf16`` (four runs): resnet18's IG-32 takes
    0.6–0.9× its fp32 time, the default model's 1.0–1.2× (its fp32 stages are most of the work),
    so ``auto`` stays fp32 there and bf16 runs only when asked for."""
    return bf16_supported(device) and (device.type != "cpu" or cpu_has_amx())


def offered(method: str) -> bool:
    """Whether ``method`` may run in bf16 (its measured fidelity is in ``BF16_FIDELITY``)."""
    return BF16_FIDELITY.get(method, 0.0) >= MIN_FIDELITY


def resolve_precision(method: str, precision: str, device: torch.device) -> Precision:
    """The precision a call of ``method`` on ``device`` runs at: ``fp32`` as asked; ``bf16`` as
    asked, or ``PrecisionUnavailable`` (422) when the method is not offered in bf16 or the device
    has no bf16 units; ``auto``: bf16 where the method is offered and bf16 pays on the device
    (``bf16_pays``), else fp32."""
    if precision == "fp32":
        return "fp32"
    if precision == "auto":
        return "bf16" if offered(method) and bf16_pays(device) else "fp32"
    if not offered(method):
        listed = ", ".join(sorted(m for m in BF16_FIDELITY if offered(m))) or "none"
        raise PrecisionUnavailable(
            f"{method} is not offered in bf16: its bf16 maps were not measured to agree with its fp32 "
            f"maps at Pearson r ≥ {MIN_FIDELITY}; methods offered in bf16: {listed}",
            field="precision",
        )
    if not bf16_supported(device):
        raise PrecisionUnavailable(
            f"bf16 needs bf16 matrix units, which this server's {device.type} device lacks (a CUDA "
            "GPU with bf16, or a CPU with AMX-BF16 or AVX512-BF16): use precision=fp32",
            field="precision",
        )
    return "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``precision == "bf16"``; a no-op for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


#: Layers whose output keeps at least 1/``FP32_STRIDE`` of the input's resolution in each side, up
#: to the first layer below it, run in fp32 in a bf16 call (the input-adjacent stages; see
#: ``fp32_region``).
FP32_STRIDE = 4


def fp32_region(model: nn.Module, x: Tensor) -> list[str]:
    """The input-adjacent layers a bf16 call keeps in fp32: the modules with parameters of their
    own that run before the first 4-D output smaller than the input's side / ``FP32_STRIDE``
    (on EfficientNet-Lite0: the stem and blocks 0–1, 1/2 and 1/4 resolution; on a ResNet: conv1
    and layer1).

    Why: measured on EfficientNet-Lite0 with its trained weights (``benchmarks/precision.py``),
    IG-32's bf16 map agrees with fp32 at r ≈ 0.85–0.89 with every layer in bf16, 0.87–0.92 with
    the first convolution in fp32, 0.96 with stages at 1/2 resolution in fp32, 0.99 with stages
    down to 1/4 in fp32; keeping the late stages and the head in fp32 changes nothing (r ≈ 0.85–0.89).
    The input gradient's fine detail is formed in the high-resolution stages, where bf16 rounding
    of activations and gradients (8 bits of mantissa) scrambles it. Found with one forward pass
    and hooks on ``x``; a module that refuses hooks (TorchScript) gives an empty region.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    order: list[str] = []
    stop: list[bool] = [False]
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _inp: Any, out: Any) -> None:
            if stop[0]:
                return
            if isinstance(out, Tensor) and out.dim() == 4:
                oh, ow = int(out.shape[-2]), int(out.shape[-1])
                if oh * FP32_STRIDE < h or ow * FP32_STRIDE < w:
                    stop[0] = True
                    return
            order.append(name)

        return record

    try:
        for name, module in model.named_modules():
            if name and any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_hook(hook(name)))
    except RuntimeError:  # TorchScript
        return []
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


class _Fp32Forward:
    """A module's ``forward`` run outside autocast on float32 inputs (an instance attribute, so the
    module tree, its names and its hooks stay as they were). Picklable and deep-copyable."""

    def __init__(self, forward: Callable[..., Any], device_type: str) -> None:
        self.forward = forward
        self.device_type = device_type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(device_type=self.device_type, enabled=False):
            return self.forward(*args, **kwargs)


def bf16_copy(prepared: nn.Module, x: Tensor) -> nn.Module:
    """The bf16 attribution copy, made from an fp32 prepared copy (folded, channels_last) that the
    caller no longer needs: the input-adjacent layers (``fp32_region`` of ``x``) run in fp32, the
    weights of every other convolution and linear layer are stored in bf16 once, so autocast finds
    them cast. A TorchScript module is left as it is (autocast casts per call)."""
    if isinstance(prepared, torch.jit.ScriptModule):
        return prepared
    keep = set(fp32_region(prepared, x))
    for name, module in prepared.named_modules():
        if name in keep:
            module.forward = _Fp32Forward(module.forward, x.device.type)
        elif isinstance(module, nn.Conv2d | nn.Linear) and not any(n.startswith(name + ".") for n in keep):
            module.to(torch.bfloat16)
    return prepared
