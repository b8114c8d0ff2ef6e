"""The request parameters of ``saliency explain`` as command-line options, derived from their
declarations (``ExplainParams``, ``RenderParams``: ``service.knobs``), so the CLI offers what
the API does, with the same names (``noise_level`` is ``--noise-level``), types and choices."""

from __future__ import annotations

import argparse
from typing import Any

from service.knobs import Knob, request_knobs

#: set by options of their own (``--format``), or needing ``format=json`` (``score``)
OWN = frozenset({"format"})


def _type(k: Knob) -> Any:
    base = k.base
    if k.allowed is not None or base not in (int, float):
        return str
    return base


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` per request parameter of the engine and of rendering; unset: the default."""
    from service.explainers import ExplainParams
    from service.imaging.options import RenderParams

    for title, declared in (("method parameters", ExplainParams), ("rendering", RenderParams)):
        group = parser.add_argument_group(title)
        for k in request_knobs(declared):
            if k.name in OWN:
                continue
            allowed = k.allowed
            group.add_argument(
                "--" + k.name.replace("_", "-"),
                dest=k.name,
                type=_type(k),
                choices=list(allowed) if allowed is not None else None,
                default=None,
                help=k.doc,
            )


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The request parameters set on the command line (name → value), ``target``/``top_k`` included."""
    from service.explainers import ExplainParams
    from service.imaging.options import RenderParams

    names = [k.name for d in (ExplainParams, RenderParams) for k in request_knobs(d) if k.name not in OWN]
    out = {name: getattr(args, name, None) for name in [*names, "target", "top_k"]}
    return {k: v for k, v in out.items() if v is not None}
