"""Score-CAM: channel weights from the model's confidence on images masked by each channel."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.explainers.base import Attribution, Method, ModelHandle, Need, RunContext, register
from service.explainers.cam import distinct_images
from service.explainers.figures import CAM_HEATMAP
from service.explainers.hooks import capture
from service.explainers.params import ExplainParams

# Channels of EfficientNet-Lite0's last feature map (the service's default model): the channel
# count ``passes`` assumes before the layer has been seen.
NOMINAL_CHANNELS = 1280


@register
class ScoreCam(Method):
    """Score-CAM (Wang et al., CVPR-W 2020, https://arxiv.org/abs/1910.01279).

    For each channel k of the target layer: H_k = s(Up(A_k)), the map upsampled bilinearly to the
    input (align_corners=False) and min-max normalised to [0, 1]; α_k = softmax(f(X ∘ H_k))_c, the
    target's probability on the image masked by H_k; map = ReLU(Σ_k α_k A_k) at the layer's
    resolution (the engine upsamples it). Channels whose map is constant carry no spatial
    information and are skipped (weight 0), as in the authors' code. Forward passes only, run
    ``batch_size`` masked images at a time: one pass per image plus one per non-constant channel;
    top-k targets of one image share those passes.

    Choices and deviations: the weights follow the authors' released code (softmax over classes,
    the target's probability). Like that code, it drops the baseline term f(X_b) of the paper's
    "increase of confidence". pytorch-grad-cam differs in three ways: it takes a softmax *over
    channels* of the raw target logits, upsamples with align_corners=True, and keeps constant
    channels with an all-zero mask. Its weights match ours up to a positive per-image factor only
    when its target is the log-probability log softmax(f(·))_c; the tests compare on that basis.

    Shown by default as in the paper's Fig. 1: the map in jet over the photo, min–max scaled.
    """

    name = "scorecam"
    # A CAM over a target layer (it needs ``layer``), although its weights come from perturbations.
    family = "cam"
    description = "Score-CAM: channels weighted by the target's probability on the image masked by each one."
    paper = "https://arxiv.org/abs/1910.01279"
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "precision"})
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "layer"})
    rendering = CAM_HEATMAP

    def passes(self, params: ExplainParams) -> int:
        """Nominal 1 + ``NOMINAL_CHANNELS``; ``attribute`` corrects the total once it sees the layer."""
        return 1 + NOMINAL_CHANNELS

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        """One pass, plus one per channel of the layer as measured (``GET …/layers``)."""
        if params.layer is None:
            return self.passes(params)
        return 1 + handle.layers().get(params.layer).shape[0]

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        images, image_of = distinct_images(x)
        acts = self.activations(ctx, images)  # (u, C, h, w)
        u, c = acts.shape[:2]
        table, slot = _targets_per_image(image_of, targets, u)
        flat = acts.flatten(0, 1)  # (u·C, h, w)
        informative = (flat.amax(dim=(1, 2)) > flat.amin(dim=(1, 2))).nonzero().squeeze(1)
        ctx.total_passes = ctx.done_passes + u + int(informative.numel())  # the real count
        ctx.advance(u)
        scores = torch.zeros(u * c, table.shape[1], device=acts.device, dtype=torch.float32)
        size = (x.shape[2], x.shape[3])
        for sl in ctx.chunks(int(informative.numel())):
            idx = informative[sl]
            image = idx // c
            masks = F.interpolate(flat[idx].unsqueeze(1), size=size, mode="bilinear", align_corners=False)
            lo = masks.amin(dim=(2, 3), keepdim=True)
            span = (masks.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(torch.finfo(torch.float32).tiny)
            with torch.inference_mode():
                probs = ctx.forward(images[image] * ((masks - lo) / span)).softmax(dim=1)
            scores[idx] = probs.gather(1, table[image])
            ctx.advance(int(idx.numel()))
        weights = scores.view(u, c, -1)[image_of, :, slot]  # (m, C)
        return Attribution(maps=torch.relu(torch.einsum("mc,mchw->mhw", weights, acts[image_of])))

    def activations(self, ctx: RunContext, x: Tensor) -> Tensor:
        """The target layer's output for each image, float32 (n, C, h, w); one forward pass each.

        Progress for these passes is reported by the caller, once the real total is known.
        """
        assert ctx.layer is not None
        out: list[Tensor] = []
        for sl in ctx.chunks(x.shape[0]):
            with capture(ctx.model, ctx.layer) as cap, torch.inference_mode():
                ctx.forward(x[sl])
                out.append(ctx.as_map(cap.get()).float())
        return torch.cat(out)


def _targets_per_image(image_of: Tensor, targets: Tensor, images: int) -> tuple[Tensor, Tensor]:
    """(images, K) table of each image's distinct targets (padded by repetition) and each pair's slot."""
    rows: list[list[int]] = [[] for _ in range(images)]
    slots: list[int] = []
    for image, target in zip(image_of.tolist(), targets.tolist(), strict=True):
        row = rows[image]
        if target not in row:
            row.append(target)
        slots.append(row.index(target))
    width = max((len(row) for row in rows), default=1)
    table = [row + row[:1] * (width - len(row)) for row in rows]
    device = targets.device
    return (
        torch.tensor(table, dtype=torch.long, device=device).view(images, width),
        torch.tensor(slots, dtype=torch.long, device=device),
    )
