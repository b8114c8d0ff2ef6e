"""The engine's parameters, each declared once (``service.knobs``).

A new parameter is one ``knob()`` field here plus the method that reads it (its ``Method.uses``);
the request forms and JSON bodies, the OpenAPI schema and example, ``GET /v1/methods``, the job
spec and the echo of resolved parameters follow from the declaration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from service import knobs
from service.knobs import knob

Baseline = Literal["black", "white", "mean", "blur", "uniform"]
Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
HeadFusion = Literal["mean", "max", "min"]
Precision = Literal["fp32", "bf16", "auto"]

BASELINES: tuple[str, ...] = get_args(Baseline)
RULES: tuple[str, ...] = get_args(Rule)
HEAD_FUSIONS: tuple[str, ...] = get_args(HeadFusion)

MAX_STEPS = 512
MAX_SAMPLES = 256
MAX_BATCH_SIZE = 1024
MAX_LEGRAD_LAYERS = 64
MAX_MASKS = 16384
MAX_WINDOW = 1024


@dataclass(frozen=True)
class ExplainParams:
    """Every knob a method may read. Each method declares the subset it uses (``Method.uses``).

    Constructing one validates it (``InvalidParameter`` naming the field). ``batch_size`` is a
    memory knob only: results never depend on it, nor on which other images share a batch (noise
    is drawn per image from ``seed``).
    """

    layer: str | None = knob(None, "dotted module name (CAM methods); unset: the model's")
    steps: int = knob(32, "integration steps (path methods)", ge=1, le=MAX_STEPS)
    samples: int = knob(16, "noisy samples (noise methods)", ge=1, le=MAX_SAMPLES)
    noise_level: float = knob(0.15, "σ as a fraction of the input's value range", ge=0.0, le=1.0)
    baseline: Baseline = knob("black", f"path baseline: {', '.join(BASELINES)}")
    rule: Rule = knob("gausslegendre", f"integration rule: {', '.join(RULES)}")
    head_fusion: HeadFusion = knob(
        "mean", f"how attention rollout fuses the heads: {', '.join(HEAD_FUSIONS)}"
    )
    discard_ratio: float = knob(
        0.0,
        "attention rollout: the lowest fraction of each row's attention set to 0 (column 0 kept)",
        ge=0.0,
        lt=1.0,
    )
    legrad_layers: int | None = knob(
        None, "LeGrad: how many of the last blocks are averaged (unset: all)", ge=1, le=MAX_LEGRAD_LAYERS
    )
    window: int = knob(16, "occlusion: side of the square patch, in input pixels", ge=1, le=MAX_WINDOW)
    stride: int = knob(8, "occlusion: step between patches, in input pixels", ge=1, le=MAX_WINDOW)
    masks: int = knob(4000, "RISE: random masks (the paper's N)", ge=1, le=MAX_MASKS)
    mask_cells: int = knob(7, "RISE: cells per side of each mask's grid (the paper's s)", ge=1, le=64)
    mask_p: float = knob(0.5, "RISE: probability that a grid cell is kept (the paper's p)", ge=0.01, le=1.0)
    seed: int | None = knob(None, "noise seed; same seed, same result (unset: drawn)", ge=0, lt=2**63)
    batch_size: int = knob(
        32,
        "passes run at once: a memory knob, not a result knob",
        ge=1,
        le=MAX_BATCH_SIZE,
        server_default=True,
    )
    precision: Precision = knob(
        "fp32",
        "arithmetic of the model's passes: fp32; bf16 (on CUDA or a CPU with AMX-BF16/AVX512-BF16, "
        "for the methods whose bf16 maps were measured to agree with fp32, else 422); auto: bf16 "
        "where offered, else fp32. The echo says which ran",
        server_default=True,
    )

    def __post_init__(self) -> None:
        knobs.check(self)

    def with_(self, **changes: Any) -> ExplainParams:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (the job spec's stored form; ``ExplainParams(**d)`` reads it back)."""
        return asdict(self)

    def requested(self) -> dict[str, Any]:
        """The parameters a client can set, as resolved (the ``parameters`` echo)."""
        return {k.name: getattr(self, k.name) for k in knobs.request_knobs(ExplainParams)}


def params_schema(names: frozenset[str]) -> dict[str, Any]:
    """JSON Schema of the named request parameters (a method's ``uses``; ``GET /v1/methods``)."""
    props = {k.name: knobs.schema(k) for k in knobs.request_knobs(ExplainParams) if k.name in names}
    return {"type": "object", "properties": props}
