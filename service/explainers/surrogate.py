"""Surrogate-model methods over superpixels: KernelSHAP and LIME.

Both are black-box: the image is split into superpixels (SLIC, from scikit-image, on the pixel
image), ``samples`` random coalitions of superpixels are kept while the others take the
``baseline`` (default ``mean``: the dataset mean colour, 0 after normalisation), the model scores
each coalition, and a weighted linear model of the kept/removed indicators z ∈ {0, 1}^S is fitted
to the scores. A superpixel's coefficient is the map's value on each of its pixels. They differ in
how coalitions are drawn and weighted, in the score they explain and in the fit:

- ``kernel_shap`` (Lundberg & Lee, NeurIPS 2017, Theorem 2): coalition sizes k ∈ 1 … S−1 drawn
  with probability ∝ (S−1) / (k·(S−k)) and the members uniformly (sampling by the Shapley kernel,
  so every sample weighs 1, as Captum's ``KernelShap`` does); the target's logit; least squares
  under the efficiency constraint Σφ = f(x) − f(baseline), solved exactly by eliminating the last
  superpixel (the shap package's approach), where Captum approximates it with two end points of
  weight 10⁶: the maps agree to rounding (tests/unit/test_surrogate.py).
- ``lime`` (Ribeiro, Singh & Guestrin, KDD 2016, Eq. 1–2): each superpixel kept with probability
  ½ (as the authors' ``lime`` package), the clean image as the first sample; the target's softmax
  probability (the paper explains class probabilities); weights π(z) = exp(−D(z)²/σ²) with D the
  cosine distance between z and the all-ones vector and σ = 0.25 (the package's width for images);
  weighted least squares with an intercept over every superpixel (the paper's K-Lasso with K = S:
  no feature is dropped from a map, so the penalty Ω is zero).

Samples are drawn from one generator seeded from the request's seed (and the superpixel count), so
an image's map depends on the seed, not on its batch. The fits run in float64 on the CPU; when
there are fewer samples than superpixels the minimum-norm solution is returned.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from skimage.segmentation import relabel_sequential, slic
from torch import Tensor

from service.explainers.base import Attribution, Method, ModelHandle, Need, RunContext, register
from service.explainers.figures import CAM_HEATMAP
from service.explainers.params import ExplainParams
from service.explainers.path import make_baseline
from service.explainers.perturbation import clean_logits

#: SLIC's compactness (scikit-image's default): the balance of colour and space in a superpixel
SLIC_COMPACTNESS = 10.0
#: LIME's kernel width σ on the cosine distance (the ``lime`` package's for images)
LIME_KERNEL_WIDTH = 0.25
_SHAP_STREAM = 0x5DEECE66D
_LIME_STREAM = 0x27BB2EE687B0B0FD


def superpixels(x: Tensor, handle: ModelHandle, segments: int) -> list[Tensor]:
    """SLIC superpixels of each row of ``x`` (M, C, H, W, normalised), computed on the pixel image
    in [0, 1] (Lab for three channels): one (H, W) long tensor of labels 0 … S−1 per row, on
    ``x``'s device. Where SLIC finds a single region (noise, a flat image), a grid of about
    ``segments`` square cells stands in, so that the map still says where."""
    c = int(x.shape[1])
    lo, hi = handle.pixel_bounds(c)
    pixels = ((x.detach().float().cpu() - lo.cpu()) / (hi - lo).cpu()).clamp(0.0, 1.0)
    out: list[Tensor] = []
    for row in pixels:
        image = row.permute(1, 2, 0).numpy().astype(np.float64)
        labels = slic(
            image if c != 1 else image[..., 0],
            n_segments=segments,
            compactness=SLIC_COMPACTNESS,
            start_label=0,
            channel_axis=-1 if c != 1 else None,
            convert2lab=c == 3,
        )
        labels, _, _ = relabel_sequential(labels)  # type: ignore[no-untyped-call]
        found = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        out.append(
            (found if int(found.max()) > 0 else grid(int(found.shape[0]), int(found.shape[1]), segments)).to(
                x.device
            )
        )
    return out


def grid(h: int, w: int, segments: int) -> Tensor:
    """(h, w) labels of an n × n grid of cells, n = ⌈√segments⌉ (at most the image's sides)."""
    n = max(1, math.ceil(math.sqrt(segments)))
    rows = torch.arange(h) * min(n, h) // h
    cols = torch.arange(w) * min(n, w) // w
    return rows[:, None] * min(n, w) + cols[None, :]


class SuperpixelSurrogate(Method):
    """What KernelSHAP and LIME share: superpixels, coalitions forwarded in chunks, a fit."""

    family = "perturbation"
    signed = True
    picks_targets = True
    rendering = CAM_HEATMAP
    needs: ClassVar[frozenset[Need]] = frozenset()
    uses: ClassVar[frozenset[str]] = frozenset(
        {"samples", "segments", "baseline", "seed", "batch_size", "precision"}
    )
    defaults: ClassVar[Mapping[str, Any]] = {"samples": 1000, "baseline": "mean"}
    #: the forward passes per pair besides the ``samples`` coalitions (the clean one, …)
    extra_passes: ClassVar[int] = 1

    def passes(self, params: ExplainParams) -> int:
        return params.samples + self.extra_passes

    @abstractmethod
    def coalitions(self, superpixels: int, params: ExplainParams, seed: int) -> Tensor:
        """(rows, S) bool: the coalitions to forward, special rows first (on the CPU)."""

    @abstractmethod
    def score(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The explained score of each row (float32)."""

    @abstractmethod
    def fit(self, z: Tensor, scores: Tensor, clean: float) -> Tensor:
        """The S coefficients (float64) from coalitions ``z`` and their ``scores`` (float64)."""

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, _, h, w = x.shape
        labels = superpixels(x, ctx.handle, ctx.params.segments)
        baseline = make_baseline(ctx.params.baseline, x, ctx.handle, ctx.seed)
        logits, targets = clean_logits(ctx, x, targets)
        clean = self.score(logits, targets)
        maps = torch.zeros((m, h, w), dtype=torch.float32, device=x.device)
        for i in range(m):
            s = int(labels[i].max()) + 1
            z = self.coalitions(s, ctx.params, ctx.seed)
            scores = torch.empty(z.shape[0], dtype=torch.float64)
            zd = z.to(x.device)
            for sl in ctx.chunks(int(z.shape[0])):
                keep = zd[sl][:, labels[i]]  # (n, H, W)
                inputs = torch.where(keep[:, None], x[i : i + 1], baseline[i : i + 1])
                with torch.no_grad():
                    out = ctx.forward(inputs)
                rows = targets[i].expand(sl.stop - sl.start)
                scores[sl] = self.score(out, rows).double().cpu()
                ctx.advance(sl.stop - sl.start)
            phi = self.fit(z, scores, float(clean[i]))
            maps[i] = phi.to(device=x.device, dtype=torch.float32)[labels[i]]
        return Attribution(maps=maps, logits=logits, targets=targets)


def _generator(seed: int, stream: int, superpixels: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed ^ stream ^ (superpixels * 0x9E3779B97F4A7C15)) % 2**63)
    return g


@register
class KernelShap(SuperpixelSurrogate):
    """KernelSHAP over superpixels (Lundberg & Lee 2017; see the module docstring). Passes per
    pair: ``samples`` coalitions + the all-removed one (f(baseline)) + the clean forward."""

    name = "kernel_shap"
    description = "Shapley values of superpixels, estimated by the Shapley-kernel-weighted linear fit."
    paper = "https://arxiv.org/abs/1705.07874"
    extra_passes = 2

    def coalitions(self, superpixels: int, params: ExplainParams, seed: int) -> Tensor:
        s, n = superpixels, params.samples
        empty = torch.zeros((1, s), dtype=torch.bool)
        if s < 2:  # one superpixel: φ = f(x) − f(baseline), nothing to sample
            return empty
        g = _generator(seed, _SHAP_STREAM, s)
        k = torch.arange(1, s, dtype=torch.float64)
        size_p = (s - 1) / (k * (s - k))
        sizes = torch.multinomial(size_p, n, replacement=True, generator=g) + 1  # (n,)
        ranks = torch.rand((n, s), generator=g).argsort(dim=1).argsort(dim=1)
        return torch.cat([empty, ranks < sizes[:, None]])

    def score(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.float().gather(1, targets.view(-1, 1)).squeeze(1)

    def fit(self, z: Tensor, scores: Tensor, clean: float) -> Tensor:
        s = int(z.shape[1])
        base = float(scores[0])  # the all-removed coalition: f(baseline)
        total = clean - base
        if s == 1:
            return torch.tensor([total], dtype=torch.float64)
        zf = z[1:].double()
        y = scores[1:] - base - zf[:, -1] * total
        design = zf[:, :-1] - zf[:, -1:]
        head = torch.linalg.lstsq(design, y.view(-1, 1), driver="gelsd").solution.view(-1)
        return torch.cat([head, (total - head.sum()).view(1)])


@register
class Lime(SuperpixelSurrogate):
    """LIME over superpixels (Ribeiro et al. 2016; see the module docstring). Passes per pair:
    ``samples`` coalitions + the clean forward (the first, all-kept, sample)."""

    name = "lime"
    description = "Coefficients of a locally weighted linear model of the class probability over superpixels."
    paper = "https://arxiv.org/abs/1602.04938"
    extra_passes = 1

    def coalitions(self, superpixels: int, params: ExplainParams, seed: int) -> Tensor:
        g = _generator(seed, _LIME_STREAM, superpixels)
        return torch.rand((params.samples, superpixels), generator=g) < 0.5

    def score(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.float().softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)

    def fit(self, z: Tensor, scores: Tensor, clean: float) -> Tensor:
        s = int(z.shape[1])
        zf = torch.cat([torch.ones((1, s), dtype=torch.float64), z.double()])  # the clean sample first
        y = torch.cat([torch.tensor([clean], dtype=torch.float64), scores])
        weights = lime_weights(zf)
        design = torch.cat([torch.ones((zf.shape[0], 1), dtype=torch.float64), zf], dim=1)
        root = weights.sqrt().view(-1, 1)
        coef: Tensor = torch.linalg.lstsq(design * root, y.view(-1, 1) * root, driver="gelsd").solution
        return coef.view(-1)[1:]


def lime_weights(z: Tensor) -> Tensor:
    """LIME's π(z) = exp(−D²/σ²) with D the cosine distance of each row of ``z`` (float64, 0/1) to
    the all-ones vector (1 for the empty coalition) and σ = ``LIME_KERNEL_WIDTH``."""
    cosine = z.sum(dim=1).sqrt() / math.sqrt(z.shape[1])  # z · 1 / (|z| |1|), 0 for the empty one
    distance: Tensor = 1.0 - cosine
    return torch.exp(-distance.square() / LIME_KERNEL_WIDTH**2)
