"""How far to trust a map: the metrics of ``POST /v1/models/{model}/evaluate`` on the engine's
explanations. Pure torch (and the upload's geometry for the pointing game); no web imports.

- ``score_maps``: deletion / insertion curves of any maps (``curves``), all stages of all maps
  one stream of batched no-grad forward passes on the model's private copy;
- ``evaluate``: one image, one target, each method's explanation: the curves of every method's
  map and of a seeded random map (the chance baseline), the pointing game, the sanity check;
- ``cost``: the passes all of that takes, for the synchronous budget and the job caps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from service.errors import MethodNotApplicable
from service.evaluation.curves import CurveTask, auc, ranks, run_curves, substitute_image
from service.evaluation.params import POINTING_MARGIN_PX, EvaluateParams
from service.evaluation.sanity import Sanity, block_count, sanity
from service.explainers import Explanation, ModelHandle, get_method
from service.imaging.geometry import Geometry, to_original

CancelFn = Callable[[], bool]
ProgressFn = Callable[[int], None]  # passes done since the last call


@dataclass(frozen=True)
class Pointing:
    hit: bool
    peak: tuple[int, int]  # (x, y) of the map's maximum in uploaded-image pixels


@dataclass
class MethodScores:
    """One method's evaluation; a metric not asked for is ``None`` / absent."""

    method: str
    curves: dict[str, list[float]] = field(default_factory=dict)  # deletion / insertion
    pointing: Pointing | None = None
    sanity: Sanity | None = None

    @property
    def aucs(self) -> dict[str, float]:
        return {kind: auc(values) for kind, values in self.curves.items()}


@dataclass
class Evaluation:
    target: int
    score: float  # the target's softmax probability on the input
    results: list[MethodScores]
    random: dict[str, list[float]]  # the random map's curves

    @property
    def random_aucs(self) -> dict[str, float]:
        return {kind: auc(values) for kind, values in self.random.items()}


# ------------------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------------------
def curve_passes(params: EvaluateParams, maps: int) -> int:
    """Forward passes of the curves of ``maps`` maps: steps + 1 per curve."""
    return maps * len(params.curves) * (params.curve_steps + 1)


def cost(params: EvaluateParams, method_costs: Sequence[int], blocks: int, *, baseline: bool = True) -> int:
    """Passes of one image's evaluation (per target): each method's explanation, the curves of
    its map and, with ``baseline``, of the random map (computed once, shared by the methods), and
    per method ``blocks`` more explanations for the sanity check."""
    sanity_steps = blocks if "sanity" in params.metric_list else 0
    explained = sum(c * (1 + sanity_steps) for c in method_costs)
    maps = len(method_costs) + (1 if baseline else 0) if params.curves else 0
    return explained + curve_passes(params, maps)


def check_methods(params: EvaluateParams, methods: Sequence[str]) -> None:
    """``MethodNotApplicable`` for a sanity check of a method it does not apply to
    (``Method.sanity_check``)."""
    if "sanity" not in params.metric_list:
        return
    for name in methods:
        if not get_method(name).sanity_check:
            raise MethodNotApplicable(
                f"the sanity check does not apply to {name}: its map does not depend on the weights",
                field="metrics",
            )


def sanity_blocks(handle: ModelHandle) -> int:
    """Randomisation steps of the sanity check on this model."""
    return block_count(handle.module)


# ------------------------------------------------------------------------------------------------
# the metrics
# ------------------------------------------------------------------------------------------------
def random_map(height: int, width: int, seed: int) -> Tensor:
    """The chance baseline: uniform noise from ``seed`` (drawn on the CPU: the same on any device)."""
    return torch.rand(height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def score_maps(
    handle: ModelHandle,
    x: Tensor,
    maps: Sequence[Tensor],
    images: Sequence[int],
    targets: Sequence[int],
    *,
    kinds: Sequence[str],
    steps: int,
    substitute: str,
    batch_size: int,
    keep: str | None = None,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, list[float]]]:
    """The ``kinds`` curves of each map: ``maps[j]`` (H, W) of input ``x[images[j]]`` for class
    ``targets[j]``. ``x`` (N, C, H, W) is normalised. Runs on the handle's private copy (the one
    kept for layer ``keep``, so a CAM explanation's copy is reused), holding the replica's lock."""
    if not kinds or not maps:
        return [{} for _ in maps]
    xd = x.detach().to(handle.device, torch.float32)
    lo, _ = handle.pixel_bounds(int(xd.shape[1]))
    used = sorted(set(images))
    subs = {i: substitute_image(xd[i], substitute, lo) for i in used}
    tasks = [
        CurveTask(
            image=i,
            substitute=subs[i],
            ranks=ranks(m.to(handle.device)),
            kind=kind,
            target=int(t),
        )
        for m, i, t in zip(maps, images, targets, strict=True)
        for kind in kinds
    ]
    with handle.lock:
        model = handle.prepared(keep=keep)
        curves = run_curves(
            lambda b: model(b), xd, tasks, steps, batch_size=batch_size, cancel=cancel, advance=progress
        )
    out: list[dict[str, list[float]]] = []
    for j in range(len(maps)):
        row = curves[j * len(kinds) : (j + 1) * len(kinds)]
        out.append({kind: [round(float(v), 6) for v in row[n]] for n, kind in enumerate(kinds)})
    return out


def pointing(m: Tensor, geometry: Geometry | None, box: tuple[int, int, int, int]) -> Pointing:
    """The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop",
    ECCV 2016): a hit when the map's maximum, at the uploaded image's resolution, lies inside
    ``box`` (x0, y0, x1, y1) grown by 15 px on each side. The first maximum in raster order."""
    arr = to_original(m, geometry) if geometry is not None else m.detach().float().cpu().numpy()
    arr = np.nan_to_num(arr, nan=-np.inf)
    y, x = np.unravel_index(int(np.argmax(arr)), arr.shape)
    x0, y0, x1, y1 = box
    g = POINTING_MARGIN_PX
    hit = x0 - g <= x <= x1 + g and y0 - g <= y <= y1 + g
    return Pointing(hit=bool(hit), peak=(int(x), int(y)))


def evaluate(
    handle: ModelHandle,
    x: Tensor,
    explanations: Sequence[Explanation],
    params: EvaluateParams,
    *,
    seed: int,
    batch_size: int,
    geometry: Geometry | None = None,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> Evaluation:
    """Evaluate each explanation of one image ``x`` (1, C, H, W) for its single target (each
    explanation is (1, 1, H, W), all for the same class), as ``params`` asks."""
    if int(x.shape[0]) != 1 or any(e.maps.shape[:2] != (1, 1) for e in explanations):
        raise ValueError("evaluate takes one image and one target per explanation")
    target = int(explanations[0].targets[0, 0])
    if any(int(e.targets[0, 0]) != target for e in explanations):
        raise ValueError("every explanation must be for the same target")
    _, _, h, w = x.shape
    results = [MethodScores(method=e.method) for e in explanations]
    random: dict[str, list[float]] = {}
    kinds = params.curves
    if kinds:
        maps = [e.maps[0, 0] for e in explanations] + [random_map(h, w, seed)]
        keep = next((e.params.layer for e in explanations if e.params.layer), None)
        curves = score_maps(
            handle,
            x,
            maps,
            [0] * len(maps),
            [target] * len(maps),
            kinds=kinds,
            steps=params.curve_steps,
            substitute=params.substitute,
            batch_size=batch_size,
            keep=keep,
            cancel=cancel,
            progress=progress,
        )
        for r, c in zip(results, curves, strict=False):
            r.curves = c
        random = curves[-1]
    box = params.rect
    if "pointing" in params.metric_list and box is not None:
        for r, e in zip(results, explanations, strict=True):
            r.pointing = pointing(e.maps[0, 0], geometry, box)
    if "sanity" in params.metric_list:
        for r, e in zip(results, explanations, strict=True):
            r.sanity = sanity(handle, x, e.method, e.params, target, e.maps[0, 0], seed=seed, cancel=cancel)
    return Evaluation(
        target=target, score=float(explanations[0].scores[0, 0]), results=results, random=random
    )
