"""The engine's ``Explanation`` → an HTTP response: PNG heatmap, overlay, JSON or ``.npy``.

Shared by the synchronous routes and job results. Everything here is CPU work on NumPy/Pillow:
callers run it in a worker thread (``starlette.concurrency.run_in_threadpool``).

- ``resolution=original`` maps each map back onto the uploaded image (``to_original``: for
  ``center_crop`` the border the model never saw is zero); ``model`` keeps the input size.
- PNG/overlay show one image's first target; headers name the target, its score and the time.
- JSON rounds floats to about five significant digits of the map's peak; heatmaps stay NumPy
  arrays in the body dicts and are written by orjson (``json_response``), which is some twenty
  times faster than ``json`` on a 300×450 map. npy is float32, raw (not normalised), stacked
  over targets: (K, H, W), or (K, C, H, W) with ``reduction=none``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from PIL import Image
from starlette.responses import Response
from torch import Tensor

from service.api.params import MEDIA_TYPES, RenderOptions, TargetOptions, colormap_for
from service.errors import InvalidParameter
from service.explainers import ExplainParams, Explanation
from service.imaging.geometry import Geometry, to_original
from service.imaging.render import heatmap_png, normalize, overlay_image, overlay_png, to_npy
from service.models.registry import LoadedModel

SIGNIFICANT_DIGITS = 5


@dataclass
class Prepared:
    """One decoded upload and the model input made from it."""

    image: Image.Image  # RGB, EXIF orientation applied
    x: Tensor  # (C, H, W) normalised model input
    geometry: Geometry


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def heatmap(expl: Explanation, i: int, k: int, geometry: Geometry, options: RenderOptions) -> np.ndarray:
    """Raw float32 map of image ``i``, target ``k``: (H, W), or (C, H, W) with ``reduction=none``,
    at the requested resolution."""
    if options.reduction == "none":
        if expl.attributions is None:
            raise InvalidParameter(
                f"reduction=none needs a gradient or path method; {expl.method} only makes a map",
                field="reduction",
            )
        m = expl.attributions[i, k].numpy()
    else:
        m = expl.maps[i, k].numpy()
    if options.resolution == "original":
        return to_original(m, geometry)
    return np.ascontiguousarray(m, dtype=np.float32)


def model_view(item: Prepared) -> Image.Image:
    """The part of the upload the model saw, at the model's input size (for overlays)."""
    g = item.geometry
    box = None if g.resize == "stretch" else g.crop_box
    return item.image.resize((g.input_width, g.input_height), Image.Resampling.BILINEAR, box=box)


def backdrop(item: Prepared, options: RenderOptions) -> Image.Image:
    """The image an overlay is drawn on, matching the map's resolution."""
    return item.image if options.resolution == "original" else model_view(item)


def _digits(m: np.ndarray) -> int:
    peak = float(np.abs(m).max()) if m.size else 0.0
    if peak <= 0 or not math.isfinite(peak):
        return SIGNIFICANT_DIGITS
    return max(0, min(15, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(peak))))


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def resolved_parameters(
    options: TargetOptions, params: ExplainParams, *, method: str, colormap: str, fmt: str
) -> dict[str, Any]:
    """Every request parameter as it was applied, defaults and drawn values included."""
    return {
        "method": method,
        "target": options.target,
        "top_k": 1 if options.target is not None else options.top_k,
        "layer": params.layer,
        "steps": params.steps,
        "samples": params.samples,
        "noise_level": params.noise_level,
        "baseline": params.baseline,
        "rule": params.rule,
        "seed": params.seed,
        "batch_size": params.batch_size,
        "resolution": options.resolution,
        "colormap": colormap,
        "alpha": options.alpha,
        "reduction": options.reduction,
        "normalize": options.normalize,
        "format": fmt,
    }


def explanation_item(
    model: LoadedModel,
    expl: Explanation,
    i: int,
    k: int,
    geometry: Geometry,
    options: RenderOptions,
    *,
    image_index: int | None = None,
) -> dict[str, Any]:
    """One ``explanations`` entry: the target, the map's shape, values (a NumPy array: serialise
    with ``dumps``) and range."""
    raw = heatmap(expl, i, k, geometry, options)
    values = normalize(raw, options.normalize, expl.signed)
    index = int(expl.targets[i, k])
    item: dict[str, Any] = {}
    if image_index is not None:
        item["image_index"] = image_index
    delta = expl.completeness_delta
    item.update(
        target={"index": index, "label": model.label(index), "score": round(float(expl.scores[i, k]), 6)},
        shape=list(values.shape),
        heatmap=rounded(values),
        min=_finite(float(raw.min())) if raw.size else 0.0,
        max=_finite(float(raw.max())) if raw.size else 0.0,
        completeness_delta=None if delta is None else _finite(float(delta[i, k])),
    )
    return item


def rounded(values: np.ndarray) -> np.ndarray:
    """float64 copy rounded to ~5 significant digits of the peak (NaN, ±inf → 0), for JSON."""
    a = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(np.round(a, _digits(a)))


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def explain_body(
    model: LoadedModel,
    expl: Explanation,
    geometries: Sequence[Geometry],
    options: TargetOptions,
    *,
    fmt: str,
    elapsed_ms: float,
    image_indices: bool = False,
) -> dict[str, Any]:
    """The explain JSON: every image (upload order) × target. ``image_indices`` adds each entry's
    ``image_index`` (job results)."""
    colormap = colormap_for(options, expl.signed)
    entries = [
        explanation_item(model, expl, i, k, geometries[i], options, image_index=i if image_indices else None)
        for i in range(expl.maps.shape[0])
        for k in range(expl.maps.shape[1])
    ]
    return {
        "model": model.name,
        "method": expl.method,
        "parameters": resolved_parameters(
            options, expl.params, method=expl.method, colormap=colormap, fmt=fmt
        ),
        "elapsed_ms": round(elapsed_ms, 1),
        "explanations": entries,
    }


def dumps(body: Any) -> bytes:
    """Compact UTF-8 JSON; NumPy arrays become nested lists."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), media_type="application/json", headers=headers)


# ------------------------------------------------------------------------------------------------
# images and arrays
# ------------------------------------------------------------------------------------------------
def target_headers(model: LoadedModel, expl: Explanation, i: int, elapsed_ms: float) -> dict[str, str]:
    """``X-Target-Index``, ``-Label``, ``-Score`` of image ``i``'s first target, and ``X-Elapsed-Ms``."""
    index = int(expl.targets[i, 0])
    return {
        "X-Target-Index": str(index),
        "X-Target-Label": header_text(model.label(index)),
        "X-Target-Score": f"{float(expl.scores[i, 0]):.6f}",
        "X-Elapsed-Ms": f"{elapsed_ms:.1f}",
    }


def header_text(text: str) -> str:
    """Printable ASCII as is; anything else percent-encoded (header values are Latin-1 at best)."""
    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


def png_bytes(expl: Explanation, item: Prepared, i: int, options: RenderOptions, *, overlay: bool) -> bytes:
    """The heatmap (or overlay) PNG of image ``i``'s first target."""
    if options.reduction == "none":
        raise InvalidParameter("reduction=none needs format=json or npy", field="reduction")
    m = heatmap(expl, i, 0, item.geometry, options)
    colormap = colormap_for(options, expl.signed)
    if overlay:
        return overlay_png(backdrop(item, options), m, colormap, options.alpha, expl.signed)
    return heatmap_png(m, colormap, expl.signed)


def overlay_panel(expl: Explanation, item: Prepared, options: RenderOptions) -> Image.Image:
    """Image 0's first-target overlay as a picture (a compare grid panel)."""
    m = heatmap(expl, 0, 0, item.geometry, options.model_copy(update={"reduction": "default"}))
    return overlay_image(
        backdrop(item, options), m, colormap_for(options, expl.signed), options.alpha, expl.signed
    )


def npy_bytes(expl: Explanation, geometry: Geometry, i: int, options: RenderOptions) -> bytes:
    """Image ``i``'s raw maps, float32, stacked over targets."""
    maps = [heatmap(expl, i, k, geometry, options) for k in range(expl.maps.shape[1])]
    return to_npy(np.stack(maps))


def render_explanation(
    fmt: str,
    model: LoadedModel,
    expl: Explanation,
    items: Sequence[Prepared],
    options: TargetOptions,
    *,
    elapsed_ms: float,
    index: int = 0,
    image_indices: bool = False,
) -> Response:
    """The response in ``fmt`` (``png``, ``overlay``, ``json``, ``npy``). PNG, overlay and npy
    show image ``index``; JSON shows every image."""
    if fmt == "json":
        body = explain_body(
            model,
            expl,
            [it.geometry for it in items],
            options,
            fmt=fmt,
            elapsed_ms=elapsed_ms,
            image_indices=image_indices,
        )
        return json_response(body, {"X-Elapsed-Ms": f"{elapsed_ms:.1f}"})
    if not 0 <= index < len(items):
        raise InvalidParameter(f"index must be in [0, {len(items)})", field="index")
    headers = target_headers(model, expl, index, elapsed_ms)
    if fmt == "npy":
        headers["Content-Disposition"] = f'attachment; filename="{model.name}-{expl.method}.npy"'
        data = npy_bytes(expl, items[index].geometry, index, options)
        return Response(data, media_type=MEDIA_TYPES["npy"], headers=headers)
    if fmt in ("png", "overlay"):
        data = png_bytes(expl, items[index], index, options, overlay=fmt == "overlay")
        return Response(data, media_type=MEDIA_TYPES["png"], headers=headers)
    raise InvalidParameter(f"unknown format {fmt!r}", field="format")
