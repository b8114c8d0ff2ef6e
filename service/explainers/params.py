"""The engine's parameters, each declared once (``service.knobs``).

A new parameter is one ``knob()`` field here plus the method that reads it (its ``Method.uses``);
the request forms and JSON bodies, the OpenAPI schema and example, ``GET /v1/methods``, the job
spec and the echo of resolved parameters follow from the declaration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
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
MAX_SAMPLES = 4096  # kernel_shap, lime
MAX_NOISE_SAMPLES = 256  # the noise methods (``Method.limits``)
MAX_SEGMENTS = 1024
MAX_BATCH_SIZE = 1024
MAX_LEGRAD_LAYERS = 64
MAX_MASKS = 16384
MAX_WINDOW = 1024
MAX_SIGMA = 1024.0


@dataclass(frozen=True)
class ExplainParams:
    """Every knob a method may read. Each method declares the subset it uses (``Method.uses``).

    Constructing one validates it (``InvalidParameter`` naming the field). ``batch_size`` is a
    memory knob only: results never depend on it, nor on which other images share a batch (noise
    is drawn per image from ``seed``).
    """

    layer: str | None = knob(None, "dotted module name (CAM methods); unset: the model's")
    steps: int = knob(32, "integration steps (path methods)", ge=1, le=MAX_STEPS, method_default=True)
    samples: int = knob(
        16,
        "noisy samples (noise methods); perturbed samples (kernel_shap, lime)",
        ge=1,
        le=MAX_SAMPLES,
        method_default=True,
    )
    noise_level: float = knob(0.15, "σ as a fraction of the input's value range", ge=0.0, le=1.0)
    baseline: Baseline = knob(
        "black",
        f"the reference input (path and perturbation methods): {', '.join(BASELINES)}",
        method_default=True,
    )
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
    segments: int = knob(
        50, "kernel_shap, lime: superpixels (SLIC) the image is split into", ge=2, le=MAX_SEGMENTS
    )
    max_sigma: float = knob(
        50.0, "Blur IG: σ of the most blurred image on the path, in pixels", ge=0.01, le=MAX_SIGMA
    )
    fraction: float = knob(
        0.25,
        "Guided IG: fraction of the features moved at each step (lowest |gradient| first)",
        ge=0.01,
        le=1.0,
    )
    max_dist: float = knob(
        0.02, "Guided IG: how far (in α) a feature may stray from the straight path", ge=0.0, le=1.0
    )
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
        "where offered and where bf16 pays (CUDA, a CPU with AMX), else fp32. The echo says which ran",
        server_default=True,
    )
    #: the parameters with a per-method default that a request left unset: ``for_method`` fills
    #: them in from the method's ``defaults`` (``engine.resolve_params`` does, for each method of
    #: a request). Empty for a library caller, whose values are taken as given, and once resolved.
    unset: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        knobs.check(self)
        unset = tuple(sorted(set(self.unset)))  # a job spec read back from JSON gives a list
        unknown = sorted(set(unset) - knobs.method_default_names(ExplainParams))
        if unknown:
            raise ValueError(f"not parameters with a per-method default: {unknown}")
        object.__setattr__(self, "unset", unset)

    @classmethod
    def request(cls, **given: Any) -> ExplainParams:
        """A request's parameters: ``given``, and every per-method one it leaves out unset
        (the method's default applies, as for an HTTP request)."""
        return cls(**given, unset=tuple(knobs.method_default_names(ExplainParams) - set(given)))

    def for_method(self, defaults: Mapping[str, Any]) -> ExplainParams:
        """These parameters with the unset ones taken from a method's ``defaults`` (the others
        keep their declared default), and nothing left unset."""
        return replace(self, **{k: v for k, v in defaults.items() if k in self.unset}, unset=())

    def with_(self, **changes: Any) -> ExplainParams:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (the job spec's stored form; ``ExplainParams(**d)`` reads it back)."""
        return asdict(self)

    def requested(self) -> dict[str, Any]:
        """The parameters a client can set, as resolved (the ``parameters`` echo)."""
        return {k.name: getattr(self, k.name) for k in knobs.request_knobs(ExplainParams)}


def params_schema(
    names: frozenset[str],
    defaults: Mapping[str, Any] | None = None,
    limits: Mapping[str, int | float] | None = None,
) -> dict[str, Any]:
    """JSON Schema of the named request parameters (a method's ``uses``; ``GET /v1/methods``),
    with the method's own ``defaults`` and upper ``limits`` in place of the declared ones."""
    props: dict[str, Any] = {}
    for k in knobs.request_knobs(ExplainParams):
        if k.name in names:
            props[k.name] = knobs.schema(k)
            if defaults and k.name in defaults:
                props[k.name]["default"] = defaults[k.name]
            if limits and k.name in limits:
                props[k.name]["maximum"] = limits[k.name]
    return {"type": "object", "properties": props}
