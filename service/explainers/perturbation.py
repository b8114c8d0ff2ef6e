"""The perturbation family: black-box methods that only run the model forward.

Each method changes the input (patches replaced, pixels masked), runs the perturbed copies forward
in chunks of ``batch_size`` and reads how the target's output moves. No gradient, hook or Python
forward is needed (``needs`` is empty), so they explain every model the registry serves, TorchScript
and ``torch.export`` programs included. Each first runs the clean rows forward: that pass scores (and,
for top-1, chooses) the targets, so the engine runs none of its own (``picks_targets``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidParameter
from service.explainers.base import Attribution, Method, ModelHandle, Need, RunContext, register
from service.explainers.figures import CAM_HEATMAP
from service.explainers.noise import sample_seed
from service.explainers.params import ExplainParams
from service.explainers.path import make_baseline
from service.explainers.targets import choose

#: the input side ``passes`` assumes before a model is seen (its nominal count, for progress)
NOMINAL_SIDE = 224


def clean_logits(ctx: RunContext, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The clean rows' float32 logits (M, classes) and their targets (``PREDICTED`` → top-1,
    explicit ones range-checked), forwards only, in chunks of ``batch_size``; one pass a row."""
    logits: list[Tensor] = []
    chosen = targets.clone()
    with torch.no_grad():
        for sl in ctx.chunks(x.shape[0]):
            out = ctx.forward(x[sl])
            chosen[sl] = choose(out, targets[sl])
            logits.append(out)
            ctx.advance(sl.stop - sl.start)
    return torch.cat(logits), chosen


def _side(handle: ModelHandle) -> tuple[int, int]:
    _, h, w = handle.input_size or (3, 64, 64)
    return h, w


# ------------------------------------------------------------------------------------------------
# occlusion
# ------------------------------------------------------------------------------------------------
def window_starts(size: int, window: int, stride: int) -> Tensor:
    """Offsets 0, stride, 2·stride, … of the windows that fit in ``size`` (as Captum's Occlusion)."""
    return torch.arange(0, size - window + 1, stride)


def window_count(h: int, w: int, window: int, stride: int) -> int:
    if window > min(h, w):
        return 0
    return len(window_starts(h, window, stride)) * len(window_starts(w, window, stride))


def coverage(size: int, window: int, stride: int) -> Tensor:
    """How many window offsets along one axis cover each position (float32, (size,))."""
    starts = window_starts(size, window, stride)
    pos = torch.arange(size)
    return ((pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + window)).sum(0).float()


@register
class Occlusion(Method):
    """Occlusion (Zeiler & Fergus, ECCV 2014, https://arxiv.org/abs/1311.2901, §4.2).

    A ``window`` × ``window`` square, every channel, is slid over the model input with ``stride``
    (offsets 0, s, 2s, … that fit, as Captum's ``Occlusion``) and replaced by ``baseline``
    (``make_baseline``: ``mean`` is the per-channel dataset mean, 0 after normalisation). Per
    pixel, the map is the drop of the target's logit, f(x) − f(x with the window occluded),
    averaged over the windows covering it; a pixel no window covers (the right/bottom margin when
    the stride does not reach it) gets 0, where Captum returns NaN. Signed (a patch can raise the
    logit). Passes per pair: the windows + 1 (the clean forward). The default ``baseline`` is
    ``mean``: the paper's grey square.

    Shown by default as the paper's Fig. 7 draws its occlusion maps: a heatmap over the photo
    (``figures.CAM_HEATMAP``; its positive part: where occluding lowers the class's score).
    """

    name = "occlusion"
    family = "perturbation"
    description = "Drop of the target's logit when a square patch covering each pixel is occluded."
    paper = "https://arxiv.org/abs/1311.2901"
    signed = True
    picks_targets = True
    rendering = CAM_HEATMAP
    needs: ClassVar[frozenset[Need]] = frozenset()
    uses: ClassVar[frozenset[str]] = frozenset(
        {"window", "stride", "baseline", "seed", "batch_size", "precision"}
    )
    defaults: ClassVar[Mapping[str, Any]] = {"baseline": "mean"}

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        if handle.input_size is not None:
            _check_window(params, *_side(handle))

    def passes(self, params: ExplainParams) -> int:
        return window_count(NOMINAL_SIDE, NOMINAL_SIDE, params.window, params.stride) + 1

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        return window_count(*_side(handle), params.window, params.stride) + 1

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, _, h, w = x.shape
        window, stride = ctx.params.window, ctx.params.stride
        _check_window(ctx.params, h, w)
        ys, xs = window_starts(h, window, stride).to(x.device), window_starts(w, window, stride).to(x.device)
        per_pair = len(ys) * len(xs)
        ctx.total_passes = m * (per_pair + 1)
        baseline = make_baseline(ctx.params.baseline, x, ctx.handle, ctx.seed)
        logits, targets = clean_logits(ctx, x, targets)
        f_x = logits.gather(1, targets.view(-1, 1)).squeeze(1)

        iy, ix = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        total = torch.zeros((m, h, w), dtype=torch.float32, device=x.device)
        for sl in ctx.chunks(m * per_pair):
            flat = torch.arange(sl.start, sl.stop, device=x.device)
            pair, win = flat // per_pair, flat % per_pair
            top, left = ys[win // len(xs)].view(-1, 1), xs[win % len(xs)].view(-1, 1)
            rows = (iy >= top) & (iy < top + window)
            cols = (ix >= left) & (ix < left + window)
            mask = rows[:, :, None] & cols[:, None, :]  # (n, H, W)
            occluded = torch.where(mask[:, None], baseline[pair], x[pair])
            with torch.no_grad():
                out = ctx.forward(occluded)
            drop = f_x[pair] - out.gather(1, targets[pair].view(-1, 1)).squeeze(1)
            total.index_add_(0, pair, drop.view(-1, 1, 1) * mask)
            ctx.advance(sl.stop - sl.start)

        count = (coverage(h, window, stride)[:, None] * coverage(w, window, stride)[None, :]).to(x.device)
        maps = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        return Attribution(maps=maps, logits=logits, targets=targets)


def _check_window(params: ExplainParams, h: int, w: int) -> None:
    if params.window > min(h, w):
        raise InvalidParameter(
            f"window must be at most the input's side ({min(h, w)} px), got {params.window}", field="window"
        )


# ------------------------------------------------------------------------------------------------
# RISE
# ------------------------------------------------------------------------------------------------
_RISE_STREAM = 0x2545F4914F6CDD1D  # keeps RISE's masks off the noise wrapper's sample streams


def rise_masks(first: int, count: int, params: ExplainParams, size: tuple[int, int], seed: int) -> Tensor:
    """Masks ``first`` … ``first + count − 1`` of RISE, shaped (count, H, W), float32 on the CPU.

    Mask j, from a generator of its own (seeded from (seed, j), ``noise.sample_seed``), so a mask
    does not depend on which chunk or batch draws it: an s × s grid (s = ``mask_cells``) of cells
    kept (1) with probability p = ``mask_p``, else 0; upsampled bilinearly to (s + 1)·C_H × (s + 1)·C_W
    with the cell size C = ⌈H / s⌉ (align_corners=False, edges clamped); cropped to H × W at an offset
    drawn uniformly from [0, C_H) × [0, C_W) (Petsiuk et al. 2018, §3.2).
    """
    h, w = size
    s, p = params.mask_cells, params.mask_p
    ch, cw = -(-h // s), -(-w // s)
    grids = torch.empty((count, 1, s, s))
    dy = torch.empty(count, dtype=torch.long)
    dx = torch.empty(count, dtype=torch.long)
    for j in range(count):
        g = torch.Generator()
        g.manual_seed(sample_seed(seed ^ _RISE_STREAM, first + j))
        grids[j, 0] = (torch.rand((s, s), generator=g) < p).float()
        dy[j] = int(torch.randint(0, ch, (1,), generator=g))
        dx[j] = int(torch.randint(0, cw, (1,), generator=g))
    up = F.interpolate(grids, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return up[torch.arange(count)[:, None, None], rows, cols]


@register
class Rise(Method):
    """RISE (Petsiuk, Das & Saenko, BMVC 2018, https://arxiv.org/abs/1806.07421).

    S = 1 / (N · p) · Σ_j P(target | x ⊙ M_j) · M_j over N = ``masks`` random masks M_j
    (``rise_masks``), P the softmax probability of the target; E[M] = p, so S is the expectation
    of the score over masks that keep each pixel (the paper's Eq. 6). Masks multiply the model's
    normalised input, as the authors' code does (a masked pixel takes the dataset mean colour).
    Every image is explained with the same masks (as the authors' code), drawn from the seed: same
    seed, same map, whatever the batch. Passes per pair: ``masks`` + 1 (the clean forward).

    Shown by default as the paper's figures: a jet heatmap over the photo (``figures.CAM_HEATMAP``).
    """

    name = "rise"
    family = "perturbation"
    description = "Target probability averaged over random masks, weighting the pixels each mask keeps."
    paper = "https://arxiv.org/abs/1806.07421"
    picks_targets = True
    rendering = CAM_HEATMAP
    needs: ClassVar[frozenset[Need]] = frozenset()
    uses: ClassVar[frozenset[str]] = frozenset(
        {"masks", "mask_cells", "mask_p", "seed", "batch_size", "precision"}
    )

    def passes(self, params: ExplainParams) -> int:
        return params.masks + 1

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, _, h, w = x.shape
        n = ctx.params.masks
        logits, targets = clean_logits(ctx, x, targets)
        total = torch.zeros((m, h, w), dtype=torch.float32, device=x.device)
        for sl in ctx.chunks(m * n):
            flat = torch.arange(sl.start, sl.stop)  # mask-major: a chunk shares a few masks
            j, i = flat // m, flat % m
            first = int(j[0])
            masks = rise_masks(first, int(j[-1]) - first + 1, ctx.params, (h, w), ctx.seed).to(x.device)
            mask = masks[(j - first).to(x.device)]
            i = i.to(x.device)
            with torch.no_grad():
                out = ctx.forward(x[i] * mask[:, None])
            prob = out.softmax(dim=1).gather(1, targets[i].view(-1, 1)).view(-1, 1, 1)
            total.index_add_(0, i, prob * mask)
            ctx.advance(sl.stop - sl.start)
        return Attribution(maps=total / (n * ctx.params.mask_p), logits=logits, targets=targets)
