"""The evaluation's parameters, each declared once (``service.knobs``).

``POST /v1/models/{model}/evaluate``, ``score=true`` on explain and jobs with ``task=evaluate``
read them; the request fields, the OpenAPI schema, the job spec and the echo derive from this
declaration, as they do for ``ExplainParams``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from service import knobs
from service.errors import InvalidParameter
from service.knobs import knob

Metric = Literal["deletion", "insertion", "pointing", "sanity"]
Substitute = Literal["blur", "black", "mean"]

METRICS: tuple[str, ...] = get_args(Metric)
CURVES: tuple[str, ...] = ("deletion", "insertion")
SUBSTITUTES: tuple[str, ...] = get_args(Substitute)

MIN_CURVE_STEPS = 2
MAX_CURVE_STEPS = 224
#: the pointing game's tolerance: the box grows by this many pixels on each side (Zhang et al. 2016)
POINTING_MARGIN_PX = 15
MAX_BOX_TEXT = 64


@dataclass(frozen=True)
class EvaluateParams:
    """How far to trust a map: which metrics, the curves' resolution and substitute, the box.

    Constructing one validates it (``InvalidParameter`` naming the field): known metrics, a box
    ``x0,y0,x1,y1`` of integers with ``x0 < x1`` and ``y0 < y1``, and ``pointing`` only with a box.
    Whether the box lies inside the image is checked once the image is decoded (``check_box``).
    """

    metrics: str = knob(
        "deletion,insertion",
        f"comma-separated, from {', '.join(METRICS)}",
    )
    curve_steps: int = knob(
        50,
        "stages of the deletion and insertion curves (each a forward pass per curve)",
        ge=MIN_CURVE_STEPS,
        le=MAX_CURVE_STEPS,
    )
    substitute: Substitute = knob(
        "blur",
        "what replaces deleted pixels (and starts insertion): blur (Gaussian, kernel 11, σ 5), "
        "black, or the image's per-channel mean",
    )
    box: str | None = knob(
        None,
        "x0,y0,x1,y1 in uploaded-image pixels: where the object is (needed by pointing)",
    )

    def __post_init__(self) -> None:
        knobs.check(self)
        self.metric_list  # noqa: B018  (validates)
        self.rect  # noqa: B018
        if "pointing" in self.metric_list and self.box is None:
            raise InvalidParameter("metrics=pointing needs a box (x0,y0,x1,y1)", field="box")

    @property
    def metric_list(self) -> tuple[str, ...]:
        """The metrics asked for, in the order of ``METRICS``."""
        names = [n.strip() for n in self.metrics.split(",") if n.strip()]
        if not names:
            raise InvalidParameter("give at least one metric", field="metrics")
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise InvalidParameter(
                f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}", field="metrics"
            )
        return tuple(m for m in METRICS if m in names)

    @property
    def curves(self) -> tuple[str, ...]:
        """The curve metrics asked for (deletion, insertion)."""
        return tuple(m for m in self.metric_list if m in CURVES)

    @property
    def rect(self) -> tuple[int, int, int, int] | None:
        """The box as integers (x0, y0, x1, y1), or ``None``."""
        if self.box is None:
            return None
        if len(self.box) > MAX_BOX_TEXT:
            raise InvalidParameter("box must be x0,y0,x1,y1", field="box")
        parts = [p.strip() for p in self.box.split(",")]
        try:
            x0, y0, x1, y1 = (int(p) for p in parts)
        except ValueError:
            raise InvalidParameter(
                f"box must be four integers x0,y0,x1,y1 (got {self.box!r})", field="box"
            ) from None
        if min(x0, y0, x1, y1) < 0:
            raise InvalidParameter("box coordinates must be ≥ 0", field="box")
        if x0 >= x1 or y0 >= y1:
            raise InvalidParameter(f"box must have x0 < x1 and y0 < y1 (got {self.box!r})", field="box")
        return x0, y0, x1, y1

    def check_box(self, width: int, height: int) -> None:
        """``InvalidParameter`` when the box reaches outside a ``width`` × ``height`` image."""
        r = self.rect
        if r is not None and (r[2] > width or r[3] > height):
            raise InvalidParameter(f"box {self.box} reaches outside the {width}×{height} image", field="box")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def requested(self) -> dict[str, Any]:
        """The parameters as resolved (the ``parameters`` echo)."""
        return {k.name: getattr(self, k.name) for k in knobs.request_knobs(EvaluateParams)}
