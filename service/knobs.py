"""Parameters declared once.

A parameter is a field of a frozen dataclass made with ``knob()``: its type is the field's
annotation; the declaration carries the default, the bounds, the allowed values and the
description. Everything else is derived from it:

- validation (``check``, which the dataclass runs in ``__post_init__``, so no invalid value
  object exists anywhere: API, engine, job spec or job store);
- the JSON Schema of a parameter (``schema``: ``GET /v1/methods``);
- in the web layer, the pydantic request fields, the OpenAPI schemas and examples, the query
  parameters of ``GET /v1/jobs/{id}/result`` and the echo of resolved parameters.

The engine's parameters (``service.explainers.params.ExplainParams``) and the rendering
parameters (``service.imaging.options.RenderParams``) are declared this way. Pure Python: no web
imports.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from service.errors import InvalidParameter


@dataclass(frozen=True)
class Knob:
    """One declared parameter."""

    name: str
    annotation: Any  # the field's resolved type, e.g. int, str | None, Literal["a", "b"]
    default: Any
    doc: str
    ge: float | None = None
    le: float | None = None
    lt: float | None = None
    #: allowed values of a ``str`` parameter whose set is only known at run time (colormaps);
    #: a ``Literal`` annotation gives them otherwise
    choices: tuple[str, ...] | None = None
    #: a client may set it (``False``: set by the server, e.g. from its settings)
    request: bool = True
    #: a request that leaves it unset gets the server's configured value, not ``default``
    server_default: bool = False
    #: a request that leaves it unset gets the method's own default, resolved once the method is
    #: known (the rendering defaults of ``GET /v1/methods``, a method's ``Method.defaults``);
    #: ``default`` is the value for methods that declare none (``None``: each method declares one)
    method_default: bool = False

    @property
    def nullable(self) -> bool:
        return type(None) in _members(self.annotation)

    @property
    def base(self) -> Any:
        """The annotation without ``None``."""
        kept = [a for a in _members(self.annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else Union[tuple(kept)]  # noqa: UP007

    @property
    def allowed(self) -> tuple[Any, ...] | None:
        """The values a ``Literal`` annotation or ``choices`` allow; ``None``: any of the type."""
        if self.choices is not None:
            return self.choices
        base = self.base
        return get_args(base) if get_origin(base) is Literal else None


def knob(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    request: bool = True,
    server_default: bool = False,
    method_default: bool = False,
) -> Any:
    """A dataclass field declaring one parameter (see the module docstring)."""
    spec = {
        "doc": doc,
        "ge": ge,
        "le": le,
        "lt": lt,
        "choices": choices,
        "request": request,
        "server_default": server_default,
        "method_default": method_default,
    }
    return field(default=default, metadata={"knob": spec})


def knobs(cls: type) -> tuple[Knob, ...]:
    """The declared parameters of dataclass ``cls``, in declaration order."""
    return _knobs(cls)


@cache
def _knobs(cls: Any) -> tuple[Knob, ...]:
    hints = typing.get_type_hints(cls)
    out: list[Knob] = []
    for f in fields(cls):
        spec = f.metadata.get("knob")
        if spec is None:
            continue
        out.append(Knob(name=f.name, annotation=hints[f.name], default=f.default, **spec))
    return tuple(out)


@cache
def method_default_names(cls: type) -> frozenset[str]:
    """The names of the parameters of ``cls`` declared with a per-method default."""
    return frozenset(k.name for k in knobs(cls) if k.method_default)


def request_knobs(cls: type) -> tuple[Knob, ...]:
    """The parameters of ``cls`` a client may set."""
    return tuple(k for k in knobs(cls) if k.request)


def check(obj: Any) -> None:
    """``InvalidParameter`` naming the first parameter of ``obj`` whose value is not allowed."""
    for k in knobs(type(obj)):
        check_value(k, getattr(obj, k.name))


def check_value(k: Knob, value: Any) -> None:
    if value is None:
        if not k.nullable:
            raise InvalidParameter(f"{k.name} is required", field=k.name)
        return
    allowed = k.allowed
    if allowed is not None:
        if value not in allowed:
            raise InvalidParameter(f"{k.name} must be one of {', '.join(map(str, allowed))}", field=k.name)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if k.ge is not None and value < k.ge:
        raise InvalidParameter(f"{k.name} must be ≥ {k.ge} (got {value})", field=k.name)
    if k.le is not None and value > k.le:
        raise InvalidParameter(f"{k.name} must be ≤ {k.le} (got {value})", field=k.name)
    if k.lt is not None and value >= k.lt:
        raise InvalidParameter(f"{k.name} must be < {k.lt} (got {value})", field=k.name)


_JSON_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def schema(k: Knob) -> dict[str, Any]:
    """The JSON Schema of one parameter: description, default, type, enum and bounds."""
    out: dict[str, Any] = {"description": k.doc, "default": k.default}
    allowed = k.allowed
    base = str if allowed is not None else k.base
    kind = _JSON_TYPES.get(base, "string")
    out["type"] = [kind, "null"] if k.nullable else kind
    if allowed is not None:
        out["enum"] = list(allowed)
    for bound, key in ((k.ge, "minimum"), (k.le, "maximum"), (k.lt, "exclusiveMaximum")):
        if bound is not None:
            out[key] = bound
    return out


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)
