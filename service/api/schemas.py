"""Response bodies of the API contract (shared/API.md), as pydantic models for the OpenAPI file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelError(Schema):
    """Why a model is unavailable: a problem object (RFC 9457), never internals."""

    type: str = Field(examples=["urn:saliency:problem:model-load-error"])
    title: str
    status: int
    detail: str


class ModelInfo(Schema):
    name: str
    source: Literal["builtin", "torchvision", "timm", "torchscript", "export"]
    architecture: str
    num_classes: int | None = Field(description="null only for a model that failed to load")
    input_size: list[int] | None = Field(description="[C, H, W]; null only for a model that failed to load")
    device: str = Field(examples=["cpu", "cuda:0"])
    target_layer: str | None = Field(description="dotted module name CAM methods use by default")
    methods: list[str] = Field(description="names of the methods that work on this model")
    ready: bool
    error: ModelError | None = Field(
        None, description="while a model that failed to load or warm up is unavailable: why"
    )


class LayerInfo(Schema):
    name: str = Field(description="dotted module name, for the `layer` parameter")
    type: str = Field(description="the module's class")
    layout: Literal["nchw", "nhwc", "tokens"] = Field(
        description="how its output reads as a map: channels first, channels last, or a token sequence"
    )
    shape: list[int] = Field(description="[C, h, w] after the layout is undone")
    prefix_tokens: int = Field(
        description="tokens dropped before the patch grid (class, distillation, register)"
    )
    default: bool = Field(description="the layer CAM methods use when `layer` is not given")


class LayerList(Schema):
    layers: list[LayerInfo]


class ModelList(Schema):
    models: list[ModelInfo]


class MethodInfo(Schema):
    name: str
    family: Literal["cam", "gradient", "path", "perturbation", "attention"]
    description: str
    paper: str = Field(description="URL of the paper")
    parameters: dict[str, Any] = Field(description="JSON Schema of the method's parameters")
    rendering: dict[str, Any] = Field(
        description="how its maps are shown unless a request says otherwise: the rendering "
        "parameters' defaults for this method, as its paper's figures show them",
    )


class MethodList(Schema):
    methods: list[MethodInfo]


class Prediction(Schema):
    index: int
    label: str
    probability: float


class PredictResponse(Schema):
    model: str
    predictions: list[Prediction]
    elapsed_ms: float


class Target(Schema):
    index: int
    label: str
    score: float = Field(description="softmax probability of the class")


class ExplanationItem(Schema):
    image_index: int | None = Field(None, description="jobs only: the image's position in the upload")
    target: Target
    shape: list[int] = Field(description="[H, W], or [C, H, W] with reduction=none")
    heatmap: list[Any] = Field(description="nested lists of floats, shaped as `shape`")
    min: float = Field(description="smallest raw value of the map")
    max: float = Field(description="largest raw value of the map")
    completeness_delta: float | None = Field(
        description="path methods: sum of attributions − (f(x) − f(baseline))"
    )


class ExplainResponse(Schema):
    model: str
    method: str
    parameters: dict[str, Any] = Field(description="every parameter as resolved, defaults included")
    elapsed_ms: float
    explanations: list[ExplanationItem]


class CompareResponse(Schema):
    model: str
    methods: list[str]
    elapsed_ms: float
    results: list[ExplainResponse] = Field(description="the explain JSON of each method, in order")


class Problem(Schema):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:saliency:problem:unknown-model"])
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, Any]] | None = Field(
        None, description="on 422: one {field, message} per invalid field"
    )


class Health(Schema):
    status: Literal["ok", "loading", "failed"]
    detail: str | None = None
    models: dict[str, bool] = Field(default_factory=dict, description="model name → ready")


class NotReadyProblem(Problem):
    """``/readyz``'s 503: a problem, with the readiness state and each model's."""

    state: Literal["loading", "failed"]
    models: dict[str, bool] = Field(default_factory=dict, description="model name → ready")
