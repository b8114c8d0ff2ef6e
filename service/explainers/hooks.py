"""Hook context managers. Every hook added here is removed when its ``with`` block exits,
whether the block finished or raised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from service.explainers.layers import get_layer


@dataclass
class Capture:
    """What a forward hook saw at one layer during the last forward pass."""

    activation: Tensor | None = None
    leaf: bool = False
    outputs: list[Tensor] = field(default_factory=list)

    def get(self) -> Tensor:
        if self.activation is None:
            raise RuntimeError("the target layer did not run during the forward pass")
        return self.activation


@contextmanager
def capture(model: nn.Module, layer: str, *, leaf: bool = False) -> Iterator[Capture]:
    """Record the output of ``layer`` on each forward pass.

    With ``leaf=True`` the output is replaced by a detached copy that requires grad: the rest of the
    network runs on (a clone of) it, so a backward pass from the logits stops at this layer, and no autograd
    graph is kept below it (run the forward with inputs that do not require grad).
    """
    module = get_layer(model, layer)
    box = Capture(leaf=leaf)

    def hook(_m: nn.Module, _inputs: object, output: object) -> object:
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {layer!r} returns {type(output).__name__}, not a tensor")
        if leaf:
            output = output.detach().requires_grad_(True)
        box.activation = output
        # The network continues on a copy: an in-place op after the layer (DenseNet's
        # F.relu(inplace=True)) must neither alter the record nor write into the leaf.
        return output.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def hook_count(model: nn.Module) -> int:
    """How many hooks of any kind are registered on ``model``'s modules (tests assert 0)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total
