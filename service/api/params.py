"""Request parsing shared by every route that takes images: explain, compare, predict and jobs.

An image request arrives as ``multipart/form-data`` (the file in ``image``, or ``images``
repeated) or as ``application/json`` (base64 in ``"image"`` / ``"images"``). Both carry the same
parameters, as form fields or JSON keys; query-string parameters are read too, the body winning.
Parameters are validated by one pydantic model per route (below), so a bad value gets a 422 whose
``errors`` name each field; an unknown parameter name is an error too (a typo is never silently
ignored).

The output format is negotiated here as well: ``format`` wins, then ``Accept``, then PNG.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from service.api.problems import validation_errors
from service.config import Settings
from service.errors import InvalidParameter, NotAcceptable, PayloadTooLarge, UnsupportedImage
from service.explainers import ExplainParams, get_method, method_names
from service.explainers.base import BASELINES, MAX_SAMPLES, MAX_STEPS, RULES, Baseline, Rule
from service.imaging.render import COLORMAPS

_DEFAULTS = ExplainParams()

Format = Literal["png", "overlay", "json", "npy"]
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "overlay": "image/png",
    "json": "application/json",
    "npy": "application/x-npy",
}
SIGNED_COLORMAP = "diverging"
DEFAULT_COLORMAP = "jet"


# ------------------------------------------------------------------------------------------------
# parameter models (their JSON Schemas also document the request bodies in the OpenAPI file)
# ------------------------------------------------------------------------------------------------
class RequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictOptions(RequestOptions):
    """Parameters of ``POST /v1/models/{model}/predict``."""

    top_k: int = Field(5, ge=1, description="how many of the best classes to return")


class RenderOptions(RequestOptions):
    """How maps are rendered: shared by explain, compare and job results."""

    resolution: Literal["original", "model"] = Field(
        "original",
        description="original: the map is aligned with the uploaded image (after EXIF orientation); "
        "model: the model's input size",
    )
    colormap: str | None = Field(
        None,
        description=f"default {DEFAULT_COLORMAP}; {SIGNED_COLORMAP} for signed attributions",
        json_schema_extra={"enum": list(COLORMAPS)},
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity")
    reduction: Literal["default", "none"] = Field(
        "default",
        description="json/npy: none keeps the [3, H, W] per-channel attribution of gradient and path "
        "methods; default reduces it to the method's [H, W] map",
    )
    normalize: Literal["minmax", "none"] = Field(
        "minmax", description="json: minmax scales the heatmap to [0, 1] ([-1, 1] if signed); none: raw"
    )
    format: Format | None = Field(
        None,
        description="png (heatmap), overlay (heatmap over the image), json, npy; unset: from Accept, "
        "else png",
    )

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str | None) -> str | None:
        if value is not None and value not in COLORMAPS:
            raise ValueError(f"unknown colormap {value!r}; choose one of {', '.join(COLORMAPS)}")
        return value


class TargetOptions(RenderOptions):
    """Which classes to explain, and the engine's knobs."""

    target: int | None = Field(None, ge=0, description="class index; unset: the top-1 predicted class")
    top_k: int = Field(1, ge=1, description="explain the k best classes instead of one target")
    layer: str | None = Field(None, description="dotted module name (CAM methods); unset: the model's")
    steps: int = Field(_DEFAULTS.steps, ge=1, le=MAX_STEPS, description="integration steps (path methods)")
    samples: int = Field(_DEFAULTS.samples, ge=1, le=MAX_SAMPLES, description="noisy samples (noise methods)")
    noise_level: float = Field(
        _DEFAULTS.noise_level, ge=0.0, le=1.0, description="σ as a fraction of the input's value range"
    )
    baseline: Baseline = Field(_DEFAULTS.baseline, description=f"path baseline: {', '.join(BASELINES)}")
    rule: Rule = Field(_DEFAULTS.rule, description=f"integration rule: {', '.join(RULES)}")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="noise seed; same seed, same result (unset: drawn)"
    )
    batch_size: int | None = Field(
        None, ge=1, le=1024, description="passes run at once: a memory knob, not a result knob"
    )


class ExplainOptions(TargetOptions):
    """Parameters of ``POST /v1/models/{model}/explain`` (and of jobs)."""

    method: str = Field(
        "gradcam", description="attribution method", json_schema_extra=lambda s: _enum(s, method_names())
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return get_method(value).name  # UnknownMethod (422) lists the known names


DEFAULT_COMPARE = (
    "gradcam",
    "gradcam_pp",
    "layercam",
    "eigencam",
    "saliency",
    "guided_backprop",
    "integrated_gradients",
)


class CompareOptions(TargetOptions):
    """Parameters of ``POST /v1/models/{model}/compare``."""

    methods: str | None = Field(
        None,
        description="comma-separated method names; unset: "
        + ", ".join(DEFAULT_COMPARE)
        + " (those available on the model)",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise ValueError("give at least one method name")
        return ",".join(dict.fromkeys(get_method(n).name for n in names))

    def method_list(self, available: Sequence[str]) -> list[str]:
        """The requested methods, or the default set restricted to what the model supports."""
        if self.methods is not None:
            return self.methods.split(",")
        return [m for m in DEFAULT_COMPARE if m in available] or list(available)[:1]


def _enum(schema: dict[str, Any], values: Sequence[str]) -> None:
    schema["enum"] = list(values)


def engine_params(options: TargetOptions, settings: Settings) -> ExplainParams:
    """The engine's parameters for these options (validated; ``InvalidParameter`` on a bad one)."""
    return ExplainParams(
        layer=options.layer,
        steps=options.steps,
        samples=options.samples,
        noise_level=options.noise_level,
        baseline=options.baseline,
        rule=options.rule,
        seed=options.seed,
        batch_size=options.batch_size or settings.default_batch_size,
        autocast=settings.precision == "bf16",
    ).validate()


def resolve_targets(options: TargetOptions, num_classes: int) -> tuple[list[int] | None, int]:
    """(explicit target list or None, top_k) after checking them against the model's classes."""
    if options.target is not None:
        if "top_k" in options.model_fields_set and options.top_k != 1:
            raise InvalidParameter("give either target or top_k, not both", field="top_k")
        return [options.target], 1
    if options.top_k > num_classes:
        raise InvalidParameter(f"top_k must be in [1, {num_classes}] (got {options.top_k})", field="top_k")
    return None, options.top_k


def colormap_for(options: RenderOptions, signed: bool) -> str:
    """The client's colormap, else the diverging one for signed maps, else the default."""
    if options.colormap is not None:
        return options.colormap
    return SIGNED_COLORMAP if signed else DEFAULT_COLORMAP


# ------------------------------------------------------------------------------------------------
# the request body
# ------------------------------------------------------------------------------------------------
OptionsT = TypeVar("OptionsT", bound=RequestOptions)


@dataclass
class ParsedRequest(Generic[OptionsT]):
    """The images' bytes (upload order) and the validated options."""

    options: OptionsT
    images: list[bytes]
    accept: str | None


def body_limit(settings: Settings) -> int:
    """Request-body bytes allowed: one upload at the limit, with base64's 4/3 and form overhead."""
    return settings.max_upload_bytes * 4 // 3 + 64 * 1024


async def parse_request(
    request: Request,
    options_type: type[OptionsT],
    settings: Settings,
    *,
    image_field: str = "image",
    many: bool = False,
    max_images: int | None = None,
) -> ParsedRequest[OptionsT]:
    """Read images and parameters from a multipart form or a JSON body, and validate them.

    ``many``: ``image_field`` may repeat (multipart) or hold a list (JSON). Raises
    ``InvalidParameter`` (422, with field-level ``errors``), ``UnsupportedImage`` (415, for a body
    that is neither form nor JSON), ``PayloadTooLarge`` (413).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any] = {k: v for k, v in request.query_params.items() if v != ""}
    errors: list[dict[str, Any]] = []
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        images = await _read_form(request, fields, errors, image_field, many)
    elif content_type == "application/json" or content_type.endswith("+json"):
        images = await _read_json(request, fields, errors, image_field, many)
    elif content_type == "" and not await request.body():
        images = []
    else:
        raise UnsupportedImage(
            f"unsupported request content type {content_type!r}: send multipart/form-data with the "
            f"file in {image_field!r}, or application/json with it base64-encoded",
            field=image_field,
        )
    if not images and not any(e["field"] == image_field for e in errors):
        errors.append({"field": image_field, "message": "required: " + _image_hint(image_field, many)})
    if max_images is not None and len(images) > max_images:
        errors.append({"field": image_field, "message": f"at most {max_images} images per request"})
    for data in images:
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"an image is {len(data)} bytes; the limit is {settings.max_upload_bytes}", field=image_field
            )
    try:
        options = options_type.model_validate(fields)
    except ValidationError as exc:
        errors.extend(validation_errors([{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]))
        options = None
    if errors or options is None:
        raise InvalidParameter(_summary(errors), errors=errors)
    return ParsedRequest(options=options, images=images, accept=request.headers.get("accept"))


def _image_hint(field: str, many: bool) -> str:
    what = "one or more image files" if many else "an image file"
    return f"send {what} in the multipart field {field!r}, or base64 in the JSON key {field!r}"


def _summary(errors: list[dict[str, Any]]) -> str:
    listed = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return f"invalid request: {listed}" if listed else "invalid request"


async def _read_form(
    request: Request, fields: dict[str, Any], errors: list[dict[str, Any]], image_field: str, many: bool
) -> list[bytes]:
    images: list[bytes] = []
    async with request.form(max_files=1024, max_fields=256) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != image_field:
                    errors.append(
                        {"field": key, "message": f"unexpected file; the image goes in {image_field!r}"}
                    )
                    continue
                images.append(await value.read())
            elif key == image_field:
                errors.append(
                    {"field": key, "message": "must be a file upload (multipart file part), not a text field"}
                )
            elif value != "":
                fields[key] = value
    if len(images) > 1 and not many:
        errors.append({"field": image_field, "message": "send exactly one image"})
    return images


async def _read_json(
    request: Request, fields: dict[str, Any], errors: list[dict[str, Any]], image_field: str, many: bool
) -> list[bytes]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        errors.append({"field": "body", "message": f"invalid JSON: {exc}"})
        return []
    if not isinstance(body, dict):
        errors.append({"field": "body", "message": "the JSON body must be an object"})
        return []
    value = body.pop(image_field, None)
    fields.update({k: v for k, v in body.items() if v is not None})
    if value is None:
        return []
    items = value if isinstance(value, list) and many else [value]
    images: list[bytes] = []
    for i, item in enumerate(items):
        where = f"{image_field}.{i}" if many else image_field
        if not isinstance(item, str):
            errors.append({"field": where, "message": "must be a base64-encoded string"})
            continue
        try:
            images.append(decode_base64(item))
        except ValueError as exc:
            errors.append({"field": where, "message": str(exc)})
    return images


_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, whitespace ignored, an optional ``data:…;base64,`` prefix."""
    text = _DATA_URI.sub("", text.strip(), count=1)
    compact = "".join(text.split())
    alphabet = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


# ------------------------------------------------------------------------------------------------
# content negotiation
# ------------------------------------------------------------------------------------------------
def choose_format(requested: str | None, accept: str | None, offered: Sequence[str]) -> str:
    """``format`` wins; else the best of ``offered`` that ``Accept`` allows; else the first offered.

    Raises ``NotAcceptable`` (406) when an ``Accept`` header excludes every offered format.
    """
    if requested is not None:
        if requested not in offered:
            raise InvalidParameter(
                f"format must be one of {', '.join(offered)} here (got {requested!r})", field="format"
            )
        return requested
    if accept is None or not accept.strip():
        return offered[0]
    ranges = _parse_accept(accept)
    best: tuple[float, int, int] | None = None
    choice: str | None = None
    for pos, fmt in enumerate(offered):
        if fmt == "overlay":
            continue  # same media type as png; only chosen with format=overlay
        q, specificity = _quality(MEDIA_TYPES[fmt], ranges)
        if q <= 0:
            continue
        key = (q, specificity, -pos)
        if best is None or key > best:
            best, choice = key, fmt
    if choice is None:
        media = ", ".join(dict.fromkeys(MEDIA_TYPES[f] for f in offered))
        raise NotAcceptable(
            f"cannot answer with any type in Accept: {accept!r}; this resource offers {media}"
        )
    return choice


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        if not media:
            continue
        q = 1.0
        for param in pieces[1:]:
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(val)))
                except ValueError:
                    q = 0.0
        ranges.append((media, q))
    return ranges


def _quality(media: str, ranges: list[tuple[str, float]]) -> tuple[float, int]:
    """The q of the most specific range matching ``media`` and how specific it was (2, 1, 0)."""
    kind = media.split("/")[0]
    found: tuple[float, int] = (0.0, -1)
    for rng, q in ranges:
        if rng == media:
            specificity = 2
        elif rng == f"{kind}/*":
            specificity = 1
        elif rng in ("*/*", "*"):
            specificity = 0
        else:
            continue
        if specificity > found[1]:
            found = (q, specificity)
    return found[0], max(found[1], 0)
