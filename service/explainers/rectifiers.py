"""Guided Backprop and Deconvnet backward rules, active only inside a ``with`` block.

``backward_rule("guided")`` / ``backward_rule("deconvnet")`` pushes a
``torch.overrides.TorchFunctionMode`` that intercepts every rectifying call made by the model's
forward — module or functional — and routes it through ``_Rectify``, an autograd function whose
forward is the ordinary rectifier and whose backward is the method's rule:

- **Guided Backprop** (Springenberg et al., ICLR 2015 workshop, https://arxiv.org/abs/1412.6806):
  pass back only positive gradients where the forward input was positive,
  ``∂in = max(∂out, 0) · [x > 0]`` (for ReLU6 and other clipped rectifiers also ``· [x < 6]``: the
  forward mask of a clipped unit is ``0 < x < max``).
- **Deconvnet** (Zeiler & Fergus, ECCV 2014, https://arxiv.org/abs/1311.2901): pass back the
  rectified gradient and ignore the forward mask, ``∂in = max(∂out, 0)`` (also at the upper clip of
  ReLU6).

What is intercepted: ``nn.ReLU`` (which calls ``F.relu``), ``nn.ReLU6`` (which calls
``F.hardtanh(x, 0, 6)``), ``F.relu``, ``F.relu_``, ``torch.relu``, ``torch.relu_``,
``Tensor.relu``, ``Tensor.relu_``, ``F.relu6``, and ``F.hardtanh`` / ``F.hardtanh_`` with
``min_val == 0`` (a rectifier clipped at ``max_val``). A call is routed only when autograd is
recording and its input requires grad; every other call runs unchanged.

Smooth and other activations (SiLU, GELU, Hardswish, Sigmoid, LeakyReLU, ``clamp``, …) keep their
plain gradient, as in Captum: both papers define the rule for rectifiers only. A model with no
rectifier at all (a ViT, a ConvNeXt, torchvision's EfficientNet: GELU or SiLU throughout) would
get its plain input gradient from these methods, so they refuse it (the ``rectifiers`` need,
measured with ``rectifier_calls``) rather than return a plain gradient under their name.

Deviation from Captum: Captum hooks ``nn.ReLU`` modules only, so it silently returns the plain
gradient through functional ReLUs (torchvision's DenseNet applies ``F.relu`` before pooling) and
through ``nn.ReLU6`` (EfficientNet-Lite, MobileNetV2). Here both are rectified.

In-place requests (``inplace=True``, ``relu_``) stay in place: ``_Rectify`` clamps its input in
place and marks it dirty, exactly like the native op (same version-counter checks, same results for
code that relies on the mutation). The rule needs only the forward *output* (``y > 0`` iff
``x > 0``; ``0 < y < max`` iff ``0 < x < max``), which is what it saves.

Scope: the mode lives on PyTorch's thread-local torch-function mode stack, so the rule applies
only to code run by the calling thread inside the ``with`` block; it is popped when the block
exits, normally or by an exception. Nothing is registered on the model. TorchScript modules do not
dispatch through Python and so cannot be intercepted: methods using these rules refuse them
(the ``python_forward`` need).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

RectifierRule = Literal["guided", "deconvnet"]

# (input, upper clip or None, in place) of a rectifying call, or None when the call is not one.
_Call = tuple[Any, float | None, bool]
_Parser = Callable[[tuple[Any, ...], dict[str, Any]], _Call | None]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _relu(inplace: bool | None) -> _Parser:
    """``relu(input, inplace=False)``; a fixed ``inplace`` for ``relu``/``relu_`` variants."""

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        flag = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input", None), None, flag

    return parse


def _relu6(inplace: bool | None) -> _Parser:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        flag = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input", None), 6.0, flag

    return parse


def _hardtanh(inplace: bool | None) -> _Parser:
    """``hardtanh(input, min_val=-1, max_val=1, inplace=False)``: a rectifier when ``min_val == 0``."""

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call | None:
        lo = _arg(args, kwargs, 1, "min_val", -1.0)
        hi = _arg(args, kwargs, 2, "max_val", 1.0)
        if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)) or lo != 0 or hi <= 0:
            return None
        flag = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input", None), float(hi), flag

    return parse


_PARSERS: dict[Any, _Parser] = {
    F.relu: _relu(None),
    torch.relu: _relu(False),
    torch.Tensor.relu: _relu(False),
    torch.relu_: _relu(True),  # also F.relu_
    torch.Tensor.relu_: _relu(True),
    F.relu6: _relu6(None),
    torch._C._nn.relu6: _relu6(False),
    torch._C._nn.relu6_: _relu6(True),
    F.hardtanh: _hardtanh(None),
    torch._C._nn.hardtanh: _hardtanh(False),
    torch._C._nn.hardtanh_: _hardtanh(True),  # also F.hardtanh_
}


class _Rectify(torch.autograd.Function):
    """``clamp(x, 0, upper)`` forward; the Guided Backprop or Deconvnet rule backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None, rule: str, inplace: bool) -> Tensor:
        if inplace:
            out = x.clamp_(min=0.0, max=upper)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0.0, max=upper)
        ctx.upper = upper
        ctx.rule = rule
        if rule == "guided":
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # clamp, not relu: a relu here would be seen by the mode if backward runs inside the block
        if ctx.rule != "guided":
            return grad.clamp(min=0.0), None, None, None
        (out,) = ctx.saved_tensors
        # the native backward of the forward op applies the forward mask in one fused pass:
        # grad where 0 < out (and out < upper), else 0 — then keep only the positive part
        if ctx.upper is None:
            masked = torch.ops.aten.threshold_backward(grad, out, 0.0)
        else:
            masked = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.upper)
        return masked.clamp_(min=0.0), None, None, None


@dataclass
class RuleStats:
    """How many rectifying calls the rule rewrote inside the block (for tests and diagnostics)."""

    rectified: int = 0


class _RectifierMode(TorchFunctionMode):
    def __init__(self, rule: RectifierRule) -> None:
        super().__init__()
        self.rule = rule
        self.stats = RuleStats()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        parse = _PARSERS.get(func)
        if parse is not None and torch.is_grad_enabled():
            call = parse(args, kwargs)
            if call is not None and isinstance(call[0], Tensor) and call[0].requires_grad:
                x, upper, inplace = call
                self.stats.rectified += 1
                return _Rectify.apply(x, upper, self.rule, inplace)
        return func(*args, **kwargs)


@contextmanager
def backward_rule(rule: RectifierRule | None) -> Iterator[RuleStats]:
    """Apply ``rule`` at every rectifier run by this thread inside the block; ``None``: plain gradient."""
    if rule is None:
        yield RuleStats()
        return
    if rule not in ("guided", "deconvnet"):
        raise ValueError(f"unknown rectifier rule {rule!r}")
    mode = _RectifierMode(rule)
    with mode:
        yield mode.stats


def rectifier_calls(model: nn.Module, example: Tensor) -> int:
    """How many rectifying calls one forward pass of ``model`` on ``example`` makes (the rules'
    reach: a model with none gets a plain gradient from them)."""
    x = example.detach().clone().requires_grad_(True)
    with torch.enable_grad(), backward_rule("guided") as stats:
        model(x)
    return stats.rectified
