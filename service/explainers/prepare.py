"""The private, attribution-ready copy of a model.

``prepare_model`` never modifies the model it is given: it deep-copies it, switches the copy to
eval mode and turns every parameter's gradient off, so explanation backward passes compute input
(or activation) gradients only.
"""

from __future__ import annotations

from torch import nn

from service.explainers.base import private_copy


def prepare_model(module: nn.Module, *, keep: str | None = None, optimize: bool = True) -> nn.Module:
    """A private copy of ``module`` for attribution; ``keep`` names a layer whose output must stay exact."""
    del keep, optimize
    return private_copy(module)
