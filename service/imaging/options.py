"""The rendering parameters, each declared once (``service.knobs``), and the output formats.

How an explanation is shown — resolution, colormap, opacity, polarity, clipping, style, smoothing,
reduction, normalisation, format — is independent of how it was computed, so these parameters live
here, beside the renderer, not in the engine; only their per-method defaults come with each method
(``Method.rendering``), resolved by ``RenderParams.resolve``. The request fields of explain, compare and jobs, the OpenAPI schema, the query
parameters of ``GET /v1/jobs/{id}/result`` and the echo of resolved parameters are derived from
``RenderParams``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from service import knobs
from service.errors import InvalidParameter
from service.imaging.render import COLORMAPS
from service.knobs import knob

Format = Literal["png", "overlay", "json", "npy"]
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "overlay": "image/png",
    "json": "application/json",
    "npy": "application/x-npy",
}
Polarity = Literal["positive", "negative", "absolute", "both"]
Style = Literal["heatmap", "pixels", "outlines", "mask"]

SIGNED_COLORMAP = "diverging"
#: the opacity an unset ``alpha`` takes, by style
STYLE_ALPHA: dict[str, float] = {"heatmap": 0.5, "pixels": 1.0, "outlines": 1.0, "mask": 1.0}
MAX_SMOOTH = 32.0


@dataclass(frozen=True)
class RenderParams:
    """How maps are rendered: shared by explain, compare and job results.

    A parameter declared with ``method_default`` is ``None`` until ``resolve`` fills it in from
    the method's rendering defaults (``Method.rendering``, see ``service.explainers.figures``).
    """

    resolution: Literal["original", "model"] = knob(
        "original",
        "original: the map is aligned with the uploaded image (after EXIF orientation); "
        "model: the model's input size",
    )
    colormap: str | None = knob(
        None,
        f"colours of the map; rgb: the per-channel gradient as an image (gradient and path methods). "
        f"Unset: the method's (GET /v1/methods), {SIGNED_COLORMAP} when polarity=both",
        choices=COLORMAPS,
        method_default=True,
    )
    alpha: float | None = knob(
        None,
        "opacity of what is drawn over the image (heatmap: the colours; pixels: the strongest "
        "pixels; outlines: the lines; mask: the cover over what is dropped). "
        "Unset: 0.5 for heatmap, 1 for the other styles",
        ge=0.0,
        le=1.0,
        method_default=True,
    )
    polarity: Polarity | None = knob(
        None,
        "which values are shown: positive, negative (as magnitudes), absolute, or both signs "
        "(a diverging colormap centred on zero). Unset: the method's",
        method_default=True,
    )
    clip_lower: float | None = knob(
        None,
        "percentile (0–100) of the map after polarity (of |map| for both) shown as nothing; "
        "weaker values are hidden. Unset: the method's",
        ge=0.0,
        le=100.0,
        method_default=True,
    )
    clip_upper: float | None = knob(
        None,
        "percentile (0–100) of the map after polarity (of |map| for both) where the colours "
        "saturate; stronger values are clipped to it. Unset: the method's",
        ge=0.0,
        le=100.0,
        method_default=True,
    )
    style: Style | None = knob(
        None,
        "how the map is drawn over the image (overlay, compare): heatmap (colours blended over "
        "it), pixels (coloured pixels over the image in grey), outlines (contours around the "
        "top keep fraction of the map), mask (the image kept only where the map is in its top "
        "keep fraction). Unset: the method's",
        method_default=True,
    )
    keep: float = knob(
        0.2, "outlines and mask: the fraction of the pixels kept (the map's top)", ge=0.0, le=1.0
    )
    smooth: float | None = knob(
        None,
        "Gaussian blur of the map before it is shown, σ in model-input pixels (for pixel-level "
        "maps; 0: none). Unset: the method's",
        ge=0.0,
        le=MAX_SMOOTH,
        method_default=True,
    )
    reduction: Literal["default", "none"] = knob(
        "default",
        "json/npy: none keeps the [3, H, W] per-channel attribution of gradient and path "
        "methods; default reduces it to the method's [H, W] map",
    )
    normalize: Literal["minmax", "none"] = knob(
        "minmax", "json: minmax scales the heatmap to [0, 1] ([-1, 1] if signed); none: raw"
    )
    format: Format | None = knob(
        None, "png (heatmap), overlay (heatmap over the image), json, npy; unset: from Accept, else png"
    )

    def __post_init__(self) -> None:
        knobs.check(self)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RenderParams:
        """The parameters among ``values`` (other keys ignored); ``InvalidParameter`` on a bad one."""
        names = {k.name for k in knobs.knobs(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, defaults: Mapping[str, object]) -> RenderParams:
        """These parameters with every unset per-method one filled in: from ``defaults`` (a
        method's ``rendering``), ``colormap`` diverging for ``polarity=both`` (unless the method
        shows rgb), ``alpha`` by style. ``InvalidParameter`` when the clipping range is empty."""
        unknown = set(defaults) - set(METHOD_DEFAULTS)
        if unknown:
            raise ValueError(f"not rendering parameters with a per-method default: {sorted(unknown)}")
        given = {name: getattr(self, name) for name in METHOD_DEFAULTS}
        values: dict[str, Any] = {name: defaults.get(name) if v is None else v for name, v in given.items()}
        if given["colormap"] is None and values["polarity"] == "both" and values["colormap"] != "rgb":
            values["colormap"] = SIGNED_COLORMAP
        if values["alpha"] is None and values["style"] is not None:
            values["alpha"] = STYLE_ALPHA[str(values["style"])]
        missing = sorted(name for name, v in values.items() if v is None)
        if missing:
            raise ValueError(f"the method's rendering defaults lack {', '.join(missing)}")
        out = replace(self, **values)
        assert out.clip_lower is not None and out.clip_upper is not None
        if out.clip_lower >= out.clip_upper:
            field = "clip_lower" if given["clip_lower"] is not None else "clip_upper"
            raise InvalidParameter(
                f"clip_lower ({out.clip_lower:g}) must be below clip_upper ({out.clip_upper:g})", field=field
            )
        return out

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in METHOD_DEFAULTS)

    def defaults(self) -> dict[str, Any]:
        """The per-method parameters as resolved (a method's ``rendering`` in ``GET /v1/methods``)."""
        return {name: getattr(self, name) for name in METHOD_DEFAULTS}

    def echo(self, *, fmt: str) -> dict[str, Any]:
        """The parameters as rendering applied them (the ``parameters`` echo): resolve first."""
        out = {k.name: getattr(self, k.name) for k in knobs.request_knobs(RenderParams)}
        out.update(format=fmt)
        return out


#: the parameters whose unset value is the method's rendering default
METHOD_DEFAULTS: tuple[str, ...] = tuple(k.name for k in knobs.knobs(RenderParams) if k.method_default)
