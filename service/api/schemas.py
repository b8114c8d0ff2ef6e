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
    sanity_check: bool = Field(
        description="whether the evaluate route's sanity check (cascading model randomisation) "
        "applies: the map depends on the model's weights"
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
        None, description="path methods: sum of attributions − (f(x) − f(baseline)); null otherwise"
    )
    deletion_auc: float | None = Field(None, description="with score=true: the deletion curve's AUC")
    insertion_auc: float | None = Field(None, description="with score=true: the insertion curve's AUC")


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


class AUCs(Schema):
    deletion_auc: float | None = None
    insertion_auc: float | None = None


class PointingResult(Schema):
    hit: bool = Field(description="the map's peak lies in the box grown by 15 px on each side")
    peak: list[int] = Field(description="[x, y] of the map's maximum in uploaded-image pixels")


class SanityResult(Schema):
    layers: list[str] = Field(description="blocks randomised, from the output back to the input")
    spearman: list[float] = Field(
        description="rank correlation of the original map with the map after randomising layers[0..i]"
    )


class EvaluationResult(Schema):
    method: str
    deletion_auc: float | None = Field(None, description="lower is better")
    insertion_auc: float | None = Field(None, description="higher is better")
    random: AUCs | None = Field(None, description="the same for a seeded random map: the chance level")
    pointing: PointingResult | None = None
    sanity: SanityResult | None = None
    curves: dict[str, list[float]] | None = Field(
        None, description="the target's probability at stages 0 … curve_steps, per curve"
    )


class EvaluateResponse(Schema):
    model: str
    target: Target
    parameters: dict[str, Any] = Field(description="every parameter as resolved, the seed included")
    elapsed_ms: float
    results: list[EvaluationResult]


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


class KServePredictResponse(Schema):
    predictions: list[list[Prediction]] = Field(description="one list per instance: its top classes")


class KServeExplainResponse(Schema):
    explanations: list[ExplanationItem] = Field(
        description="one entry per instance (and target), in order, each with its image_index"
    )
