"""The noise wrapper: any pixel method averaged over noisy copies of its input.

SmoothGrad (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825) is ``NoiseTunnel`` around
``saliency``; Smooth IG is the same wrapper around ``integrated_gradients`` (like Captum's
``NoiseTunnel``: composed, not forked). The inner method's code runs unchanged on the noisy copies.

Noise, as in the paper: the s-th copy of image i is x_i + σ_i ε_s with ε_s ~ N(0, I) and
σ_i = ``noise_level`` × (max(x_i) − min(x_i)), the range taken over the image's normalised values.
ε_s is the s-th (C, H, W) draw of a fresh ``RunContext.generator`` on the model's device — every
image draws the same sequence — so an image's result depends only on the image, the seed and the
parameters, never on its batch or ``batch_size``. The noise is drawn where the model runs (a CUDA
generator on a GPU: no host-side drawing and copying), so the same seed gives other noise on a GPU
than on the CPU. The per-channel attributions are
averaged in float32 over the ``samples`` copies, then reduced to a map as the inner method reduces
its own (saliency: max over channels of the averaged |∇|).

Memory: the samples × pairs copies are made and explained in chunks of ``batch_size`` copies (the
inner method chunks its own passes the same way); nothing of size samples × image, let alone
samples × steps × image, is held.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, ExplainParams, Method, ModelHandle, RunContext, register
from service.explainers.gradient import PixelMethod, Saliency
from service.explainers.path import IntegratedGradients

NOISE_USES = frozenset({"samples", "noise_level", "seed"})


def noise_sigma(x: Tensor, noise_level: float) -> Tensor:
    """σ_i = noise_level × (max − min) of each image's values, shaped (M,)."""
    flat = x.flatten(1)
    return noise_level * (flat.amax(dim=1) - flat.amin(dim=1))


class NoiseStream:
    """ε_0, ε_1, … drawn one (C, H, W) tensor at a time from a generator, cached while in use.

    Copies are taken sample-major (all images' copy s before any copy s + 1), so a chunk needs a
    window of consecutive samples; samples before the window are dropped.
    """

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> None:
        self.shape = shape
        self.generator = generator
        self.device = device
        self.cache: dict[int, Tensor] = {}
        self.drawn = 0

    def take(self, samples: Tensor) -> Tensor:
        """ε for each entry of the non-decreasing sample indices ``samples``, shaped (n, C, H, W)."""
        first, last = int(samples[0]), int(samples[-1])
        for s in [s for s in self.cache if s < first]:
            del self.cache[s]
        while self.drawn <= last:
            eps = torch.randn(self.shape, generator=self.generator, dtype=torch.float32, device=self.device)
            self.cache[self.drawn] = eps
            self.drawn += 1
        window = torch.stack([self.cache[s] for s in range(first, last + 1)])
        return window[samples - first]


def noisy_chunks(
    x: Tensor, noise_level: float, samples: int, generator: torch.Generator, chunk: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(noisy copies, their image indices) in chunks of ``chunk``, sample-major over all images."""
    m = x.shape[0]
    sigma = noise_sigma(x, noise_level).view(-1, 1, 1, 1)
    stream = NoiseStream(tuple(x.shape[1:]), generator, x.device)
    for start in range(0, m * samples, chunk):
        flat = torch.arange(start, min(m * samples, start + chunk))  # indices on the CPU: no syncs
        s, i = flat // m, (flat % m).to(x.device)
        yield x[i] + sigma[i] * stream.take(s), i


def noisy_inputs(x: Tensor, noise_level: float, samples: int, seed: int) -> Tensor:
    """Every noisy copy the wrapper explains, shaped (samples, M, C, H, W) — for tests and debugging.

    Uses the same code path as ``NoiseTunnel`` (a generator on ``x``'s device, seeded as
    ``RunContext.generator``).
    """
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    copies = torch.cat([c for c, _ in noisy_chunks(x.float(), noise_level, samples, g, chunk=x.shape[0])])
    return copies.view(samples, *x.shape)


class NoiseTunnel(Method):
    """Average of ``inner`` over ``samples`` noisy copies of each input (see the module docstring).

    ``delta`` (when the inner method reports one, as IG does) is the mean of the per-copy deltas,
    which equals Σ(averaged attributions) − mean_s (f(x + σε_s) − f(x'_s)): the completeness gap of
    the averaged attribution with respect to the averaged endpoint difference.
    """

    inner: ClassVar[PixelMethod]

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        self.inner.check(handle, params)

    def passes(self, params: ExplainParams) -> int:
        return params.samples * self.inner.passes(params)

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, samples = x.shape[0], ctx.params.samples
        total = torch.zeros_like(x)
        delta_total: Tensor | None = None
        chunks = noisy_chunks(x, ctx.params.noise_level, samples, ctx.generator(x.device), ctx.batch_size)
        for noisy, rows in chunks:
            ctx.check_cancel()
            attributions, delta = self.inner.pixel_attributions(ctx, noisy, targets[rows])
            total.index_add_(0, rows, attributions.float())
            if delta is not None:
                if delta_total is None:
                    delta_total = torch.zeros(m, dtype=torch.float32, device=x.device)
                delta_total.index_add_(0, rows, delta.float())
        mean = total / samples
        return Attribution(
            maps=self.inner.to_map(mean),
            attributions=mean,
            delta=None if delta_total is None else delta_total / samples,
        )


@register
class SmoothGrad(NoiseTunnel):
    """SmoothGrad (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825) around ``saliency``.

    Attribution = mean over noisy copies of |∂y_c/∂x| per channel (Captum's
    ``NoiseTunnel(Saliency)`` with ``nt_type="smoothgrad"`` and ``abs=True``); map = max over
    channels. σ relative to the input's range as in the paper (Captum takes an absolute stdev).
    """

    name = "smoothgrad"
    family = "path"
    description = "Saliency averaged over noisy copies of the image (sharper, less noisy maps)."
    paper = "https://arxiv.org/abs/1706.03825"
    inner = Saliency()
    signed = Saliency.signed
    uses = Saliency.uses | NOISE_USES


@register
class SmoothIntegratedGradients(NoiseTunnel):
    """Smooth IG (Smilkov et al. 2017, §4, https://arxiv.org/abs/1706.03825): IG averaged over noise.

    Each noisy copy is explained by ``integrated_gradients`` with the request's baseline, rule and
    steps; the ``blur`` baseline is the blur of that noisy copy, the other baselines do not depend
    on the input. ``delta`` = mean of the per-copy completeness deltas.
    """

    name = "smooth_ig"
    family = "path"
    description = "Integrated Gradients averaged over noisy copies of the image."
    paper = "https://arxiv.org/abs/1706.03825"
    inner = IntegratedGradients()
    signed = IntegratedGradients.signed
    uses = IntegratedGradients.uses | NOISE_USES
