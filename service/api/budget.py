"""The response budget: how large an answer will be, estimated before any work runs.

A request's parameters fix the size of its answer: JSON holds every image × target map (× the
input's channels with ``reduction=none``) at the output resolution (each upload's own size with
``resolution=original``, the model's input size with ``model``); npy holds one image's maps as
float32; a PNG one map as RGB pixels; a compare grid its panels. ``check`` refuses with 422
``response-too-large`` when the estimate passes ``SALIENCY_MAX_RESPONSE_BYTES``, naming the
estimate, the limit and how to shrink the answer — so the server never builds a body it was
not meant to, whatever the upload's shape.

The per-value figures are upper estimates: JSON numbers carry about five significant digits
(``rounded``), at most ten bytes with their separator; PNG is bounded by its raw RGB pixels.
Bodies above ``STREAM_BYTES`` are streamed (``service.api.responses``), so memory stays one
map at a time even for an answer within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.config import Settings
from service.errors import ResponseTooLarge
from service.evaluation import EvaluateParams
from service.imaging.geometry import Geometry
from service.imaging.grid import tile_size
from service.imaging.options import RenderParams
from service.imaging.plot import MAX_PNG_BYTES

JSON_BYTES_PER_VALUE = 10
NPY_BYTES_PER_VALUE = 4
PNG_BYTES_PER_PIXEL = 3
ENTRY_BYTES = 1024  # a JSON entry's target, shape, range, and the body's parameters
STREAM_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """What a response will hold: the format, the maps' sizes, the targets and channels."""

    fmt: str
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each image's map, as output
    targets: int  # per image
    channels: int  # values per pixel of a map: the input's channels with reduction=none, else 1
    methods: int = 1
    index: int = 0  # the image png, overlay and npy show

    @property
    def bytes(self) -> int:
        k, c = self.targets, self.channels
        if self.fmt == "json":
            pixels = sum(h * w for h, w in self.sizes)
            return self.methods * (pixels * k * c * JSON_BYTES_PER_VALUE + len(self.sizes) * k * ENTRY_BYTES)
        h, w = self.sizes[min(self.index, len(self.sizes) - 1)]
        if self.fmt == "npy":
            return h * w * k * c * NPY_BYTES_PER_VALUE + 128
        if self.fmt == "grid":
            tw, th = tile_size(w, h)
            return (self.methods + 1) * k * tw * th * PNG_BYTES_PER_PIXEL + 64 * 1024
        return h * w * PNG_BYTES_PER_PIXEL + 1024  # png, overlay

    def describe(self) -> str:
        images = len(self.sizes) if self.fmt == "json" else 1
        h, w = max(self.sizes, key=lambda s: s[0] * s[1])
        parts = [f"{images} image{'s' if images > 1 else ''}"]
        if self.methods > 1:
            parts.append(f"{self.methods} methods")
        if self.fmt in ("json", "npy", "grid"):
            parts.append(f"{self.targets} target{'s' if self.targets > 1 else ''}")
        if self.channels > 1:
            parts.append(f"{self.channels} channels")
        parts.append(f"{w}×{h} px")
        return " × ".join(parts)


def output_size(geometry: Geometry, render: RenderParams) -> tuple[int, int]:
    """(height, width) of a map as output: the upload's with ``resolution=original``."""
    if render.resolution == "original":
        return geometry.original_height, geometry.original_width
    return geometry.input_height, geometry.input_width


def answer(
    fmt: str,
    render: RenderParams,
    geometries: Sequence[Geometry],
    *,
    targets: int,
    channels: int,
    methods: int = 1,
    index: int = 0,
) -> Answer:
    """The ``Answer`` of a request; ``channels``: the model input's (used with ``reduction=none``)."""
    return Answer(
        fmt=fmt,
        sizes=tuple(output_size(g, render) for g in geometries),
        targets=targets,
        channels=channels if render.reduction == "none" and fmt in ("json", "npy") else 1,
        methods=methods,
        index=index,
    )


def check(settings: Settings, a: Answer) -> int:
    """The estimate in bytes; ``ResponseTooLarge`` (422) above ``max_response_bytes``, naming
    the parameters that would shrink this answer."""
    hints = []
    if any(h * w > 224 * 224 for h, w in a.sizes):
        hints.append("resolution=model")
    if a.fmt == "json":
        hints.append("format=npy (4 bytes a value, one image)")
    if a.targets > 1:
        hints.append("fewer targets (top_k)")
    if a.channels > 1:
        hints.append("reduction=sum")
    if a.fmt == "json" and len(a.sizes) > 1:
        hints.append("a job, fetching each image's result with format=npy&index=i")
    return check_bytes(settings, a.bytes, f"{a.describe()} as {a.fmt}", ", ".join(hints) or "a smaller image")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def evaluation_bytes(fmt: str, methods: int, params: EvaluateParams, blocks: int) -> int:
    """An evaluate answer: the plot's bounded PNG, or JSON holding per method its AUCs, curves
    (``steps + 1`` values each), pointing and sanity (a layer name and a correlation a block)."""
    if fmt == "png":
        return MAX_PNG_BYTES
    curves = len(params.curves) * (params.curve_steps + 1) * JSON_BYTES_PER_VALUE
    sanity = blocks * (SANITY_NAME_BYTES + JSON_BYTES_PER_VALUE) if "sanity" in params.metric_list else 0
    return methods * (curves + sanity + ENTRY_BYTES) + ENTRY_BYTES


#: a sanity entry's layer name (dotted module names are short; longer ones are cut by no one,
#: so this is an estimate, as the JSON figures are)
SANITY_NAME_BYTES = 64


def check_bytes(
    settings: Settings, size: int, what: str, shrink: str = "fewer methods or curve_steps, or a job"
) -> int:
    """``size``; ``ResponseTooLarge`` (422) when it passes ``max_response_bytes``, saying what
    the answer holds (``what``) and how to shrink it (``shrink``)."""
    limit = settings.max_response_bytes
    if size > limit:
        raise ResponseTooLarge(
            f"the response would be about {_mb(size)} ({what}); the limit is {_mb(limit)}. "
            f"To shrink it: {shrink}",
            estimate=size,
            limit=limit,
        )
    return size
