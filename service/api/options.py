"""The request parameters of each route, as pydantic models derived from the declarations.

The engine's parameters (``ExplainParams``) and the rendering parameters (``RenderParams``) are
declared once, as ``service.knobs`` fields; ``request_fields`` turns each declaration a client may
set into a pydantic field with the same type, default, bounds and description. So the form
fields, JSON keys, 422 errors and OpenAPI schemas of explain, compare and jobs all follow the
declaration. What is declared here is only what belongs to a route: the targets (``target``,
``top_k``), ``method`` / ``methods`` and a job's ``model``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator

from service.config import Settings
from service.errors import InvalidParameter
from service.evaluation import EvaluateParams
from service.explainers import ExplainParams, Targets, get_method, method_names
from service.imaging.options import RenderParams
from service.knobs import Knob, request_knobs


def request_fields(declared: type) -> dict[str, Any]:
    """pydantic field definitions of the declared parameters a client may set.

    A parameter with a server default is optional in a request (unset: the server's setting),
    and so is one with a per-method default (unset: the method's, which ``GET /v1/methods``
    lists). A parameter whose allowed values are known only at run time lists them as its ``enum``.
    """
    return {k.name: (_annotation(k), _field(k)) for k in request_knobs(declared)}


def _optional(k: Knob) -> bool:
    return k.server_default or k.method_default


def _annotation(k: Knob) -> Any:
    annotation = k.annotation | None if _optional(k) else k.annotation
    if k.choices is None:
        return annotation
    return Annotated[annotation, AfterValidator(_one_of(k.name, k.choices))]


def _field(k: Knob) -> Any:
    doc = k.doc
    if k.method_default and k.default is not None:
        doc = f"{doc}; unset: the method's default (GET /v1/methods), {k.default} for most"
    return Field(
        None if _optional(k) else k.default,
        ge=k.ge,
        le=k.le,
        lt=k.lt,
        description=doc,
        json_schema_extra=None if k.choices is None else {"enum": list(k.choices)},
    )


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        return value

    return check


def field_order(*declared: type) -> tuple[str, ...]:
    """The request parameters of ``declared`` in declaration order (the OpenAPI field order)."""
    return tuple(k.name for d in declared for k in request_knobs(d))


# ------------------------------------------------------------------------------------------------
# the route models
# ------------------------------------------------------------------------------------------------
class RequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictOptions(RequestOptions):
    """Parameters of ``POST /v1/models/{model}/predict``."""

    top_k: int = Field(5, ge=1, description="how many of the best classes to return")


# Models whose fields come from a declaration are made with ``create_model``; to the type checker
# they are their base class, and their fields are read through ``render()`` / ``engine_params()``.
if TYPE_CHECKING:
    _RenderFields = RequestOptions
else:
    _RenderFields = create_model("_RenderFields", __base__=RequestOptions, **request_fields(RenderParams))


class RenderOptions(_RenderFields):
    """How maps are rendered: shared by explain, compare and job results (``RenderParams``)."""

    def render(self) -> RenderParams:
        return RenderParams.from_values(self.model_dump())


if TYPE_CHECKING:
    _EngineFields = RenderOptions
else:
    _EngineFields = create_model("_EngineFields", __base__=RenderOptions, **request_fields(ExplainParams))


class TargetOptions(_EngineFields):
    """Which classes to explain, the engine's parameters (``ExplainParams``) and rendering."""

    target: int | None = Field(None, ge=0, description="class index; unset: the top-1 predicted class")
    top_k: int = Field(1, ge=1, description="explain the k best classes instead of one target")

    def engine_params(self, settings: Settings) -> ExplainParams:
        """The engine's parameters: the request's, the server's where it leaves them unset, and
        the ones with a per-method default it leaves unset named in ``unset`` (the engine fills
        them in for each method: ``ExplainParams.for_method``)."""
        given = self.model_dump(include=set(field_order(ExplainParams)))
        values: dict[str, Any] = settings.engine_defaults()
        unset: list[str] = []
        for k in request_knobs(ExplainParams):
            value = given[k.name]
            if value is None and k.method_default:
                unset.append(k.name)
            elif value is not None or not k.server_default:
                values[k.name] = value
        return ExplainParams(**values, unset=tuple(unset))

    def targets(self, images: int, num_classes: int) -> Targets:
        """The request's targets for ``images`` images, checked against the model's classes."""
        if self.target is not None and "top_k" in self.model_fields_set and self.top_k != 1:
            raise InvalidParameter("give either target or top_k, not both", field="top_k")
        return Targets.resolve(target=self.target, top_k=self.top_k, images=images, num_classes=num_classes)


class ExplainOptions(TargetOptions):
    """Parameters of ``POST /v1/models/{model}/explain`` (and of jobs)."""

    method: str = Field(
        "gradcam", description="attribution method", json_schema_extra=lambda s: _enum(s, method_names())
    )
    score: bool = Field(
        False,
        description="JSON only: add deletion_auc and insertion_auc (the evaluate route's defaults: "
        "50 curve steps, blur substitute) to each explanation; costs 2 × 51 forward passes a map",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return get_method(value).name  # UnknownMethod (422) lists the known names


DEFAULT_COMPARE = (
    "gradcam",
    "gradcam_pp",
    "layercam",
    "eigencam",
    "saliency",
    "guided_backprop",
    "integrated_gradients",
)


class CompareOptions(TargetOptions):
    """Parameters of ``POST /v1/models/{model}/compare``."""

    methods: str | None = Field(
        None,
        description="comma-separated method names; unset: "
        + ", ".join(DEFAULT_COMPARE)
        + " (those available on the model)",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str | None) -> str | None:
        return None if value is None else known_methods(value)

    def method_list(self, available: Sequence[str]) -> list[str]:
        """The requested methods, or the default set restricted to what the model supports."""
        if self.methods is not None:
            return self.methods.split(",")
        return [m for m in DEFAULT_COMPARE if m in available] or list(available)[:1]


def known_methods(value: str) -> str:
    """Comma-separated method names, each known (``UnknownMethod``, 422, lists them), deduplicated."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError("give at least one method name")
    return ",".join(dict.fromkeys(get_method(n).name for n in names))


if TYPE_CHECKING:
    _EvaluateFields = TargetOptions
else:
    _EvaluateFields = create_model(
        "_EvaluateFields", __base__=TargetOptions, **request_fields(EvaluateParams)
    )


def evaluate_params(options: RequestOptions) -> EvaluateParams:
    """The evaluation's parameters among a request's options (``InvalidParameter`` names the field)."""
    return EvaluateParams(**options.model_dump(include=set(field_order(EvaluateParams))))


class EvaluateOptions(_EvaluateFields):
    """Parameters of ``POST /v1/models/{model}/evaluate``: the methods, the evaluation's
    parameters (``EvaluateParams``), the targets and the engine's parameters."""

    methods: str = Field("gradcam", description="comma-separated method names to evaluate")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        return known_methods(value)

    def method_list(self) -> list[str]:
        return self.methods.split(",")


if TYPE_CHECKING:
    _JobFields = ExplainOptions
else:
    _JobFields = create_model("_JobFields", __base__=ExplainOptions, **request_fields(EvaluateParams))


class JobOptions(_JobFields):
    """Parameters of ``POST /v1/jobs``: the model, the task, the explain parameters and, for
    ``task=evaluate``, the evaluation's."""

    model: str = Field(description="the model's name (see GET /v1/models)")
    task: Literal["explain", "evaluate"] = Field(
        "explain",
        description="explain: the maps; evaluate: per-image deletion/insertion (and sanity) scores "
        "of `methods`, with each method's mean and standard deviation",
    )
    methods: str | None = Field(
        None, description="task=evaluate: comma-separated method names; unset: `method`"
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str | None) -> str | None:
        return None if value is None else known_methods(value)

    def method_list(self) -> list[str]:
        return self.methods.split(",") if self.methods else [self.method]


def _enum(schema: dict[str, Any], values: Sequence[str]) -> None:
    schema["enum"] = list(values)


# ------------------------------------------------------------------------------------------------
# rendering parameters as query parameters (``GET /v1/jobs/{id}/result``)
# ------------------------------------------------------------------------------------------------
def render_query(*, exclude: frozenset[str] = frozenset()) -> Callable[..., dict[str, Any]]:
    """A FastAPI dependency that reads the rendering parameters from the query string.

    Its signature is built from ``RenderParams``, so FastAPI validates each value against its
    type and bounds and documents it. It returns the parameters given (unset ones left out).
    """

    def read(**given: Any) -> dict[str, Any]:
        return {k: v for k, v in given.items() if v is not None}

    parameters = []
    for k in request_knobs(RenderParams):
        if k.name in exclude:
            continue
        query = Query(
            ge=k.ge,
            le=k.le,
            description=k.doc,
            json_schema_extra=None if k.choices is None else {"enum": list(k.choices)},
        )
        parameters.append(
            inspect.Parameter(
                k.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[k.base | None, query],
            )
        )
    read.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
    return read
