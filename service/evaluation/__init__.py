"""How far to trust a map: deletion and insertion curves, the pointing game and the sanity check.

Pure torch beside the engine (``service.explainers``): no web imports. ``params`` declares the
parameters once; ``curves`` the batched curves and their AUC; ``sanity`` the cascading
randomisation on a private copy; ``evaluate`` puts them together for one image.
"""

from service.evaluation import report
from service.evaluation.evaluate import (
    Evaluation,
    MethodScores,
    Pointing,
    check_methods,
    cost,
    curve_passes,
    evaluate,
    random_map,
    sanity_blocks,
    score_maps,
)
from service.evaluation.params import CURVES, METRICS, EvaluateParams
from service.evaluation.sanity import Sanity

__all__ = [
    "CURVES",
    "METRICS",
    "EvaluateParams",
    "Evaluation",
    "MethodScores",
    "Pointing",
    "Sanity",
    "check_methods",
    "cost",
    "curve_passes",
    "evaluate",
    "random_map",
    "report",
    "sanity_blocks",
    "score_maps",
]
