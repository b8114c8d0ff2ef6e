"""The explanation engine: pure torch, no web imports.

Importing this package registers every method (each module's ``@register`` runs on import).
"""

from service.explainers import (  # importing a method module registers its methods
    attention,  # noqa: F401
    blur_ig,  # noqa: F401
    cam,  # noqa: F401
    class_cam,  # noqa: F401
    eigencam,  # noqa: F401
    gradient,  # noqa: F401
    guided_ig,  # noqa: F401
    noise,  # noqa: F401
    path,  # noqa: F401
    perturbation,  # noqa: F401
    scorecam,  # noqa: F401
    surrogate,  # noqa: F401
    xrai,  # noqa: F401
)
from service.explainers.base import (
    Attribution,
    Explanation,
    Method,
    ModelHandle,
    RunContext,
    all_methods,
    get_method,
    method_names,
    register,
)
from service.explainers.engine import explain, predict
from service.explainers.params import ExplainParams
from service.explainers.targets import Targets

__all__ = [
    "Attribution",
    "ExplainParams",
    "Explanation",
    "Method",
    "ModelHandle",
    "RunContext",
    "Targets",
    "all_methods",
    "explain",
    "get_method",
    "method_names",
    "predict",
    "register",
]
