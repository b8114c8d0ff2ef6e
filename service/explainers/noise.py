"""The noise wrapper: any pixel method averaged over noisy copies of its input.

SmoothGrad (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825) is ``NoiseTunnel`` around
``saliency``; Smooth IG is the same wrapper around ``integrated_gradients`` (like Captum's
``NoiseTunnel``: composed, not forked). The inner method's code runs unchanged on the noisy copies.

Noise, as in the paper: the s-th copy of image i is x_i + σ_i ε_s with ε_s ~ N(0, I) and
σ_i = ``noise_level`` × (max(x_i) − min(x_i)), the range taken over the image's normalised values.
ε_s is drawn by a generator of its own, seeded from (seed, s) (``sample_seed``), on the model's
device — every image uses the same ε_s — so an image's result depends only on the image, the seed
and the parameters, never on its batch or ``batch_size``. Drawing where the model runs (a CUDA
generator on a GPU) avoids host-side drawing and copying, so the same seed gives other noise on a
GPU than on the CPU. On the CPU the samples are drawn in parallel threads (the generator, not
memory, bounds the drawing). The per-channel attributions are
averaged in float32 over the ``samples`` copies, then reduced to a map as the inner method reduces
its own (saliency: max over channels of the averaged |∇|).

Memory: the samples × pairs copies are made and explained in chunks of ``batch_size`` copies (the
inner method chunks its own passes the same way); nothing of size samples × image, let alone
samples × steps × image, is held.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, Method, ModelHandle, RunContext, register
from service.explainers.figures import GRADIENT_MAGNITUDE
from service.explainers.gradient import PixelMethod, Saliency
from service.explainers.params import ExplainParams
from service.explainers.path import IntegratedGradients

NOISE_USES = frozenset({"samples", "noise_level", "seed"})


def noise_sigma(x: Tensor, noise_level: float) -> Tensor:
    """σ_i = noise_level × (max − min) of each image's values, shaped (M,)."""
    flat = x.flatten(1)
    return noise_level * (flat.amax(dim=1) - flat.amin(dim=1))


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, sample: int) -> int:
    """The seed of noise sample ``sample``: SplitMix64 of (seed, sample), so streams don't overlap."""
    z = (seed + (sample + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % 2**63


def draw_sample(out: Tensor, seed: int, sample: int) -> None:
    """ε_sample ~ N(0, I) into ``out`` (one (C, H, W) image), from its own generator on out's device."""
    g = torch.Generator(device=out.device)
    g.manual_seed(sample_seed(seed, sample))
    torch.randn(out.shape, generator=g, out=out)


_DRAWERS: ThreadPoolExecutor | None = None
_DRAWERS_LOCK = threading.Lock()


def _forget_drawers() -> None:
    """In a forked child (Celery's prefork workers) the parent's threads are gone: start afresh."""
    global _DRAWERS, _DRAWERS_LOCK
    _DRAWERS, _DRAWERS_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_drawers)


def _drawers() -> ThreadPoolExecutor:
    global _DRAWERS
    with _DRAWERS_LOCK:
        if _DRAWERS is None:
            _DRAWERS = ThreadPoolExecutor(
                max_workers=max(1, torch.get_num_threads()), thread_name_prefix="noise"
            )
        return _DRAWERS


def draw_samples(first: int, count: int, shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """ε_first … ε_{first+count−1}, shaped (count, *shape), float32 on ``device``.

    Each sample has its own generator (``sample_seed``), so samples can be drawn in any order and
    in parallel: on the CPU the draws, which are bound by the generator (~8 ns a number, one core),
    are spread over threads; a GPU draws them itself.
    """
    out = torch.empty((count, *shape), dtype=torch.float32, device=device)
    if device.type != "cpu" or count == 1:
        for j in range(count):
            draw_sample(out[j], seed, first + j)
        return out
    list(_drawers().map(lambda j: draw_sample(out[j], seed, first + j), range(count)))
    return out


def noisy_chunks(
    x: Tensor, noise_level: float, samples: int, seed: int, chunk: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(noisy copies, their image indices) in chunks of ``chunk``, sample-major over all images."""
    m = x.shape[0]
    sigma = noise_sigma(x, noise_level).view(-1, 1, 1, 1)
    for start in range(0, m * samples, chunk):
        flat = torch.arange(start, min(m * samples, start + chunk))  # indices on the CPU: no syncs
        s, i = flat // m, flat % m
        first, last = int(s[0]), int(s[-1])
        eps = draw_samples(first, last - first + 1, tuple(x.shape[1:]), seed, x.device)
        if m == 1:  # one copy per sample: scale and shift the draws in place
            yield eps.mul_(sigma[0]).add_(x[0]), i.to(x.device)
        else:
            i = i.to(x.device)
            yield x[i] + sigma[i] * eps[(s - first).to(x.device)], i  # the same rounding as above


def noisy_inputs(x: Tensor, noise_level: float, samples: int, seed: int) -> Tensor:
    """Every noisy copy the wrapper explains, shaped (samples, M, C, H, W) — for tests and debugging.

    Uses the same code path as ``NoiseTunnel``.
    """
    copies = torch.cat([c for c, _ in noisy_chunks(x.float(), noise_level, samples, seed, chunk=x.shape[0])])
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

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        return params.samples * self.inner.cost(params, handle)

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, samples = x.shape[0], ctx.params.samples
        total = torch.zeros_like(x)
        delta_total: Tensor | None = None
        chunks = noisy_chunks(x, ctx.params.noise_level, samples, ctx.seed, ctx.batch_size)
        for noisy, rows in chunks:
            ctx.check_cancel()
            part = self.inner.pixel_attributions(ctx, noisy, targets[rows])
            assert part.attributions is not None
            total.index_add_(0, rows, part.attributions.float())
            delta = part.delta
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

    Shown by default as the paper's figures: the magnitude capped at its 99th percentile, in
    bright pixels over the photo in grey (``figures.GRADIENT_MAGNITUDE``).
    """

    name = "smoothgrad"
    family = "path"
    description = "Saliency averaged over noisy copies of the image (sharper, less noisy maps)."
    paper = "https://arxiv.org/abs/1706.03825"
    inner = Saliency()
    signed = Saliency.signed
    rendering = GRADIENT_MAGNITUDE
    uses = Saliency.uses | NOISE_USES


@register
class SmoothIntegratedGradients(NoiseTunnel):
    """Smooth IG (Smilkov et al. 2017, §4, https://arxiv.org/abs/1706.03825): IG averaged over noise.

    Each noisy copy is explained by ``integrated_gradients`` with the request's baseline, rule and
    steps; the ``blur`` baseline is the blur of that noisy copy, the other baselines do not depend
    on the input. ``delta`` = mean of the per-copy completeness deltas.

    Shown by default as the paper's Smooth IG figures: the absolute attribution capped at its 99th
    percentile, in bright pixels over the photo in grey (``figures.GRADIENT_MAGNITUDE``).
    """

    name = "smooth_ig"
    family = "path"
    description = "Integrated Gradients averaged over noisy copies of the image."
    paper = "https://arxiv.org/abs/1706.03825"
    inner = IntegratedGradients()
    signed = IntegratedGradients.signed
    rendering = GRADIENT_MAGNITUDE
    uses = IntegratedGradients.uses | NOISE_USES
