"""The noise wrapper: any pixel method averaged over noisy copies of its input.

SmoothGrad (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825) is ``NoiseTunnel`` around
``saliency``; Smooth IG is the same wrapper around ``integrated_gradients`` (like Captum's
``NoiseTunnel``: composed, not forked). The inner method's code runs unchanged on the noisy copies.
VarGrad and SmoothGrad² take another statistic of the copies' gradients (``aggregate``: the
variance, the mean of squares); GradientSHAP changes the one per-copy step (``explain_copies``: the
gradient at a random point between the baseline and the copy, times their difference).

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
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, Method, ModelHandle, RunContext, register
from service.explainers.figures import GRADIENT_MAGNITUDE, SIGNED_ATTRIBUTION
from service.explainers.gradient import EMPTY, InputGradientMethod, InputXGradient, PixelMethod, Saliency
from service.explainers.params import MAX_NOISE_SAMPLES, ExplainParams
from service.explainers.path import IntegratedGradients, make_baseline

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
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(noisy copies, their image indices on x's device, their sample indices on the CPU) in
    chunks of ``chunk``, sample-major over all images."""
    m = x.shape[0]
    sigma = noise_sigma(x, noise_level).view(-1, 1, 1, 1)
    for start in range(0, m * samples, chunk):
        flat = torch.arange(start, min(m * samples, start + chunk))  # indices on the CPU: no syncs
        s, i = flat // m, flat % m
        first, last = int(s[0]), int(s[-1])
        eps = draw_samples(first, last - first + 1, tuple(x.shape[1:]), seed, x.device)
        if m == 1:  # one copy per sample: scale and shift the draws in place
            yield eps.mul_(sigma[0]).add_(x[0]), i.to(x.device), s
        else:
            i = i.to(x.device)
            yield x[i] + sigma[i] * eps[(s - first).to(x.device)], i, s  # the same rounding as above


def noisy_inputs(x: Tensor, noise_level: float, samples: int, seed: int) -> Tensor:
    """Every noisy copy the wrapper explains, shaped (samples, M, C, H, W) — for tests and debugging.

    Uses the same code path as ``NoiseTunnel``.
    """
    copies = torch.cat(
        [c for c, _, _ in noisy_chunks(x.float(), noise_level, samples, seed, chunk=x.shape[0])]
    )
    return copies.view(samples, *x.shape)


class NoiseTunnel(Method):
    """A statistic of ``inner`` over ``samples`` noisy copies of each input (see the module
    docstring): their mean (``aggregate``), or what a subclass makes of the mean and the mean
    of squares (VarGrad, SmoothGrad²). ``explain_copies`` is the one step a subclass may change
    for the copies themselves (GradientSHAP: a random point on each copy's path).

    ``delta`` (when the inner method reports one, as IG does) is the mean of the per-copy deltas,
    which equals Σ(averaged attributions) − mean_s (f(x + σε_s) − f(x'_s)): the completeness gap of
    the averaged attribution with respect to the averaged endpoint difference.
    """

    inner: ClassVar[PixelMethod]
    limits: ClassVar[Mapping[str, int | float]] = {"samples": MAX_NOISE_SAMPLES}
    #: whether ``aggregate`` reads the mean of the squared attributions
    second_moment: ClassVar[bool] = False

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        self.inner.check(handle, params)

    def passes(self, params: ExplainParams) -> int:
        return params.samples * self.inner.passes(params)

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        return params.samples * self.inner.cost(params, handle)

    def explain_copies(self, ctx: RunContext, noisy: Tensor, targets: Tensor, samples: Tensor) -> Attribution:
        """Per-channel attributions of a chunk of noisy copies (``samples``: each copy's sample
        index, on the CPU): the inner method's, unchanged."""
        return self.inner.pixel_attributions(ctx, noisy, targets)

    def aggregate(self, mean: Tensor, mean_square: Tensor | None) -> Tensor:
        """The per-channel result from the copies' mean (and mean of squares): the mean."""
        return mean

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, samples = x.shape[0], ctx.params.samples
        total = torch.zeros_like(x)
        squares = torch.zeros_like(x) if self.second_moment else None
        delta_total: Tensor | None = None
        chunks = noisy_chunks(x, ctx.params.noise_level, samples, ctx.seed, ctx.batch_size)
        for noisy, rows, sample in chunks:
            ctx.check_cancel()
            part = self.explain_copies(ctx, noisy, targets[rows], sample)
            assert part.attributions is not None
            a = part.attributions.float()
            total.index_add_(0, rows, a)
            if squares is not None:
                squares.index_add_(0, rows, a * a)
            delta = part.delta
            if delta is not None:
                if delta_total is None:
                    delta_total = torch.zeros(m, dtype=torch.float32, device=x.device)
                delta_total.index_add_(0, rows, delta.float())
        result = self.aggregate(total / samples, None if squares is None else squares / samples)
        return Attribution(
            maps=self.inner.to_map(result),
            attributions=result,
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


class SignedGradient(InputGradientMethod):
    """∂y_c/∂x per channel, signed (not registered: the inner method of VarGrad and SmoothGrad²,
    whose statistics are of the signed gradient); map = max over channels of what the wrapper
    makes of it (both statistics are non-negative)."""

    reduction = "max"


@register
class SmoothGradSquared(NoiseTunnel):
    """SmoothGrad² (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825; named and used so by
    Hooker et al. 2019): the mean over noisy copies of (∂y_c/∂x)² per channel — Captum's
    ``NoiseTunnel(Saliency(abs=False), nt_type="smoothgrad_sq")`` with our σ; map = max over
    channels. Shown as the other gradient magnitudes (``figures.GRADIENT_MAGNITUDE``).
    """

    name = "smoothgrad_sq"
    family = "path"
    description = "Mean of the squared gradient over noisy copies of the image."
    paper = "https://arxiv.org/abs/1706.03825"
    inner = SignedGradient()
    rendering = GRADIENT_MAGNITUDE
    uses = Saliency.uses | NOISE_USES
    second_moment = True

    def aggregate(self, mean: Tensor, mean_square: Tensor | None) -> Tensor:
        assert mean_square is not None
        return mean_square


@register
class VarGrad(NoiseTunnel):
    """VarGrad (Adebayo et al. 2018, https://arxiv.org/abs/1810.03307): the variance over noisy
    copies of ∂y_c/∂x per channel, E[g²] − E[g]² (the population variance, as Captum's
    ``NoiseTunnel(nt_type="vargrad")``); map = max over channels. Shown as the other gradient
    magnitudes (``figures.GRADIENT_MAGNITUDE``).
    """

    name = "vargrad"
    family = "path"
    description = "Variance of the gradient over noisy copies of the image."
    paper = "https://arxiv.org/abs/1810.03307"
    inner = SignedGradient()
    rendering = GRADIENT_MAGNITUDE
    uses = Saliency.uses | NOISE_USES
    second_moment = True

    def aggregate(self, mean: Tensor, mean_square: Tensor | None) -> Tensor:
        assert mean_square is not None
        return (mean_square - mean * mean).clamp_(min=0)


_ALPHA_STREAM = 0x6A09E667F3BCC909  # keeps GradientSHAP's path points off the noise streams


def path_points(samples: Tensor, seed: int) -> Tensor:
    """α_s ~ U[0, 1) of each noisy copy, from a generator per sample seeded from (seed, s): every
    image shares sample s's α_s as it shares ε_s, so a result never depends on its batch."""
    out = torch.empty(samples.shape[0])
    for k, s in enumerate(samples.tolist()):
        g = torch.Generator()
        g.manual_seed(sample_seed(seed ^ _ALPHA_STREAM, int(s)))
        out[k] = torch.rand((), generator=g)
    return out


@register
class GradientShap(NoiseTunnel):
    """GradientSHAP (Lundberg & Lee, NeurIPS 2017, https://arxiv.org/abs/1705.07874), as Captum's
    ``GradientShap`` defines it: for each noisy copy x̃_s = x + σε_s, a baseline b drawn from the
    baseline distribution (here the one ``baseline`` of the request: ``make_baseline`` of the copy)
    and α_s ~ U[0, 1) (``path_points``), the attribution ∇f(b + α_s(x̃_s − b)) ⊙ (x̃_s − b),
    averaged over the ``samples`` copies. σ as our other noise methods define it (relative to the
    input's range; Captum's ``stdevs`` is absolute). Signed; map = sum over channels.

    Shown with both signs, as input × gradient (``figures.SIGNED_ATTRIBUTION``).
    """

    name = "gradient_shap"
    family = "path"
    description = "Expected gradients × (input − baseline) at random points between baseline and noisy input."
    paper = "https://arxiv.org/abs/1705.07874"
    inner = InputXGradient()
    signed = True
    rendering = SIGNED_ATTRIBUTION
    uses = Saliency.uses | NOISE_USES | {"baseline"}

    def explain_copies(self, ctx: RunContext, noisy: Tensor, targets: Tensor, samples: Tensor) -> Attribution:
        baseline = make_baseline(ctx.params.baseline, noisy, ctx.handle, ctx.seed)
        alpha = path_points(samples, ctx.seed).to(noisy.device).view(-1, 1, 1, 1)
        diff = noisy - baseline
        grad = ctx.input_gradients(baseline + alpha * diff, targets).grad
        ctx.advance(noisy.shape[0])
        return Attribution(maps=EMPTY, attributions=grad * diff)
