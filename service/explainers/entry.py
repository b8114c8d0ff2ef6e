"""The model's affine entry: its first layer, when the input reaches the rest of the network only
through that layer and the layer's output is an affine function of the input (a convolution, its
BatchNorm folded in by ``prepare``; ResNet's ``conv1``, EfficientNet's ``conv_stem``).

Then f(x) = g(E(x)) with E affine, and two identities hold that Integrated Gradients uses
(``path.IntegratedGradients``):

- along the straight path, E(x' + α(x − x')) = E(x') + α(E(x) − E(x')): the entry's forward runs
  once for the input and once for the baseline, not once per step;
- the weighted sum of input gradients is the entry's vector–Jacobian product of the weighted sum
  of gradients at its output, Σ_k w_k ∇f(x_k) = J_Eᵀ Σ_k w_k ∇g(E(x_k)): the entry's backward
  runs once per image, not once per step.

Both are exact (up to float rounding): the map is the same, only cheaper. The entry is where a
ResNet spends disproportionately on the way back (a 7×7 convolution from 3 channels at full
resolution: about 17 % of a forward+backward pass of resnet18 at 224², measured with
``torch.profiler``), and in a bf16 call it is one of the layers kept in fp32 (``precision``).

An entry is only used after it was checked on the model copy it belongs to (``find_entry``): the
first module with parameters of its own to run is a ``Conv2d``; its output is affine in the input
(checked on random probes, one of them outside the span of the others, so a clamp or an
activation shows); and the logits of the model run with the entry's output replaced by that of
another input are those of the other input (so nothing else reads the input). A model that fails
any check, or refuses hooks (TorchScript), has no entry, and IG runs every step in full.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

#: how closely the checks must hold, relative to the largest magnitude compared (float32 rounding
#: of a convolution is ~1e-7 of it; bf16 rounding, ~4e-3, fails them)
TOLERANCE = 1e-4


class _Reached(Exception):  # a signal, not an error
    """Raised by the hook at the entry to stop a forward pass there, carrying the entry's output."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


@dataclass(frozen=True, eq=False)
class Entry:
    """A checked affine entry of one model copy: the module and how the rest of the model is run."""

    name: str
    module: nn.Module
    #: the spatial side of the stand-in input the model receives while the entry's output is
    #: replaced (the stand-in only feeds the entry, whose output is discarded); ``None``: an input
    #: of the real size is needed (a model that checks its input's size)
    side: int | None

    def outputs(self, model: nn.Module, x: Tensor, autocast: Autocast) -> Tensor:
        """E(x): the model run up to the entry (no further), its output as float32."""
        with torch.no_grad():
            return self._run_to_entry(model, x, autocast).float()

    def _run_to_entry(self, model: nn.Module, x: Tensor, autocast: Autocast) -> Tensor:
        def stop(_m: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"the entry {self.name!r} returns {type(output).__name__}, not a tensor")
            raise _Reached(output)

        handle = self.module.register_forward_hook(stop)
        try:
            with autocast():
                model(x)
        except _Reached as reached:
            return reached.output
        finally:
            handle.remove()
        raise RuntimeError(f"the entry {self.name!r} did not run")

    def pullback(self, model: nn.Module, x: Tensor, cotangent: Tensor, autocast: Autocast) -> Tensor:
        """J_Eᵀ ``cotangent``: the input gradient of ⟨E(x), cotangent⟩, float32 (the same at
        every x, E being affine; ``x`` gives its shape)."""
        x = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            h = self._run_to_entry(model, x, autocast)
            (grad,) = torch.autograd.grad(h, x, cotangent.to(h.dtype))
        return grad.float()

    def standin(self, h: Tensor, like: Tensor) -> Tensor:
        """The input the model receives while the entry's output is replaced by ``h``."""
        if self.side is None:
            return torch.zeros((h.shape[0], *like.shape[1:]), dtype=like.dtype, device=like.device)
        return torch.zeros(
            (h.shape[0], like.shape[1], self.side, self.side), dtype=like.dtype, device=like.device
        )

    def logits_from(self, model: nn.Module, h: Tensor, like: Tensor, autocast: Autocast) -> Tensor:
        """The model's logits with the entry's output replaced by ``h`` (rows of it), float32; the
        autograd graph runs back to ``h``."""

        def replace(_m: nn.Module, _inputs: object, _output: object) -> Tensor:
            return h

        handle = self.module.register_forward_hook(replace)
        try:
            with autocast():
                out = model(self.standin(h, like))
        finally:
            handle.remove()
        if not isinstance(out, Tensor):
            raise TypeError("the model must return a tensor of logits")
        return out.float()


_FOUND: weakref.WeakKeyDictionary[nn.Module, Entry | None] = weakref.WeakKeyDictionary()
_FOUND_LOCK = threading.Lock()


def entry_of(model: nn.Module, probe: Callable[[], Tensor], autocast: Autocast) -> Entry | None:
    """The checked affine entry of ``model`` (a private prepared copy), or ``None``; found once per
    copy (``find_entry`` on an input ``probe()`` makes, only then) and remembered while the copy
    lives. ``autocast``: the precision the copy runs at (a bf16 copy is checked under bf16 autocast)."""
    with _FOUND_LOCK:
        if model in _FOUND:
            return _FOUND[model]
    found = find_entry(model, probe(), autocast)
    with _FOUND_LOCK:
        _FOUND[model] = found
    return found


def _first_parametrised(model: nn.Module, x: Tensor, autocast: Autocast) -> tuple[str, nn.Module] | None:
    """The first module with parameters of its own to finish a forward pass of ``x``."""
    seen: list[tuple[str, nn.Module]] = []
    handles = []

    def hook(name: str, module: nn.Module) -> Callable[..., None]:
        def record(_m: nn.Module, _inputs: object, _output: object) -> None:
            if not seen:
                seen.append((name, module))

        return record

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        with torch.no_grad(), autocast():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0] if seen else None


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= TOLERANCE * max(scale, 1e-30)


def find_entry(model: nn.Module, probe: Tensor, autocast: Autocast) -> Entry | None:
    """Check ``model`` for an affine entry on random inputs shaped like ``probe`` (see the module
    docstring); ``None`` when any check fails. Leaves no hook behind."""
    if isinstance(model, torch.jit.ScriptModule):
        return None
    g = torch.Generator().manual_seed(0x3C6EF372)
    a, b = (torch.randn(probe.shape, generator=g).to(probe) for _ in range(2))
    with torch.no_grad():
        try:  # any failure means: no entry, IG runs every step in full
            first = _first_parametrised(model, a, autocast)
            if first is None:
                return None
            name, module = first
            if not isinstance(module, nn.Conv2d):
                return None
            entry = Entry(name=name, module=module, side=None)
            if not _affine(entry, model, a, b, autocast):
                return None
            with autocast():
                want = model(b)
            if not isinstance(want, Tensor):
                return None
            h_b = entry.outputs(model, b, autocast)
        except Exception:
            return None
        kernel = tuple(int(k) for k in module.kernel_size)
        for side in (max(3, *kernel), None):
            # E's output replaced by E(b): b's logits, whatever input the model was given
            entry = Entry(name=name, module=module, side=side)
            try:
                if _close(entry.logits_from(model, h_b, a, autocast), want.float()):
                    return entry
            except Exception:  # this stand-in fails (a model that checks its input's size): the next
                continue
    return None


def _affine(entry: Entry, model: nn.Module, a: Tensor, b: Tensor, autocast: Autocast) -> bool:
    """E((a+b)/2) = (E(a)+E(b))/2 and E(3a − 2b) = 3E(a) − 2E(b) (the second leaves the span of
    the probes' convex hull, where a clamp or an activation would show)."""
    ha, hb = entry.outputs(model, a, autocast), entry.outputs(model, b, autocast)
    mid = entry.outputs(model, (a + b) / 2, autocast)
    far = entry.outputs(model, 3 * a - 2 * b, autocast)
    return _close(mid, (ha + hb) / 2) and _close(far, 3 * ha - 2 * hb)
