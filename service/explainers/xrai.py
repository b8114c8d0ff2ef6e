"""XRAI (Kapishnikov, Bolukbasi, Viégas & Terry, ICCV 2019, https://arxiv.org/abs/1906.02825).

Regions instead of pixels: the image is over-segmented at several scales, and the regions are
ranked by how much attribution they add per unit of area.

1. Attribution: Integrated Gradients from the black and from the white pixel baselines (``steps``,
   ``rule``; the shared IG engine, ``path.IntegratedGradients``), averaged; channels merged by
   their maximum.
2. Regions (``segment_masks``): Felzenszwalb's graph segmentation (scikit-image's
   ``felzenszwalb``, σ 0.8, minimum size 150) of the pixel image at scales 50, 100, 150, 250,
   500 and 1200, each segment dilated by a disk of radius 5 (scikit-image's ``disk``). As the
   authors' code does, the image is first min–max scaled to [−1, 1] and resized to 224 × 224
   (bicubic, anti-aliased), the frame the scales were chosen in, and the segments resized back
   (nearest); so a 64 px and a 512 px image are segmented alike.
3. Selection (``xrai_regions``), the paper's full greedy algorithm: starting from nothing, add
   the region whose not-yet-covered pixels have the highest mean attribution (gain per area);
   repeat until no region adds a pixel. Each pixel's map value is the gain of the region that
   first covered it (higher = more important); pixels no region covers get their own mean.

Deviation from the authors' code (PAIR's ``saliency.core.XRAI``): a region is dropped once it
adds no new pixel; the authors' code also drops regions adding fewer than 50 pixels, an
"experimental" setting the paper does not have. The selection keeps, per region, its count and
sum of uncovered pixels and subtracts each newly covered set from them, so the whole selection
reads every region's pixels once instead of once per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from skimage.morphology import disk
from skimage.segmentation import felzenszwalb
from skimage.transform import resize
from torch import Tensor

from service.explainers.base import Attribution, Method, ModelHandle, RunContext, register
from service.explainers.figures import CAM_HEATMAP
from service.explainers.params import ExplainParams
from service.explainers.path import IntegratedGradients
from service.explainers.pixels import to_pixels

SCALES = (50, 100, 150, 250, 500, 1200)
SIGMA = 0.8
MIN_SIZE = 150
DILATION_RADIUS = 5
SEGMENTATION_SIDE = 224
"""The side the image is resized to for segmentation (the authors' code)."""

MIN_NEW_PIXELS = 1
"""A region adding fewer uncovered pixels than this is dropped (the authors' code: 50)."""


def _dilated(labels: NDArray[np.int64], count: int, offsets: NDArray[np.int64]) -> NDArray[np.bool_]:
    """(count, H·W) masks: pixel q is in mask l when some pixel within the footprint of q is
    labelled l (binary dilation of every label's mask at once; out-of-image pixels count as not
    in the mask)."""
    h, w = labels.shape
    out = np.zeros((count, h, w), dtype=bool)
    for dy, dx in offsets:
        ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        src = labels[max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)]
        yy, xx = np.mgrid[ys, xs]
        out[src.ravel(), yy.ravel(), xx.ravel()] = True
    return out.reshape(count, h * w)


def segment_masks(image: NDArray[np.float64]) -> NDArray[np.bool_]:
    """The dilated segments of an (H, W, C) pixel image at every scale, as (K, H·W) masks, in the
    authors' order (scale by scale, label by label, labels that vanish when resized back kept as
    empty masks)."""
    h, w = image.shape[:2]
    lo, hi = float(image.min()), float(image.max())
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    scaled = resize(  # type: ignore[no-untyped-call]
        scaled * 2.0 - 1.0,
        (SEGMENTATION_SIDE, SEGMENTATION_SIDE),
        order=3,
        mode="constant",
        preserve_range=True,
        anti_aliasing=True,
    )
    footprint = disk(DILATION_RADIUS)  # type: ignore[no-untyped-call]
    offsets = np.argwhere(footprint) - DILATION_RADIUS
    masks = []
    for scale in SCALES:
        seg = felzenszwalb(scaled, scale=scale, sigma=SIGMA, min_size=MIN_SIZE)
        back = resize(seg, (h, w), order=0, preserve_range=True, mode="constant", anti_aliasing=False)  # type: ignore[no-untyped-call]
        seg = back.astype(np.int64)
        first = int(seg.min())
        masks.append(_dilated(seg - first, int(seg.max()) - first + 1, offsets))
    return np.concatenate(masks)


def xrai_regions(attr: NDArray[np.float64], masks: NDArray[np.bool_]) -> NDArray[np.float64]:
    """The paper's greedy selection over (K, P) ``masks`` of the (P,) attribution: each pixel's
    value is the gain (mean attribution of the pixels it adds) of the region that first covered it."""
    count = masks.sum(axis=1).astype(np.int64)
    total = np.array([attr[m].sum() for m in masks], dtype=np.float64)
    alive = np.ones(len(masks), dtype=bool)
    covered = np.zeros(attr.shape[0], dtype=bool)
    out = np.zeros(attr.shape[0], dtype=np.float64)
    while True:
        alive &= count >= MIN_NEW_PIXELS
        if not alive.any():
            break
        gain = np.where(alive, total / np.maximum(count, 1), -np.inf)
        best = int(np.argmax(gain))
        added = np.flatnonzero(masks[best] & ~covered)
        out[added] = gain[best]
        covered[added] = True
        alive[best] = False
        reached = masks[:, added]
        count -= reached.sum(axis=1)
        total -= reached.astype(np.float64) @ attr[added]
    if not covered.all():
        out[~covered] = attr[~covered].mean()
    return out


@register
class Xrai(Method):
    """XRAI (Kapishnikov et al., ICCV 2019, https://arxiv.org/abs/1906.02825), see the module's
    docstring. The map holds each selected region's attribution density; the per-channel
    attributions returned are the averaged IG. Passes per pair: 2 × (``steps`` + 2), IG from the
    two baselines with their endpoint forwards; the segmentation runs on the CPU.

    Shown by default as a heatmap of the regions over the photo (``figures.CAM_HEATMAP``), as the
    paper's figures show XRAI's region map.
    """

    name = "xrai"
    family = "path"
    description = "Image regions ranked by the Integrated Gradients attribution they add per unit of area."
    paper = "https://arxiv.org/abs/1906.02825"
    signed = True  # a region's density is negative where the attribution is
    picks_targets = True
    rendering = CAM_HEATMAP
    uses: ClassVar[frozenset[str]] = frozenset({"steps", "rule", "batch_size", "precision"})
    defaults: ClassVar[Mapping[str, Any]] = {"steps": 100}  # the authors' code

    _ig: ClassVar[IntegratedGradients] = IntegratedGradients()

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        self._ig.check(handle, params)

    def passes(self, params: ExplainParams) -> int:
        return 2 * (params.steps + 2)

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        original = ctx.params
        try:
            ctx.params = original.with_(baseline="black")
            black = self._ig.pixel_attributions(ctx, x, targets)
            assert black.targets is not None and black.attributions is not None
            ctx.params = original.with_(baseline="white")
            white = self._ig.pixel_attributions(ctx, x, black.targets)
            assert white.attributions is not None
        finally:
            ctx.params = original
        attributions = (black.attributions + white.attributions) / 2
        merged = attributions.amax(dim=1).flatten(1).double().cpu().numpy()
        pixels = to_pixels(x, ctx.handle).permute(0, 2, 3, 1).double().cpu().numpy()
        maps = np.empty_like(merged)
        masks: NDArray[np.bool_] | None = None
        for i in range(x.shape[0]):
            ctx.check_cancel()
            if masks is None or not np.array_equal(pixels[i], pixels[i - 1]):  # k targets: one image
                masks = segment_masks(pixels[i])
            maps[i] = xrai_regions(merged[i], masks)
        return Attribution(
            maps=torch.from_numpy(maps).float().view(x.shape[0], *x.shape[2:]).to(x.device),
            attributions=attributions,
            logits=black.logits,
            targets=black.targets,
        )
