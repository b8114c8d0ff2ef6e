"""The engine's ``Explanation`` → an HTTP response: PNG heatmap, overlay, JSON or ``.npy``.

Shared by the synchronous routes and job results. Everything here is CPU work on NumPy/Pillow:
callers run it in a worker thread (``starlette.concurrency.run_in_threadpool``).

- ``resolution=original`` maps each map back onto the uploaded image (``to_original``: for
  ``center_crop`` the border the model never saw is zero); ``model`` keeps the input size.
- PNG/overlay show one image's first target; headers name the target, its score and the time.
  They draw the map as the rendering parameters say, resolved for the method
  (``RenderParams.resolve`` with ``Method.rendering``): polarity, smoothing and percentile
  clipping at the model's resolution (``service.imaging.scale``), then colours and style at the
  output's (``service.imaging.styles``).
- JSON rounds floats to about five significant digits of the map's peak; heatmaps stay NumPy
  arrays in the body dicts and are written by orjson (``json_response``), which is some twenty
  times faster than ``json`` on a 300×450 map. npy is float32, raw (not normalised), stacked
  over targets: (K, H, W), or (K, C, H, W) with ``reduction=none``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from PIL import Image
from starlette.responses import Response, StreamingResponse

from service.api.pipeline import Explained, Prepared
from service.errors import InvalidParameter
from service.explainers import ExplainParams, Explanation, Targets
from service.imaging.geometry import Geometry, to_original
from service.imaging.grid import tile_size
from service.imaging.options import MEDIA_TYPES, RenderParams
from service.imaging.render import encode_png, normalize, rounded
from service.imaging.scale import Shown, shown
from service.imaging.styles import RGB, draw, picture
from service.models.registry import LoadedModel


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def heatmap(expl: Explanation, i: int, k: int, geometry: Geometry, render: RenderParams) -> np.ndarray:
    """Raw float32 map of image ``i``, target ``k``: (H, W), or (C, H, W) with ``reduction=none``,
    at the requested resolution."""
    if render.reduction == "none":
        check_renderable(expl, render)
        assert expl.attributions is not None
        m = expl.attributions[i, k].numpy()
    else:
        m = expl.maps[i, k].numpy()
    if render.resolution == "original":
        return to_original(m, geometry)
    return np.ascontiguousarray(m, dtype=np.float32)


def model_view(item: Prepared) -> Image.Image:
    """The part of the upload the model saw, at the model's input size (for overlays)."""
    g = item.geometry
    box = None if g.resize == "stretch" else g.crop_box
    return item.image.resize((g.input_width, g.input_height), Image.Resampling.BILINEAR, box=box)


def backdrop(item: Prepared, render: RenderParams) -> Image.Image:
    """The image an overlay is drawn on, matching the map's resolution."""
    return item.image if render.resolution == "original" else model_view(item)


def output_geometry(item: Prepared, render: RenderParams) -> Geometry | None:
    """How the model-resolution map reaches the output: the upload's geometry, or none
    (``resolution=model``: the output is the model's input size)."""
    return item.geometry if render.resolution == "original" else None


def shown_map(expl: Explanation, i: int, k: int, render: RenderParams) -> Shown:
    """Image ``i``, target ``k`` made ready to draw, at the model's resolution: polarity,
    smoothing and clipping as ``render`` (resolved) says; ``colormap=rgb``: the per-channel
    attribution as an RGB image."""
    assert render.resolved, "resolve the rendering parameters for the method first"
    assert render.polarity is not None and render.clip_lower is not None
    assert render.clip_upper is not None and render.smooth is not None
    channels = None
    if render.colormap == RGB:
        if expl.attributions is None:
            raise InvalidParameter(
                f"colormap=rgb shows a per-channel attribution (gradient and path methods); "
                f"{expl.method} only makes a map",
                field="colormap",
            )
        channels = expl.attributions[i, k].numpy()
    return shown(
        expl.maps[i, k].numpy(),
        polarity=render.polarity,
        lower=render.clip_lower,
        upper=render.clip_upper,
        sigma=render.smooth,
        channels=channels,
    )


def drawn(image: Image.Image, s: Shown, geometry: Geometry | None, render: RenderParams) -> Image.Image:
    """``s`` drawn over ``image`` (at the output's size) in the request's style."""
    assert render.style is not None and render.colormap is not None and render.alpha is not None
    return draw(
        image,
        s,
        style=render.style,
        colormap=render.colormap,
        alpha=render.alpha,
        keep=render.keep,
        geometry=geometry,
    )


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def resolved_parameters(
    method: str, targets: Targets, params: ExplainParams, render: RenderParams, *, fmt: str
) -> dict[str, Any]:
    """Every request parameter as it was applied, defaults and drawn values included: each part
    echoes its own declaration (targets, engine, rendering resolved for the method)."""
    return {"method": method, **targets.echo(), **params.requested(), **render.echo(fmt=fmt)}


def explanation_item(
    model: LoadedModel,
    expl: Explanation,
    i: int,
    k: int,
    geometry: Geometry,
    render: RenderParams,
    *,
    image_index: int | None = None,
) -> dict[str, Any]:
    """One ``explanations`` entry: the target, the map's shape, values (a NumPy array: serialise
    with ``dumps``) and range."""
    raw = heatmap(expl, i, k, geometry, render)
    values = normalize(raw, render.normalize, expl.signed)
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


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def explain_head(
    model: LoadedModel,
    expl: Explanation,
    targets: Targets,
    render: RenderParams,
    *,
    fmt: str,
    elapsed_ms: float,
) -> dict[str, Any]:
    """The explain JSON up to its ``explanations`` (which ``explain_entries`` makes)."""
    return {
        "model": model.name,
        "method": expl.method,
        "parameters": resolved_parameters(expl.method, targets, expl.params, render, fmt=fmt),
        "elapsed_ms": round(elapsed_ms, 1),
    }


def explain_entries(
    model: LoadedModel,
    expl: Explanation,
    geometries: Sequence[Geometry],
    render: RenderParams,
    *,
    image_indices: bool = False,
    extras: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> Iterator[dict[str, Any]]:
    """The ``explanations`` entries, one at a time: every image (upload order) × target.
    ``image_indices`` adds each entry's ``image_index`` (job results); ``extras[i][k]`` more keys
    of an entry (``score=true``: its AUCs)."""
    for i in range(expl.maps.shape[0]):
        for k in range(expl.maps.shape[1]):
            item = explanation_item(
                model, expl, i, k, geometries[i], render, image_index=i if image_indices else None
            )
            if extras is not None:
                item.update(extras[i][k])
            yield item


def explain_body(
    model: LoadedModel,
    expl: Explanation,
    geometries: Sequence[Geometry],
    targets: Targets,
    render: RenderParams,
    *,
    fmt: str,
    elapsed_ms: float,
    image_indices: bool = False,
    extras: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The explain JSON, whole: the head and every entry."""
    head = explain_head(model, expl, targets, render, fmt=fmt, elapsed_ms=elapsed_ms)
    entries = explain_entries(model, expl, geometries, render, image_indices=image_indices, extras=extras)
    return {**head, "explanations": list(entries)}


def check_renderable(expl: Explanation, render: RenderParams) -> None:
    """Refuse now what rendering would refuse half-way through a streamed body."""
    if render.reduction == "none" and expl.attributions is None:
        raise InvalidParameter(
            f"reduction=none needs a gradient or path method; {expl.method} only makes a map",
            field="reduction",
        )


def json_stream(head: dict[str, Any], key: str, items: Iterable[Any]) -> Iterator[bytes]:
    """``head`` with ``key`` holding ``items``, as JSON written an item at a time: the body is
    never whole in memory (``key`` becomes the last member). An item is a JSON value, encoded
    bytes, or an iterator of chunks (a nested ``json_stream``)."""
    opening = dumps({**head, key: []})
    yield opening[:-2]  # up to and with the "[" of key's empty list: drop its closing "]}"
    for n, item in enumerate(items):
        if n:
            yield b","
        if isinstance(item, Iterator):  # a nested streamed value: its chunks as they come
            yield from item
        else:
            yield item if isinstance(item, bytes) else dumps(item)
    yield b"]}"


def json_list_stream(items: Iterable[Any]) -> Iterator[bytes]:
    """A JSON list written an item at a time (each item a JSON value)."""
    yield b"["
    for n, item in enumerate(items):
        yield (b"," if n else b"") + dumps(item)
    yield b"]"


def streamed(chunks: Iterator[bytes], media_type: str, headers: dict[str, str] | None = None) -> Response:
    """A response sent as ``chunks`` come (Starlette pulls a sync iterator in a worker thread)."""
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


def dumps(body: Any) -> bytes:
    """Compact UTF-8 JSON; NumPy arrays become nested lists."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), media_type="application/json", headers=headers)


# ------------------------------------------------------------------------------------------------
# images and arrays
# ------------------------------------------------------------------------------------------------
TARGET_HEADERS = ("X-Target-Index", "X-Target-Label", "X-Target-Score", "X-Elapsed-Ms")


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


def png_bytes(expl: Explanation, item: Prepared, i: int, render: RenderParams, *, overlay: bool) -> bytes:
    """The PNG of image ``i``'s first target: the coloured map alone, or drawn over the image."""
    if render.reduction == "none":
        raise InvalidParameter("reduction=none needs format=json or npy", field="reduction")
    s = shown_map(expl, i, 0, render)
    geometry = output_geometry(item, render)
    assert render.colormap is not None
    if overlay:
        return encode_png(drawn(backdrop(item, render), s, geometry, render))
    return encode_png(picture(s, render.colormap, geometry))


def panel(
    expl: Explanation, item: Prepared, k: int, render: RenderParams, *, tile: Image.Image
) -> Image.Image:
    """Image 0's target ``k`` drawn over ``tile`` (the upload scaled to a compare panel)."""
    geometry = item.geometry.scaled(*tile.size)
    return drawn(tile, shown_map(expl, 0, k, render), geometry, render)


def panel_image(item: Prepared) -> Image.Image:
    """The upload scaled to a compare panel (its aspect ratio kept)."""
    return item.image.convert("RGB").resize(
        tile_size(item.image.width, item.image.height), Image.Resampling.BILINEAR
    )


def npy_bytes(expl: Explanation, geometry: Geometry, i: int, render: RenderParams) -> bytes:
    """Image ``i``'s raw maps, float32, stacked over targets."""
    return b"".join(npy_chunks(expl, geometry, i, render))


def npy_chunks(expl: Explanation, geometry: Geometry, i: int, render: RenderParams) -> Iterator[bytes]:
    """``npy_bytes`` a target at a time: the ``.npy`` header, then each target's float32 map."""
    maps = (heatmap(expl, i, k, geometry, render) for k in range(expl.maps.shape[1]))
    first = next(maps)
    buf = io.BytesIO()
    shape = (int(expl.maps.shape[1]), *first.shape)
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    yield buf.getvalue()
    yield np.ascontiguousarray(first, dtype="<f4").tobytes()
    for m in maps:
        yield np.ascontiguousarray(m, dtype="<f4").tobytes()


def render_explanation(
    fmt: str,
    model: LoadedModel,
    expl: Explanation,
    items: Sequence[Prepared],
    targets: Targets,
    render: RenderParams,
    *,
    elapsed_ms: float,
    index: int = 0,
    image_indices: bool = False,
    stream: bool = False,
    extras: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> Response:
    """The response in ``fmt`` (``png``, ``overlay``, ``json``, ``npy``). PNG, overlay and npy
    show image ``index``; JSON shows every image. ``stream``: JSON and npy are written a map at a
    time as they are sent (for bodies the budget says are large)."""
    check_renderable(expl, render)
    if fmt == "json":
        geometries = [it.geometry for it in items]
        timing = {"X-Elapsed-Ms": f"{elapsed_ms:.1f}"}
        if stream:
            head = explain_head(model, expl, targets, render, fmt=fmt, elapsed_ms=elapsed_ms)
            entries = explain_entries(
                model, expl, geometries, render, image_indices=image_indices, extras=extras
            )
            return streamed(json_stream(head, "explanations", entries), "application/json", timing)
        body = explain_body(
            model,
            expl,
            geometries,
            targets,
            render,
            fmt=fmt,
            elapsed_ms=elapsed_ms,
            image_indices=image_indices,
            extras=extras,
        )
        return json_response(body, timing)
    if not 0 <= index < len(items):
        raise InvalidParameter(f"index must be in [0, {len(items)})", field="index")
    headers = target_headers(model, expl, index, elapsed_ms)
    if fmt == "npy":
        headers["Content-Disposition"] = f'attachment; filename="{model.name}-{expl.method}.npy"'
        if stream:
            return streamed(
                npy_chunks(expl, items[index].geometry, index, render), MEDIA_TYPES["npy"], headers
            )
        data = npy_bytes(expl, items[index].geometry, index, render)
        return Response(data, media_type=MEDIA_TYPES["npy"], headers=headers)
    if fmt in ("png", "overlay"):
        data = png_bytes(expl, items[index], index, render, overlay=fmt == "overlay")
        return Response(data, media_type=MEDIA_TYPES["png"], headers=headers)
    raise InvalidParameter(f"unknown format {fmt!r}", field="format")


# ------------------------------------------------------------------------------------------------
# the answers of other model servers (``service.api.routes.compat``)
# ------------------------------------------------------------------------------------------------
def kserve_explanations(model: LoadedModel, done: Explained, *, stream: bool) -> Response:
    """KServe v1's ``{"explanations": [...]}``: the explain JSON's entries, one per instance and
    target in upload order, each with its ``image_index``."""
    entries = explain_entries(
        model,
        done.expl,
        [it.geometry for it in done.items],
        done.render,
        image_indices=True,
        extras=done.extras,
    )
    if stream:
        return streamed(json_stream({}, "explanations", entries), "application/json")
    return json_response({"explanations": list(entries)})


def torchserve_attributions(model: LoadedModel, done: Explained, *, stream: bool) -> Response:
    """TorchServe's explanations answer: a JSON list, one nested-list attribution per image
    (its map as the JSON format has it: [H, W], or [C, H, W] with ``reduction=none``; with
    several targets, the list of each target's)."""
    per_image = done.expl.maps.shape[1]
    entries = explain_entries(model, done.expl, [it.geometry for it in done.items], done.render)

    def attributions() -> Iterator[Any]:
        for _ in done.items:
            maps = [next(entries)["heatmap"] for _ in range(per_image)]
            yield maps[0] if per_image == 1 else maps

    if stream:
        return streamed(json_list_stream(attributions()), "application/json")
    return Response(dumps(list(attributions())), media_type="application/json")
