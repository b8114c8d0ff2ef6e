"""Blur Integrated Gradients (Xu, Venugopalan & Sundararajan, CVPR 2020, https://arxiv.org/abs/2004.03383).

The path runs through ever more blurred copies of the image instead of a straight line from a
baseline: x(σ) is the pixel image blurred by a Gaussian of standard deviation σ, from σ = 0 (the
input) to ``max_sigma``. As the authors' code (PAIR's ``saliency.core.BlurIG``) computes it:

    BlurIG(x) = − Σ_{i=0}^{n−1} (σ_{i+1} − σ_i) · ∂x(σ_i)/∂σ ⊙ ∇f(x(σ_i)),   σ_i = i · max_sigma / n,

a left Riemann sum over n = ``steps`` points, ∂x/∂σ a forward difference (x(σ + 0.01) − x(σ)) / 0.01.
The blur is the one of ``scipy.ndimage.gaussian_filter(mode="constant")``: the pixel image in
[0, 1] (before normalisation), zero outside the image, a kernel truncated at 4σ
(radius ⌊4σ + ½⌋) and normalised to sum 1. Zero padding darkens the borders as σ grows, so blurring
the normalised values instead would give another path and another map.

Each separable blur is two matrix products, B_H · p · B_Wᵀ, B the (size × size) banded matrix of
the truncated kernel with the out-of-image taps dropped (exactly the zero padding). The forward
difference is taken between the matrices in float64, (B' − B) p B'ᵀ + B p (B'_W − B_W)ᵀ, so it
suffers no float32 cancellation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from service.explainers.base import Attribution, ModelHandle, RunContext, register
from service.explainers.figures import POSITIVE_ATTRIBUTION
from service.explainers.gradient import EMPTY, PixelMethod
from service.explainers.params import ExplainParams
from service.explainers.path import endpoint_logits
from service.explainers.pixels import pixel_stats, to_input, to_pixels

GRAD_STEP = 0.01
"""The forward difference's step in σ (the authors' ``grad_step``)."""

TRUNCATE = 4.0
"""Kernel radius in σ (scipy's ``truncate`` default)."""


def gaussian_weights(sigma: float) -> NDArray[np.float64]:
    """scipy's 1-D Gaussian kernel: radius ⌊4σ + ½⌋, exp(−t²/2σ²) normalised to sum 1."""
    radius = int(TRUNCATE * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * t * t)
    return phi / phi.sum()  # type: ignore[no-any-return]


def blur_matrix(size: int, sigma: float) -> NDArray[np.float64]:
    """B (size × size) with (B v)_i = Σ_k w_k v_{i+k−r}, terms outside [0, size) dropped: scipy's
    ``correlate1d(mode="constant", cval=0)`` with the Gaussian kernel. σ = 0: the identity."""
    if sigma <= 0:
        return np.eye(size)
    w = gaussian_weights(sigma)
    r = (len(w) - 1) // 2
    i = np.arange(size)
    d = i[None, :] - i[:, None]
    return np.where(np.abs(d) <= r, w[np.clip(d + r, 0, 2 * r)], 0.0)


def sigmas(steps: int, max_sigma: float) -> list[float]:
    """σ_0 … σ_n, computed as the authors' code does: float(i) · max_sigma / float(n)."""
    return [float(i) * max_sigma / float(steps) for i in range(steps + 1)]


class Blurs:
    """The blur of (n, C, H, W) pixel images as matrix products, on ``device``. Nothing is kept
    between calls: at most one σ's matrices are alive at a time."""

    def __init__(self, h: int, w: int, device: torch.device) -> None:
        self.h, self.w, self.device = h, w, device

    def _matrices(self, sigma: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        bh = blur_matrix(self.h, sigma)
        return bh, (bh if self.w == self.h else blur_matrix(self.w, sigma))

    def _tensor(self, a: NDArray[np.float64]) -> Tensor:
        return torch.from_numpy(a).float().to(self.device)

    def blur(self, p: Tensor, sigma: float) -> Tensor:
        """The images blurred by σ."""
        bh, bw = self._matrices(sigma)
        return separable(p, self._tensor(bh), self._tensor(bw))

    def blur_and_rate(self, p: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """x(σ) and the forward difference (x(σ + GRAD_STEP) − x(σ)) / GRAD_STEP."""
        bh, bw = self._matrices(sigma)
        bh2, bw2 = self._matrices(sigma + GRAD_STEP)
        t = self._tensor
        rate = (separable(p, t(bh2 - bh), t(bw2)) + separable(p, t(bh), t(bw2 - bw))) / GRAD_STEP
        return separable(p, t(bh), t(bw)), rate


def separable(p: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
    """B_H · p · B_Wᵀ for every (n, C) plane of p, as two flat matrix products (torch's broadcast
    ``matmul`` of a matrix with a 4-D tensor is two orders of magnitude slower on the CPU)."""
    n, c, h, w = p.shape
    rows = (p.reshape(-1, w) @ bw.T).view(n, c, h, w)
    return (rows.transpose(-1, -2).reshape(-1, h) @ bh.T).view(n, c, w, h).transpose(-1, -2)


@register
class BlurIntegratedGradients(PixelMethod):
    """Blur Integrated Gradients (Xu et al., CVPR 2020, https://arxiv.org/abs/2004.03383), as the
    authors' code computes it (see the module's docstring). Signed; map = sum over channels, as
    IG's. The result carries the completeness delta Σ attributions − (f(x) − f(x(max_sigma))).
    Passes per pair: ``steps`` forward+backward passes plus the 2 endpoint forwards of the delta.
    """

    name = "blur_ig"
    family = "path"
    description = "Gradients integrated along a path of ever more blurred copies of the image."
    paper = "https://arxiv.org/abs/2004.03383"
    signed = True
    rendering = POSITIVE_ATTRIBUTION
    picks_targets = True
    uses: ClassVar[frozenset[str]] = frozenset({"steps", "max_sigma", "batch_size", "precision"})
    defaults: ClassVar[Mapping[str, Any]] = {"steps": 100}  # the authors' code

    def passes(self, params: ExplainParams) -> int:
        return params.steps + 2

    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, c, h, w = x.shape
        steps, max_sigma = ctx.params.steps, ctx.params.max_sigma
        handle: ModelHandle = ctx.handle
        sigma = sigmas(steps, max_sigma)
        _, std = pixel_stats(handle, c, x.device)
        pixels = to_pixels(x, handle)
        blurs = Blurs(h, w, x.device)
        ends = endpoint_logits(ctx, x, to_input(blurs.blur(pixels, max_sigma), handle), targets, shared=False)
        targets = ends.targets

        total = torch.zeros_like(x)
        for sl in ctx.chunks(m * steps):
            flat = torch.arange(sl.start, sl.stop, device=x.device)
            step, pair = flat // m, flat % m  # step-major: a chunk's pairs share the blur matrices
            rows = torch.empty((sl.stop - sl.start, c, h, w), device=x.device)
            rates = torch.empty_like(rows)
            for s in torch.unique(step).tolist():
                at = (step == s).nonzero().squeeze(1)
                blurred, rate = blurs.blur_and_rate(pixels[pair[at]], sigma[s])
                rows[at] = to_input(blurred, handle)
                rates[at] = rate * (sigma[s + 1] - sigma[s])
            grad = ctx.input_gradients(rows, targets[pair]).grad
            total.index_add_(0, pair, grad * rates / std)  # ∂x/∂σ = ∂p/∂σ / std
            ctx.advance(sl.stop - sl.start)

        attributions = -total
        delta = attributions.sum(dim=(1, 2, 3)) - (ends.f_x - ends.f_base)
        return Attribution(
            maps=EMPTY, attributions=attributions, delta=delta, logits=ends.logits, targets=targets
        )
