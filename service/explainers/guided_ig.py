"""Guided Integrated Gradients (Kapishnikov et al., CVPR 2021, https://arxiv.org/abs/2106.09788).

IG's straight path from a baseline moves every feature at once, so it crosses regions where the
model's gradient is large for reasons unrelated to the input. Guided IG builds the path as it
goes: at each of ``steps`` steps it moves the ``fraction`` of features with the lowest |gradient|
toward the input until the path's L1 distance to the input has shrunk by 1/``steps`` of the total,
never letting a feature stray more than ``max_dist`` (in α) from where the straight path would
have it. The attribution sums each move times the gradient at the step's start.

As the authors' code (PAIR's ``saliency.core.guided_ig``) computes it, over pixel values in [0, 1]
(the gradient with respect to pixels is the input gradient divided by the normalisation's std)
from the black image, in float64; the quantile that selects the features is numpy's ``lower``
one (the ⌊fraction · (n − 1)⌋-th smallest |gradient|). The path is taken for every pair at once:
each step's gradients run in chunks of ``batch_size`` pairs, then each pair moves on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, RunContext, register
from service.explainers.figures import POSITIVE_ATTRIBUTION
from service.explainers.gradient import EMPTY, PixelMethod
from service.explainers.params import ExplainParams
from service.explainers.path import endpoint_logits, make_baseline
from service.explainers.pixels import pixel_stats, to_input, to_pixels

EPSILON = 1e-9
"""How close (absolute and relative) the L1 distance must come to a step's target (the authors')."""


def guided_step(
    x: Tensor, x_input: Tensor, grad: Tensor, step: int, steps: int, fraction: float, max_dist: float
) -> tuple[Tensor, Tensor]:
    """Step ``step`` of the guided path from ``x`` (one pair's flat features, float64, from the
    black baseline): the new point and the step's attribution, Σ (x_new − x_old) ⊙ grad.

    The authors' ``guided_ig_impl`` loop body with the baseline 0, its masked assignments written
    as ``torch.where`` (the same values; an order of magnitude faster on the CPU).
    """
    grad_actual = grad
    l1_total = float(x_input.abs().sum())
    alpha = (step + 1.0) / steps
    alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    x_min, x_max = x_input * alpha_min, x_input * alpha_max
    l1_target = l1_total * (1 - (step + 1) / steps)
    moving = x_input != 0
    denominator = torch.where(moving, x_input, 1.0)
    kth = math.floor((x.numel() - 1) * fraction) + 1  # numpy's quantile(method="lower")
    attr = torch.zeros_like(x)
    gamma = math.inf
    while gamma > 1.0:
        x_old = x
        x_alpha = torch.where(moving, x / denominator, alpha_max)
        x = torch.where(x_alpha < alpha_min, x_min, x)
        l1_current = float((x - x_input).abs().sum())
        if math.isclose(l1_target, l1_current, rel_tol=EPSILON, abs_tol=EPSILON):
            attr += (x - x_old) * grad_actual
            break
        grad = torch.where(x == x_max, math.inf, grad)
        size = grad.abs()
        threshold = size.kthvalue(kth).values
        s = (size <= threshold) & (grad != math.inf)
        if not bool(s.any()):  # nothing left to move (the authors' loop would spin here)
            break
        l1_s = float(((x - x_max).abs() * s).sum())
        gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else math.inf
        x = torch.where(s, x_max if gamma > 1.0 else x + (x_max - x) * gamma, x)
        attr += (x - x_old) * grad_actual
    return x, attr


@register
class GuidedIntegratedGradients(PixelMethod):
    """Guided Integrated Gradients (Kapishnikov et al., CVPR 2021, https://arxiv.org/abs/2106.09788),
    see the module's docstring. Signed; map = sum over channels, as IG's. The result carries the
    completeness delta Σ attributions − (f(x) − f(black)). Passes per pair: ``steps``
    forward+backward passes plus the 2 endpoint forwards of the delta.
    """

    name = "guided_ig"
    family = "path"
    description = "Gradients integrated along an adaptive path that first moves the pixels the model is least sensitive to."
    paper = "https://arxiv.org/abs/2106.09788"
    signed = True
    rendering = POSITIVE_ATTRIBUTION
    picks_targets = True
    uses: ClassVar[frozenset[str]] = frozenset({"steps", "fraction", "max_dist", "batch_size", "precision"})
    defaults: ClassVar[Mapping[str, Any]] = {"steps": 200}  # the authors' code

    def passes(self, params: ExplainParams) -> int:
        return params.steps + 2

    def pixel_attributions(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        x = x.float()
        m, c = x.shape[:2]
        p = ctx.params
        _, std = pixel_stats(ctx.handle, c, x.device)
        ends = endpoint_logits(ctx, x, make_baseline("black", x, ctx.handle, 0), targets, shared=True)
        targets = ends.targets
        x_input = to_pixels(x, ctx.handle).double().flatten(1)  # the path's end, in pixels
        path = torch.zeros_like(x_input)  # the path's start: black
        attr = torch.zeros_like(x_input)
        grads = torch.empty_like(x_input)
        for step in range(p.steps):
            for sl in ctx.chunks(m):
                rows = to_input(path[sl].float().view(-1, *x.shape[1:]), ctx.handle)
                grads[sl] = (ctx.input_gradients(rows, targets[sl]).grad / std).flatten(1).double()
                ctx.advance(sl.stop - sl.start)
            for i in range(m):
                if bool((x_input[i] != 0).any()):  # an input equal to the baseline: zero attribution
                    path[i], moved = guided_step(
                        path[i], x_input[i], grads[i], step, p.steps, p.fraction, p.max_dist
                    )
                    attr[i] += moved

        attributions = attr.float().view_as(x)
        delta = attributions.sum(dim=(1, 2, 3)) - (ends.f_x - ends.f_base)
        return Attribution(
            maps=EMPTY, attributions=attributions, delta=delta, logits=ends.logits, targets=targets
        )
