"""The rendering parameters, each declared once (``service.knobs``), and the output formats.

How an explanation is shown — resolution, colormap, opacity, reduction, normalisation, format —
is independent of how it was computed, so these parameters live here, beside the renderer, not in
the engine. The request fields of explain, compare and jobs, the OpenAPI schema, the query
parameters of ``GET /v1/jobs/{id}/result`` and the echo of resolved parameters are derived from
``RenderParams``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from service import knobs
from service.imaging.render import COLORMAPS
from service.knobs import knob

Format = Literal["png", "overlay", "json", "npy"]
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "overlay": "image/png",
    "json": "application/json",
    "npy": "application/x-npy",
}
SIGNED_COLORMAP = "diverging"
DEFAULT_COLORMAP = "jet"


@dataclass(frozen=True)
class RenderParams:
    """How maps are rendered: shared by explain, compare and job results."""

    resolution: Literal["original", "model"] = knob(
        "original",
        "original: the map is aligned with the uploaded image (after EXIF orientation); "
        "model: the model's input size",
    )
    colormap: str | None = knob(
        None, f"default {DEFAULT_COLORMAP}; {SIGNED_COLORMAP} for signed attributions", choices=COLORMAPS
    )
    alpha: float = knob(0.5, "overlay opacity", ge=0.0, le=1.0)
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

    def colormap_for(self, signed: bool) -> str:
        """The client's colormap, else the diverging one for signed maps, else the default."""
        if self.colormap is not None:
            return self.colormap
        return SIGNED_COLORMAP if signed else DEFAULT_COLORMAP

    def echo(self, *, signed: bool, fmt: str) -> dict[str, Any]:
        """The parameters as rendering applied them (the ``parameters`` echo)."""
        out = {k.name: getattr(self, k.name) for k in knobs.request_knobs(RenderParams)}
        out.update(colormap=self.colormap_for(signed), format=fmt)
        return out
