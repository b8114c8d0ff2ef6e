"""The explanation engine: pure torch, no web imports.

Importing this package registers every method (each module's ``@register`` runs on import).
"""

from service.explainers import cam  # noqa: F401  (registers methods)
from service.explainers.base import (
    Attribution,
    ExplainParams,
    Explanation,
    Method,
    ModelHandle,
    RunContext,
    all_methods,
    get_method,
    method_names,
    register,
)
from service.explainers.engine import explain, predict, resolve_targets

__all__ = [
    "Attribution",
    "ExplainParams",
    "Explanation",
    "Method",
    "ModelHandle",
    "RunContext",
    "all_methods",
    "explain",
    "get_method",
    "method_names",
    "predict",
    "register",
    "resolve_targets",
]
