"""What the client returns: small dataclasses over the service's JSON, each keeping ``raw`` (the
body as sent) so nothing the server adds is lost."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class ModelInfo:
    """``GET /v1/models/{model}``."""

    name: str
    source: str
    architecture: str
    num_classes: int
    input_size: list[int]
    device: str
    target_layer: str | None
    methods: list[str]
    ready: bool
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(
            name=d["name"],
            source=d.get("source", ""),
            architecture=d.get("architecture", ""),
            num_classes=int(d.get("num_classes", 0)),
            input_size=list(d.get("input_size") or []),
            device=d.get("device", ""),
            target_layer=d.get("target_layer"),
            methods=list(d.get("methods") or []),
            ready=bool(d.get("ready")),
            error=d.get("error"),
            raw=d,
        )


@dataclass(frozen=True)
class LayerInfo:
    """One entry of ``GET /v1/models/{model}/layers``."""

    name: str
    type: str
    layout: str
    shape: list[int]
    prefix_tokens: int
    default: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerInfo:
        return cls(
            name=d["name"],
            type=d.get("type", ""),
            layout=d.get("layout", ""),
            shape=list(d.get("shape") or []),
            prefix_tokens=int(d.get("prefix_tokens", 0)),
            default=bool(d.get("default", False)),
            raw=d,
        )


@dataclass(frozen=True)
class MethodInfo:
    """One entry of ``GET /v1/methods``: ``parameters`` is the JSON Schema of its parameters."""

    name: str
    family: str
    description: str
    paper: str
    parameters: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MethodInfo:
        return cls(
            name=d["name"],
            family=d.get("family", ""),
            description=d.get("description", ""),
            paper=d.get("paper", ""),
            parameters=dict(d.get("parameters") or {}),
            raw=d,
        )


@dataclass(frozen=True)
class Target:
    """A class an explanation is for: its index, label and softmax probability."""

    index: int
    label: str
    score: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Target:
        return cls(index=int(d["index"]), label=str(d.get("label", "")), score=float(d.get("score", 0.0)))


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class PredictResult:
    """``POST /v1/models/{model}/predict``."""

    model: str
    predictions: list[Prediction]
    elapsed_ms: float
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PredictResult:
        preds = [
            Prediction(int(p["index"]), str(p.get("label", "")), float(p["probability"]))
            for p in d.get("predictions", [])
        ]
        return cls(
            model=d.get("model", ""), predictions=preds, elapsed_ms=float(d.get("elapsed_ms", 0)), raw=d
        )


@dataclass(frozen=True)
class Heatmap:
    """One entry of ``explanations``: one image's map for one target, as a float32 array
    ((H, W), or (C, H, W) with ``reduction=none``)."""

    target: Target
    heatmap: NDArray[np.float32]
    min: float
    max: float
    completeness_delta: float | None = None
    image_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Heatmap:
        known = {"target", "shape", "heatmap", "min", "max", "completeness_delta", "image_index"}
        values = np.asarray(d.get("heatmap", []), dtype=np.float32)
        shape = d.get("shape")
        if shape is not None and values.size == int(np.prod(shape)):
            values = values.reshape(shape)
        delta = d.get("completeness_delta")
        index = d.get("image_index")
        return cls(
            target=Target.from_json(d["target"]),
            heatmap=values,
            min=float(d.get("min", 0.0)),
            max=float(d.get("max", 0.0)),
            completeness_delta=None if delta is None else float(delta),
            image_index=None if index is None else int(index),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class ExplainResult:
    """An explanation in the format asked for.

    - ``json``: ``explanations`` holds every image × target as arrays, ``parameters`` every
      parameter as the server resolved it (defaults, drawn seed, chosen layer), ``array`` the maps
      stacked when they share a shape.
    - ``npy``: ``array`` is the float32 stack over targets; ``target`` the first one (headers).
    - ``png`` / ``overlay``: ``image`` holds the PNG bytes; ``target`` the explained class.
    """

    format: str
    model: str | None = None
    method: str | None = None
    parameters: dict[str, Any] | None = None
    elapsed_ms: float | None = None
    explanations: list[Heatmap] = field(default_factory=list)
    target: Target | None = None
    image: bytes | None = field(default=None, repr=False)
    array: NDArray[np.float32] | None = field(default=None, repr=False)
    request_id: str | None = None
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any], *, request_id: str | None = None) -> ExplainResult:
        entries = [Heatmap.from_json(e) for e in d.get("explanations", [])]
        shapes = {e.heatmap.shape for e in entries}
        array = np.stack([e.heatmap for e in entries]) if len(shapes) == 1 else None
        return cls(
            format="json",
            model=d.get("model"),
            method=d.get("method"),
            parameters=d.get("parameters"),
            elapsed_ms=None if d.get("elapsed_ms") is None else float(d["elapsed_ms"]),
            explanations=entries,
            target=entries[0].target if entries else None,
            array=array,
            request_id=request_id,
            raw=d,
        )


def load_npy(data: bytes) -> NDArray[np.float32]:
    """A ``.npy`` body as a float32 array (never unpickles: ``allow_pickle=False``)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return np.asarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class CompareResult:
    """``POST /v1/models/{model}/compare``: the PNG grid, or each method's explanation (json)."""

    format: str
    image: bytes | None = field(default=None, repr=False)
    results: list[ExplainResult] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    request_id: str | None = None
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class MethodScores:
    """One method's entry of ``POST /v1/models/{model}/evaluate`` (keys of metrics not asked for
    are ``None``)."""

    method: str
    deletion_auc: float | None
    insertion_auc: float | None
    random: dict[str, float] | None
    pointing: dict[str, Any] | None
    sanity: dict[str, Any] | None
    curves: dict[str, list[float]] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MethodScores:
        def opt(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(
            method=d["method"],
            deletion_auc=opt("deletion_auc"),
            insertion_auc=opt("insertion_auc"),
            random=d.get("random"),
            pointing=d.get("pointing"),
            sanity=d.get("sanity"),
            curves=d.get("curves"),
            raw=d,
        )


@dataclass(frozen=True)
class EvaluateResult:
    """``POST /v1/models/{model}/evaluate``: scores (json) or the plot of the curves (png)."""

    format: str
    model: str | None = None
    target: Target | None = None
    parameters: dict[str, Any] | None = None
    results: list[MethodScores] = field(default_factory=list)
    image: bytes | None = field(default=None, repr=False)
    request_id: str | None = None
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any], *, request_id: str | None = None) -> EvaluateResult:
        target = d.get("target")
        return cls(
            format="json",
            model=d.get("model"),
            target=None if target is None else Target.from_json(target),
            parameters=d.get("parameters"),
            results=[MethodScores.from_json(r) for r in d.get("results", [])],
            request_id=request_id,
            raw=d,
        )


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class Job:
    """``GET /v1/jobs/{id}``. ``retry_after``: the server's hint (seconds) for the next poll."""

    id: str
    status: JobStatus
    progress: float
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    result_url: str | None
    model: str | None = None
    method: str | None = None
    images: int | None = None
    retry_after: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, d: dict[str, Any], *, retry_after: float | None = None) -> Job:
        return cls(
            id=str(d["id"]),
            status=d["status"],
            progress=float(d.get("progress", 0.0)),
            created_at=_time(d.get("created_at")),
            started_at=_time(d.get("started_at")),
            finished_at=_time(d.get("finished_at")),
            error=d.get("error"),
            result_url=d.get("result_url"),
            model=d.get("model"),
            method=d.get("method"),
            images=None if d.get("images") is None else int(d["images"]),
            retry_after=retry_after,
            raw=d,
        )
