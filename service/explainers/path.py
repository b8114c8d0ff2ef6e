"""Integrated Gradients: the path family.

IG (Sundararajan et al., ICML 2017, https://arxiv.org/abs/1703.01365) attributes
f(x) − f(x') along the straight path from a baseline x' to the input x:

    IG_i(x) = (x_i − x'_i) · ∫₀¹ ∂f(x' + α(x − x'))/∂x_i dα  ≈  (x_i − x'_i) · Σ_k w_k ∂f(x' + α_k(x − x'))/∂x_i

with f the target's pre-softmax logit and (α_k, w_k) the nodes and weights of an integration rule
on [0, 1] whose weights sum to 1. The steps × pairs passes run in chunks of ``batch_size``: each
chunk's scaled inputs are made on the fly (never all steps at once) and its gradients are summed
into a float32 accumulator per pair. Every result carries the completeness delta
Σ_i IG_i − (f(x) − f(x')) per pair; the two endpoint forwards that it needs count as two passes.
They run first, and their forward of the clean input also gives the engine its target scores (and
top-1 targets); a baseline shared by every pair (all but ``blur``) is run once. When the model
has an affine entry (its first convolution; ``service.explainers.entry``), the steps run from the
entry's output, interpolated, and the weighted gradient sum is pulled back through the entry once
per pair (``gradient_sum_through``): the same sum, without the entry's forward and backward per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial.legendre import leggauss
from numpy.typing import NDArray
from torch import Tensor

from service.errors import InvalidParameter
from service.explainers.base import Attribution, ModelHandle, RunContext, register
from service.explainers.entry import Entry
from service.explainers.figures import POSITIVE_ATTRIBUTION
from service.explainers.gradient import EMPTY, PixelMethod
from service.explainers.params import ExplainParams
from service.explainers.targets import choose

# ------------------------------------------------------------------------------------------------
# integration rules
# ------------------------------------------------------------------------------------------------
Nodes = tuple[NDArray[np.float64], NDArray[np.float64]]


def integration_rule(rule: str, steps: int) -> Nodes:
    """Nodes α_k in [0, 1] and weights w_k (summing to 1) of ``rule`` with ``steps`` points.

    - ``gausslegendre``: Gauss–Legendre nodes/weights (``numpy.polynomial.legendre.leggauss``)
      mapped from [−1, 1] to [0, 1]; exact for polynomial integrands of degree ≤ 2·steps − 1.
    - ``riemann_left`` / ``riemann_right`` / ``riemann_middle``: α_k = k/n, (k+1)/n, (k+½)/n, w = 1/n.
    - ``riemann_trapezoid``: α_k = k/(n−1) (both ends included), w = h·[½, 1, …, 1, ½] with
      h = 1/(n−1), so the weights sum to 1. (Captum uses w = [1/(2n), 1/n, …, 1/n, 1/(2n)], which
      sum to (n−1)/n: its trapezoid attributions are ours × (n−1)/n.) Needs steps ≥ 2.
    """
    n = steps
    if n < 1:
        raise InvalidParameter("steps must be ≥ 1", field="steps")
    k = np.arange(n, dtype=np.float64)
    uniform = np.full(n, 1.0 / n)
    if rule == "gausslegendre":
        nodes, weights = leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if rule == "riemann_left":
        return k / n, uniform
    if rule == "riemann_right":
        return (k + 1.0) / n, uniform
    if rule == "riemann_middle":
        return (k + 0.5) / n, uniform
    if rule == "riemann_trapezoid":
        if n < 2:
            raise InvalidParameter("riemann_trapezoid needs steps ≥ 2", field="steps")
        h = 1.0 / (n - 1)
        weights = np.full(n, h)
        weights[0] = weights[-1] = h / 2
        return k * h, weights
    raise InvalidParameter(f"unknown integration rule {rule!r}", field="rule")


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------
BLUR_SIGMA_FRACTION = 1 / 20
"""σ of the ``blur`` baseline as a fraction of the image's longer side: ≈ 11 px at 224 px, close to
the σ = 10 px of Fong & Vedaldi's blur perturbation (ICCV 2017) used by Sturmfels et al.'s baseline
study (Distill 2020), and scale-free so a 64 px and a 512 px image are blurred alike."""

_UNIFORM_STREAM = 0x5F3759DF  # separates the uniform baseline's stream from SmoothGrad's noise


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (M, C, H, W) with radius ⌈3σ⌉ and edge replication.

    The kernel sums to 1 and the padding replicates edges, so blurring commutes with the per-channel
    affine normalisation: blurring normalised values equals normalising the blurred pixels.
    """
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def uniform_generator(seed: int) -> torch.Generator:
    """The ``uniform`` baseline's generator: seeded from the call's seed, on a stream of its own.

    Smooth IG's noise samples draw from generators seeded from the same call seed
    (``noise.sample_seed``); mixing a constant of its own into the seed keeps the baseline off
    those streams, so it is not a function of any noise sample, and still reproducible.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed((seed ^ _UNIFORM_STREAM) % 2**63)
    return g


def make_baseline(name: str, x: Tensor, handle: ModelHandle, seed: int) -> Tensor:
    """The baseline x' for each row of ``x`` (M, C, H, W, normalised space), float32.

    - ``black`` / ``white``: pixel intensity 0 / 1 in every channel, normalised (``pixel_bounds``).
    - ``mean``: zero in normalised space (the dataset mean colour).
    - ``blur``: the input blurred with σ = ``BLUR_SIGMA_FRACTION`` × its longer side.
    - ``uniform``: U[0, 1] noise in pixel space, normalised; one draw of shape (C, H, W) from
      ``uniform_generator(seed)`` shared by every row (as if each image drew from a fresh
      generator), so a row's baseline does not depend on its batch.
    """
    m, c, h, w = x.shape
    x = x.float()
    if name == "mean":
        return torch.zeros_like(x)
    if name == "blur":
        return gaussian_blur(x, BLUR_SIGMA_FRACTION * max(h, w))
    lo, hi = handle.pixel_bounds(c)
    lo, hi = lo.to(x.device), hi.to(x.device)
    if name == "black":
        return lo.expand(m, c, h, w).clone()
    if name == "white":
        return hi.expand(m, c, h, w).clone()
    if name == "uniform":
        u = torch.rand((c, h, w), generator=uniform_generator(seed)).to(x.device)
        return (lo + u * (hi - lo)).expand(m, c, h, w).clone()
    raise InvalidParameter(f"unknown baseline {name!r}", field="baseline")


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@register
class IntegratedGradients(PixelMethod):
    """Integrated Gradients (Sundararajan et al., ICML 2017, https://arxiv.org/abs/1703.01365).

    Attribution = (x − x') ⊙ Σ_k w_k ∇f(x' + α_k(x − x')) per channel (signed; map = sum over
    channels, so the map's total is Σ IG = f(x) − f(x') + delta). Baselines: see ``make_baseline``;
    rules: see ``integration_rule`` (the trapezoid weights sum to 1, unlike Captum's). Passes per
    pair: ``steps`` forward+backward passes plus the 2 endpoint forwards of the delta.

    Shown by default as the authors draw it (the paper's Fig. 2 and their visualisation library):
    the positive attributions, clipped at a high percentile, as coloured pixels over the photo in
    grey (``figures.POSITIVE_ATTRIBUTION``).
    """

    name = "integrated_gradients"
    family = "path"
    description = "Gradients integrated along the straight path from a baseline image to the input."
    paper = "https://arxiv.org/abs/1703.01365"
    signed = True
    rendering = POSITIVE_ATTRIBUTION
    picks_targets = True
    uses: ClassVar[frozenset[str]] = frozenset(
        {"steps", "baseline", "rule", "seed", "batch_size", "precision"}
    )

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        integration_rule(params.rule, params.steps)

    def passes(self, params: ExplainParams) -> int:
        return params.steps + 2

    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        nodes, weights = integration_rule(ctx.params.rule, ctx.params.steps)
        steps = len(nodes)
        alpha = torch.tensor(nodes, dtype=torch.float32, device=x.device)
        weight = torch.tensor(weights, dtype=torch.float32, device=x.device)
        baseline = make_baseline(ctx.params.baseline, x, ctx.handle, ctx.seed)
        # The endpoints first: their forward of the clean rows is the pass that scores (and, for
        # top-1, chooses) the targets, so the engine runs no forward pass of its own.
        ends = endpoint_logits(ctx, x, baseline, targets, shared=ctx.params.baseline != "blur")
        targets = ends.targets
        diff = x - baseline

        entry = ctx.entry()
        if entry is None:
            total = torch.zeros_like(x)  # Σ_k w_k ∇f at the scaled inputs, per pair
            for sl in ctx.chunks(x.shape[0] * steps):
                flat = torch.arange(sl.start, sl.stop, device=x.device)
                pair, step = flat // steps, flat % steps
                a = alpha[step].view(-1, 1, 1, 1)
                grad = ctx.input_gradients(baseline[pair] + a * diff[pair], targets[pair]).grad
                total.index_add_(0, pair, grad * weight[step].view(-1, 1, 1, 1))
                ctx.advance(sl.stop - sl.start)
        else:
            shared = ctx.params.baseline != "blur"
            total = gradient_sum_through(entry, ctx, x, baseline, targets, alpha, weight, shared=shared)

        attributions = diff * total
        delta = attributions.sum(dim=(1, 2, 3)) - (ends.f_x - ends.f_base)
        return Attribution(
            maps=EMPTY, attributions=attributions, delta=delta, logits=ends.logits, targets=targets
        )


def gradient_sum_through(
    entry: Entry,
    ctx: RunContext,
    x: Tensor,
    baseline: Tensor,
    targets: Tensor,
    alpha: Tensor,
    weight: Tensor,
    *,
    shared: bool,
) -> Tensor:
    """Σ_k w_k ∇f(x' + α_k(x − x')) per pair, for a model with an affine entry E (``entry``):
    the same sum as the plain loop, with E's forward run once per input and baseline and its
    backward once per pair (see ``service.explainers.entry``).

    The steps × pairs rows run in the same chunks of ``batch_size`` as the plain loop; each row's
    E-output is E(x') + α_k(E(x) − E(x')), its gradient at E's output is summed (weighted, float32)
    per pair, and a pair's sum is pulled back through E when its last step has run, so only the
    pairs of the current chunk are held at E's resolution.
    """
    model, steps, m = ctx.model, len(alpha), x.shape[0]
    autocast = ctx.autocast
    # a shared baseline's E-output once; a per-pair one (blur) with its pair's, when first needed
    shared_base = entry.outputs(model, baseline[:1], autocast) if shared else None
    total = torch.empty_like(x)
    lo = hi = 0  # the pairs [lo, hi) held: their E-output differences and gradient sums
    held_diff = held_sum = held_base = torch.empty(0, device=x.device)

    def release(upto: int) -> None:
        nonlocal lo, held_diff, held_sum, held_base
        if upto > lo:
            n = upto - lo
            total[lo:upto] = entry.pullback(model, x[lo:upto], held_sum[:n], autocast)
            held_diff, held_sum, lo = held_diff[n:], held_sum[n:], upto
            held_base = held_base if shared else held_base[n:]

    for sl in ctx.chunks(m * steps):
        release(sl.start // steps)  # pairs whose steps all ran
        last = (sl.stop - 1) // steps + 1
        if last > hi:
            h_x = entry.outputs(model, x[hi:last], autocast)
            if shared_base is not None:
                base = shared_base
            else:
                base = entry.outputs(model, baseline[hi:last], autocast)
                held_base = _extend(held_base, base)
            held_diff = _extend(held_diff, h_x - base)
            held_sum = _extend(held_sum, torch.zeros_like(h_x))
            hi = last
        # the chunk's rows, pair by pair: E(x') + α_k (E(x) − E(x')) broadcast from one leaf per
        # pair, so the backward of the weighted logits sums each pair's w_k-weighted gradients
        # into its leaf (a reduction, not a scatter)
        leaves: list[Tensor] = []
        parts: list[Tensor] = []
        weights: list[Tensor] = []
        pairs: list[int] = []
        for p in range(sl.start // steps, last):
            first, stop = max(sl.start, p * steps) - p * steps, min(sl.stop, (p + 1) * steps) - p * steps
            start = shared_base if shared_base is not None else held_base[p - lo : p - lo + 1]
            leaf = start.detach().requires_grad_(True)
            a = alpha[first:stop].view(-1, 1, 1, 1)
            parts.append(_Steps.apply(leaf, a, held_diff[p - lo : p - lo + 1]))
            leaves.append(leaf)
            weights.append(weight[first:stop])
            pairs.extend([p] * (stop - first))
        with torch.enable_grad():
            h = parts[0] if len(parts) == 1 else torch.cat(parts)
            logits = entry.logits_from(model, h, x, autocast)
            index = targets[torch.tensor(pairs, device=x.device)].view(-1, 1)
            selected = logits.gather(1, index).squeeze(1)
            grads = torch.autograd.grad((selected * torch.cat(weights)).sum(), leaves)
        for p, grad in zip(range(sl.start // steps, last), grads, strict=True):
            held_sum[p - lo] += grad[0].float()
        ctx.advance(sl.stop - sl.start)
    release(m)
    return total


def _extend(held: Tensor, rows: Tensor) -> Tensor:
    """``rows`` after the rows ``held`` (``held`` may be the empty start, of no shape yet)."""
    return torch.cat([held, rows]) if held.numel() else rows


class _Steps(torch.autograd.Function):
    """Rows ``start`` + α_k · ``diff`` of one pair's steps, broadcast from (1, …) ``start`` and
    ``diff``; the backward sums the rows' gradients into ``start`` as a matrix product (summing a
    channels_last batch over its first dimension with ``Tensor.sum`` is ~20× slower on the CPU)."""

    @staticmethod
    def forward(ctx: Any, start: Tensor, alpha: Tensor, diff: Tensor) -> Tensor:
        return torch.addcmul(start, alpha, diff)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return sum_rows(grad), None, None


def sum_rows(g: Tensor) -> Tensor:
    """``g.sum(0, keepdim=True)`` of a batch in any memory layout, reading it in its own order."""
    rows = g.shape[0]
    if g.dim() == 4 and not g.is_contiguous() and g.is_contiguous(memory_format=torch.channels_last):
        nhwc = g.permute(0, 2, 3, 1)
        ones = torch.ones(1, rows, dtype=g.dtype, device=g.device)
        return (ones @ nhwc.reshape(rows, -1)).view(1, *nhwc.shape[1:]).permute(0, 3, 1, 2)
    return g.sum(0, keepdim=True)


@dataclass
class Endpoints:
    """The forwards at both ends of each pair's path."""

    logits: Tensor  # (M, classes) of the clean inputs
    targets: Tensor  # (M,) chosen (``targets.choose``)
    f_x: Tensor  # (M,) the target's logit at the input
    f_base: Tensor  # (M,) and at the baseline


def endpoint_logits(
    ctx: RunContext, x: Tensor, baseline: Tensor, targets: Tensor, *, shared: bool
) -> Endpoints:
    """Forwards only, float32, in chunks of ``batch_size``: the clean rows' logits (their
    ``PREDICTED`` targets chosen there) and each pair's endpoint logits f(x), f(x').

    ``shared``: every row has the same baseline (all but ``blur``), so one row of it is run for
    all pairs — though it counts as one pass per pair in ``passes`` and progress.
    """
    m = x.shape[0]
    rows = torch.cat([x, baseline[:1] if shared else baseline])
    chosen = targets.clone()
    x_logits: list[Tensor] = []
    base_logits: list[Tensor] = []
    with torch.no_grad():
        for sl in ctx.chunks(rows.shape[0]):
            out = ctx.forward(rows[sl])
            clean = max(0, min(sl.stop, m) - sl.start)
            if clean:
                mine = slice(sl.start, sl.start + clean)
                chosen[mine] = choose(out[:clean], targets[mine])
                x_logits.append(out[:clean])
            if clean < out.shape[0]:
                base_logits.append(out[clean:])
            ctx.advance(out.shape[0])
    if shared and m > 1:
        ctx.advance(m - 1)  # the pairs' other baseline rows, run as one
    index = chosen.view(-1, 1)
    logits = torch.cat(x_logits)
    f_x = logits.gather(1, index).squeeze(1)
    f_base = torch.cat(base_logits).expand(m, -1).gather(1, index).squeeze(1)
    return Endpoints(logits=logits, targets=chosen, f_x=f_x, f_base=f_base)
