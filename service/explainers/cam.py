"""The gradient-weighted CAM family over one shared engine.

Each variant overrides one step: how the channel weights (``weights``) or the per-position map
(``combine``) are made from the target layer's activations A and the gradient G = ∂y_c/∂A of the
target logit y_c. The backward pass stops at the target layer (``capture(leaf=True)``): no autograd
graph is built below it and no parameter gradient is computed.

Maps come back at the layer's resolution; the engine upsamples them bilinearly to the input.
The gradient-free members of the family live in ``class_cam`` (CAM), ``scorecam`` and ``eigencam``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, Gradient, Method, Need, RunContext, register
from service.explainers.figures import CAM_HEATMAP
from service.explainers.hooks import capture
from service.explainers.targets import choose


class GradientCam(Method):
    """Shared engine: one forward to the logits, one backward to the target layer, then ``combine``.

    Shown by default as the papers of the family draw it (``figures.CAM_HEATMAP``): the map in jet
    over the photo, min–max scaled.
    """

    family = "cam"
    needs: ClassVar[frozenset[Need]] = frozenset({"gradients", "hooks", "layer"})
    picks_targets = True
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "precision"})
    rendering = CAM_HEATMAP

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        passes = [self._chunk(ctx, x[sl], targets[sl]) for sl in ctx.chunks(x.shape[0])]
        return Attribution(
            maps=torch.cat([m for m, _ in passes]),
            logits=torch.cat([g.logits for _, g in passes]),
            targets=torch.cat([g.targets for _, g in passes]),
        )

    def _chunk(self, ctx: RunContext, x: Tensor, targets: Tensor) -> tuple[Tensor, Gradient]:
        g = layer_gradients(ctx, x, targets, clean=True)
        assert g.act is not None
        ctx.advance(x.shape[0])
        return self.combine(g.act, g.grad), g

    def combine(self, act: Tensor, grad: Tensor) -> Tensor:
        """(n, C, h, w) activations and gradients → (n, h, w) map. Default: ReLU(Σ_k w_k A_k)."""
        w = self.weights(act, grad)
        return torch.relu((w[:, :, None, None] * act).sum(dim=1))

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        """(n, C) channel weights."""
        raise NotImplementedError


def layer_gradients(ctx: RunContext, x: Tensor, targets: Tensor, *, clean: bool = False) -> Gradient:
    """Target-layer activations (``act``) and ∂ logit[target] / ∂ activations (``grad``), both
    read as maps (``RunContext.as_map``: channels-last and token layers too), float32
    (n, C, h, w), with the rows' logits.

    ``clean``: as in ``RunContext.input_gradients``.
    """
    assert ctx.layer is not None
    with capture(ctx.model, ctx.layer, leaf=True) as cap, torch.enable_grad():
        logits = ctx.forward(x.detach())
        act = cap.get()
        if clean:
            targets = choose(logits, targets)
        selected = logits.gather(1, targets.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, act)
    return Gradient(
        grad=ctx.as_map(grad).float(),
        logits=logits.detach(),
        targets=targets,
        act=ctx.as_map(act.detach()).float(),
    )


@register
class GradCam(GradientCam):
    """Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391).

    α_k = mean over positions of ∂y_c/∂A_k; map = ReLU(Σ_k α_k A_k), y_c the pre-softmax logit.
    Shown by default as in the paper's Fig. 1(c, i): jet over the photo, min–max scaled.
    """

    name = "gradcam"
    description = "Gradient-weighted class activation map: channels weighted by their mean gradient."
    paper = "https://arxiv.org/abs/1610.02391"

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        return grad.mean(dim=(2, 3))


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is exactly 0 (where the papers' quotients are undefined)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


@register
class GradCamPlusPlus(GradientCam):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018, https://arxiv.org/abs/1710.11063), closed form.

    With g = ∂S_c/∂A_k(i,j) of the pre-softmax score S_c (eq. 19):
    α_k(i,j) = g² / (2g² + Σ_ab A_k(a,b) · g³), w_k = Σ_ij α_k(i,j) · ReLU(g), map = ReLU(Σ_k w_k A_k).

    Deviations: the paper weights ReLU(∂Y_c/∂A) with Y_c = exp(S_c), i.e. our w_k times exp(S_c); that
    positive per-image factor only rescales the map (and overflows float32 for S_c > 88), so it is
    left out, as in the authors' code and pytorch-grad-cam. α is set to 0 where its denominator is 0
    (there g = 0, or ΣA·g = −2); pytorch-grad-cam instead adds 1e-6 to every denominator, which
    changes the result noticeably when gradients are small (g² ~ 1e-6).

    Shown by default as in the paper's Fig. 1 (explanation maps): jet over the photo, min–max scaled.
    """

    name = "gradcam_pp"
    description = "Grad-CAM++: channel weights from second- and third-order gradient terms (closed form)."
    paper = "https://arxiv.org/abs/1710.11063"

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        g2 = grad * grad
        g3 = g2 * grad
        total = act.sum(dim=(2, 3), keepdim=True)
        alpha = _safe_divide(g2, 2.0 * g2 + total * g3)
        return (alpha * torch.relu(grad)).sum(dim=(2, 3))


@register
class XGradCam(GradientCam):
    """XGrad-CAM (Fu et al., BMVC 2020, https://arxiv.org/abs/2008.02312).

    w_k = Σ_xy (A_k(x,y) / Σ_x'y' A_k(x',y')) · ∂y_c/∂A_k(x,y), map = ReLU(Σ_k w_k A_k) (the ReLU as in
    the authors' code). Deviation: a channel whose activations sum to exactly 0 gets weight 0; the
    authors' code adds 1e-6 (pytorch-grad-cam 1e-7) to every denominator instead.

    Shown by default as the paper's visual comparisons: jet over the photo, min–max scaled.
    """

    name = "xgradcam"
    description = "Axiom-based Grad-CAM: gradients weighted by each channel's normalised activations."
    paper = "https://arxiv.org/abs/2008.02312"

    def weights(self, act: Tensor, grad: Tensor) -> Tensor:
        return _safe_divide((grad * act).sum(dim=(2, 3)), act.sum(dim=(2, 3)))


@register
class LayerCam(GradientCam):
    """LayerCAM (Jiang et al., IEEE TIP 2021, https://doi.org/10.1109/TIP.2021.3089943).

    Per-position weights: map(x,y) = ReLU(Σ_k ReLU(∂y_c/∂A_k(x,y)) · A_k(x,y)). No deviation.
    Shown by default as the paper's layer-by-layer figures: jet over the photo, min–max scaled.
    """

    name = "layercam"
    description = "LayerCAM: activations weighted position by position by their positive gradients."
    paper = "https://doi.org/10.1109/TIP.2021.3089943"

    def combine(self, act: Tensor, grad: Tensor) -> Tensor:
        return torch.relu((torch.relu(grad) * act).sum(dim=1))


@register
class HiResCam(GradientCam):
    """HiResCAM (Draelos & Carin, 2020, https://arxiv.org/abs/2011.08891).

    map(x,y) = ReLU(Σ_k ∂y_c/∂A_k(x,y) · A_k(x,y)): the gradient multiplies the activations element-wise
    instead of being averaged first. The final ReLU is the one the authors apply before display
    (their ``clip_and_norm_volume``). On a GAP + linear head the gradient is constant over positions,
    so HiResCAM equals Grad-CAM there (and ReLU(CAM) / (h·w)).

    Shown by default as the paper's figures beside Grad-CAM: jet over the image, min–max scaled.
    """

    name = "hirescam"
    description = "HiResCAM: element-wise gradient × activation, summed over channels."
    paper = "https://arxiv.org/abs/2011.08891"

    def combine(self, act: Tensor, grad: Tensor) -> Tensor:
        return torch.relu((grad * act).sum(dim=1))


def distinct_images(x: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct images of a batch of pairs, and each pair's index among them.

    The engine repeats an image once per target (top-k), so equal images are adjacent: a pair
    whose image equals the previous pair's shares its row. Class-agnostic passes (activations,
    masked images) then run once per image instead of once per target.
    """
    if x.shape[0] <= 1:
        return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    same = (x[1:] == x[:-1]).flatten(1).all(dim=1)
    new = torch.cat([torch.ones(1, dtype=torch.bool, device=x.device), ~same])
    return x[new], new.long().cumsum(0) - 1
