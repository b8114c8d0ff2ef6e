"""The gradient-weighted CAM family over one shared engine.

Each variant overrides one step: how the channel weights (or the per-position weights) are made
from the target layer's activations A and the gradient G = ∂y_c/∂A of the target logit y_c.
The backward pass stops at the target layer (``capture(leaf=True)``): no autograd graph is built
below it and no parameter gradient is computed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, Method, RunContext, register
from service.explainers.hooks import capture


class GradientCam(Method):
    """Shared engine: one forward to the logits, one backward to the target layer, then ``combine``."""

    family = "cam"
    needs_layer = True
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "autocast"})

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        assert ctx.layer is not None
        maps: list[Tensor] = []
        for sl in ctx.chunks(x.shape[0]):
            act, grad = layer_gradients(ctx, x[sl], targets[sl])
            maps.append(self.combine(act, grad))
            ctx.advance(sl.stop - sl.start)
        return Attribution(maps=torch.cat(maps))

    def combine(self, act: Tensor, grad: Tensor) -> Tensor:
        """(n, C, h, w) activations and gradients → (n, h, w) map. Default: ReLU(Σ_k w_k A_k)."""
        w = self.weights(act, grad)
        return torch.relu((w[:, :, None, None] * act).sum(dim=1))

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        """(n, C) channel weights."""
        raise NotImplementedError


def layer_gradients(ctx: RunContext, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Target-layer activations and ∂ logit[target] / ∂ activations, both float32 (n, C, h, w)."""
    assert ctx.layer is not None
    with capture(ctx.model, ctx.layer, leaf=True) as cap, torch.enable_grad():
        logits = ctx.forward(x.detach())
        act = cap.get()
        selected = logits.gather(1, targets.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, act)
    return act.detach().float(), grad.float()


@register
class GradCam(GradientCam):
    """Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391).

    α_k = mean over positions of ∂y_c/∂A_k; map = ReLU(Σ_k α_k A_k), y_c the pre-softmax logit.
    """

    name = "gradcam"
    description = "Gradient-weighted class activation map: channels weighted by their mean gradient."
    paper = "https://arxiv.org/abs/1610.02391"

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        return grad.mean(dim=(2, 3))
