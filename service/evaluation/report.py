"""An evaluation as JSON: the body of ``POST /v1/models/{model}/evaluate`` (its ``results``) and
of an evaluate job (per-image scores, each method's mean and standard deviation). Pure Python:
the API and the job runner both write it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from service.evaluation.curves import auc
from service.evaluation.evaluate import Evaluation, MethodScores
from service.evaluation.params import EvaluateParams

#: the scores a job summarises per method
SCORES = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")


def _r(v: float) -> float:
    return round(v, 6)


def method_entry(
    r: MethodScores, random: dict[str, list[float]], params: EvaluateParams, *, curves: bool = True
) -> dict[str, Any]:
    """One ``results`` entry: the AUCs, the random map's, pointing, sanity, the curves (keys of
    metrics not asked for are absent)."""
    out: dict[str, Any] = {"method": r.method}
    for kind in params.curves:
        out[f"{kind}_auc"] = _r(auc(r.curves[kind]))
    if params.curves:
        out["random"] = {f"{kind}_auc": _r(auc(random[kind])) for kind in params.curves}
    if r.pointing is not None:
        out["pointing"] = {"hit": r.pointing.hit, "peak": list(r.pointing.peak)}
    if r.sanity is not None:
        out["sanity"] = {"layers": r.sanity.layers, "spearman": r.sanity.spearman}
    if curves and params.curves:
        out["curves"] = {kind: r.curves[kind] for kind in params.curves}
    return out


def results(ev: Evaluation, params: EvaluateParams, *, curves: bool = True) -> list[dict[str, Any]]:
    return [method_entry(r, ev.random, params, curves=curves) for r in ev.results]


def flat_scores(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers a job summarises from one ``results`` entry."""
    out: dict[str, float] = {}
    for kind in ("deletion", "insertion"):
        if f"{kind}_auc" in entry:
            out[f"{kind}_auc"] = entry[f"{kind}_auc"]
            out[f"random_{kind}_auc"] = entry["random"][f"{kind}_auc"]
    if "pointing" in entry:
        out["pointing_hit"] = 1.0 if entry["pointing"]["hit"] else 0.0
    if "sanity" in entry and entry["sanity"]["spearman"]:
        out["sanity_final_spearman"] = entry["sanity"]["spearman"][-1]
    return out


def summary(images: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Each method's mean and (population) standard deviation of every score over the images."""
    out: dict[str, Any] = {}
    for method in methods:
        values: dict[str, list[float]] = {}
        for image in images:
            for entry in image["results"]:
                if entry["method"] == method:
                    for name, v in flat_scores(entry).items():
                        values.setdefault(name, []).append(v)
        out[method] = {
            name: {"mean": _r(_mean(vs)), "std": _r(_std(vs)), "n": len(vs)} for name, vs in values.items()
        }
    return out


def _mean(vs: Sequence[float]) -> float:
    return sum(vs) / len(vs) if vs else 0.0


def _std(vs: Sequence[float]) -> float:
    if len(vs) < 2:
        return 0.0
    m = _mean(vs)
    return math.sqrt(sum((v - m) ** 2 for v in vs) / len(vs))
