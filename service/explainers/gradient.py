"""The gradient family: attributions made from one input gradient per (image, target) pair.

Every method here runs one forward and one backward per chunk of ``batch_size`` pairs through
``RunContext.input_gradients`` (only the input requires grad: no parameter gradient is computed),
turns the gradient into a per-channel attribution at input resolution, and reduces it over
channels to a map. ``PixelMethod`` is the shared base, also used by the path and noise families.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from service.explainers.base import Attribution, Method, Need, RunContext, register
from service.explainers.cam import GradCam, layer_gradients
from service.explainers.figures import GRADIENT_MAGNITUDE, RGB_GRADIENT, SIGNED_ATTRIBUTION
from service.explainers.params import ExplainParams
from service.explainers.rectifiers import RectifierRule, backward_rule

Reduction = Literal["max", "sum"]

#: the ``maps`` of a ``pixel_attributions`` result, which ``PixelMethod.attribute`` fills in
EMPTY = torch.empty(0)


class PixelMethod(Method):
    """A method whose raw result is a per-channel attribution (M, C, H, W) at input resolution.

    ``reduction`` turns it into the (M, H, W) map: ``"max"`` over channels (unsigned magnitudes)
    or ``"sum"`` over channels (signed contributions, which add up across channels).
    """

    reduction: ClassVar[Reduction] = "sum"

    @abstractmethod
    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        """An ``Attribution`` whose ``attributions`` are float32, shaped like ``x`` (its ``maps``
        left empty: ``attribute`` fills them), with path methods' (M,) completeness ``delta``."""

    def to_map(self, attributions: Tensor) -> Tensor:
        if self.reduction == "max":
            return attributions.amax(dim=1)
        return attributions.sum(dim=1)

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        out = self.pixel_attributions(ctx, x, targets)
        assert out.attributions is not None
        return replace(out, maps=self.to_map(out.attributions))


class InputGradientMethod(PixelMethod):
    """Shared engine: ∂y_c/∂x per chunk (under ``rectifier``'s backward rule), then ``combine``."""

    family = "gradient"
    picks_targets = True
    rectifier: ClassVar[RectifierRule | None] = None

    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        logits: list[Tensor] = []
        chosen: list[Tensor] = []
        for sl in ctx.chunks(x.shape[0]):
            with backward_rule(self.rectifier):
                g = ctx.input_gradients(x[sl], targets[sl], clean=True)
            out[sl] = self.combine(x[sl], g.grad)
            logits.append(g.logits)
            chosen.append(g.targets)
            ctx.advance(sl.stop - sl.start)
        return Attribution(maps=EMPTY, attributions=out, logits=torch.cat(logits), targets=torch.cat(chosen))

    def combine(self, x: Tensor, grad: Tensor) -> Tensor:
        """Per-channel attribution from the input and its (rule-modified) gradient."""
        return grad


@register
class Saliency(InputGradientMethod):
    """Saliency maps (Simonyan et al., ICLR 2014 workshop, https://arxiv.org/abs/1312.6034).

    Attribution = |∂y_c/∂x| per channel (as Captum's ``Saliency(abs=True)``); map = its maximum
    over channels, as in the paper. y_c is the pre-softmax logit. Unsigned.

    Shown by default as the magnitude map of the paper's Fig. 2, capped at its 99th percentile (as
    SmoothGrad does), in bright pixels over the photo in grey (``figures.GRADIENT_MAGNITUDE``).
    """

    name = "saliency"
    description = "Magnitude of the target logit's gradient with respect to each pixel."
    paper = "https://arxiv.org/abs/1312.6034"
    reduction = "max"
    rendering = GRADIENT_MAGNITUDE

    def combine(self, x: Tensor, grad: Tensor) -> Tensor:
        return grad.abs()


@register
class InputXGradient(InputGradientMethod):
    """Input × gradient (Shrikumar et al. 2016, https://arxiv.org/abs/1605.01713).

    Attribution = x ⊙ ∂y_c/∂x (signed, x in the model's normalised input space, as in Captum's
    ``InputXGradient``); map = sum over channels.

    Shown by default with both signs, red for and blue against the class, clipped at the 99th
    percentile of |map|, as DeepLIFT's figures colour contributions (``figures.SIGNED_ATTRIBUTION``).
    """

    name = "input_x_gradient"
    description = "Input times the target logit's gradient: each pixel's first-order contribution."
    paper = "https://arxiv.org/abs/1605.01713"
    signed = True
    rendering = SIGNED_ATTRIBUTION

    def combine(self, x: Tensor, grad: Tensor) -> Tensor:
        return x * grad


@register
class GuidedBackprop(InputGradientMethod):
    """Guided Backpropagation (Springenberg et al., https://arxiv.org/abs/1412.6806).

    The input gradient with every rectifier's backward replaced by max(∂out, 0)·[x > 0]
    (ReLU6: also [x < 6]); see ``service.explainers.rectifiers`` for which calls are rectified and
    for the rule at smooth activations (plain gradient). Unlike Captum, functional ReLUs and ReLU6
    are rectified too. Attribution signed; map = sum over channels.

    Shown by default as the paper's reconstructions: the gradient as an RGB image, zero-centred
    per image, scaled and clipped (``colormap=rgb``, ``figures.RGB_GRADIENT``).
    """

    name = "guided_backprop"
    description = "Gradient with only positive signals passed back through each ReLU."
    paper = "https://arxiv.org/abs/1412.6806"
    signed = True
    rendering = RGB_GRADIENT
    needs: ClassVar[frozenset[Need]] = frozenset({"gradients", "python_forward", "rectifiers"})
    rectifier = "guided"


@register
class Deconvnet(InputGradientMethod):
    """Deconvnet (Zeiler & Fergus, https://arxiv.org/abs/1311.2901), as a backward rule.

    Every rectifier passes back max(∂out, 0), ignoring its forward mask (ReLU6: the upper clip is
    ignored too); the rest of the network backpropagates normally, as in Springenberg et al.'s
    formulation and Captum's ``Deconvolution``. Attribution signed; map = sum over channels.

    Shown by default as the paper's Fig. 2: the reconstruction as an RGB image, zero-centred,
    scaled and clipped (``colormap=rgb``, ``figures.RGB_GRADIENT``).
    """

    name = "deconvnet"
    description = "Deconvolution: rectified gradients passed back through each ReLU, ignoring its input."
    paper = "https://arxiv.org/abs/1311.2901"
    signed = True
    rendering = RGB_GRADIENT
    needs: ClassVar[frozenset[Need]] = frozenset({"gradients", "python_forward", "rectifiers"})
    rectifier = "deconvnet"


@register
class GuidedGradCam(PixelMethod):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391).

    Guided Backprop ⊙ the Grad-CAM map upsampled **bilinearly** to the input, as in the paper
    (Captum's ``GuidedGradCam`` upsamples by nearest neighbour by default). Two passes per pair:
    one guided input gradient, one plain gradient down to the target layer. Attribution signed
    (per channel); map = sum over channels.

    Shown by default as the paper's Fig. 1(d, j): an RGB image of the per-channel attribution
    (``colormap=rgb``, ``figures.RGB_GRADIENT``).
    """

    name = "guided_gradcam"
    family = "gradient"
    description = "Guided Backprop masked by the bilinearly upsampled Grad-CAM map."
    paper = "https://arxiv.org/abs/1610.02391"
    signed = True
    rendering = RGB_GRADIENT
    needs: ClassVar[frozenset[Need]] = GradCam.needs | GuidedBackprop.needs
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "precision"})

    _gradcam: ClassVar[GradCam] = GradCam()

    def passes(self, params: ExplainParams) -> int:
        return 2

    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for sl in ctx.chunks(x.shape[0]):
            with backward_rule("guided"):
                guided = ctx.input_gradients(x[sl], targets[sl]).grad
            g = layer_gradients(ctx, x[sl], targets[sl])
            assert g.act is not None
            cam = self._gradcam.combine(g.act, g.grad)
            up = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
            out[sl] = guided * up
            ctx.advance(2 * (sl.stop - sl.start))
        return Attribution(maps=EMPTY, attributions=out)
