"""Request parsing shared by every route that takes images: explain, compare, predict and jobs.

An image request arrives as ``multipart/form-data`` (the file in ``image``, or ``images``
repeated) or as ``application/json`` (base64 in ``"image"`` / ``"images"``). Both carry the same
parameters, as form fields or JSON keys; query-string parameters are read too, the body winning.
Parameters are validated by the route's pydantic model (``service.api.options``), so a bad value
gets a 422 whose ``errors`` name each field; an unknown parameter name is an error too (a typo is
never silently ignored).

The output format is negotiated here as well: ``format`` wins, then ``Accept``, then PNG.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.middleware import annotate
from service.api.options import RequestOptions
from service.api.problems import validation_errors
from service.config import Settings
from service.errors import InvalidParameter, NotAcceptable, PayloadTooLarge, UnsupportedImage
from service.imaging.options import MEDIA_TYPES

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
        images = await _read_form(request, settings, fields, errors, image_field, many)
    elif content_type == "application/json" or content_type.endswith("+json"):
        images = await _read_json(request, settings, fields, errors, image_field, many)
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
    return _validated(request, options_type, settings, fields, images, errors, image_field, max_images)


def _validated(
    request: Request,
    options_type: type[OptionsT],
    settings: Settings,
    fields: dict[str, Any],
    images: list[bytes],
    errors: list[dict[str, Any]],
    image_field: str,
    max_images: int | None,
    *,
    within: tuple[str, ...] = (),
) -> ParsedRequest[OptionsT]:
    """The images' count and sizes checked, the options validated (``within``: where the
    parameters sit in the body, for the error's field names); every error found at once."""
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
        located = [{**err, "loc": ("body", *within, *err["loc"])} for err in exc.errors()]
        errors.extend(validation_errors(located))
        options = None
    if errors or options is None:
        raise InvalidParameter(_summary(errors), errors=errors)
    methods = getattr(options, "methods", None) or getattr(options, "method", None)
    annotate(request.scope, method=methods if isinstance(methods, str) else None)  # validated names
    return ParsedRequest(options=options, images=images, accept=request.headers.get("accept"))


# ------------------------------------------------------------------------------------------------
# the request bodies of other model servers' clients (``service.api.routes.compat``)
# ------------------------------------------------------------------------------------------------
# an instance's image, as KServe and TensorFlow Serving clients send it: {"image": {"b64": …}}
# (KServe's samples), {"image_bytes": {"b64": …}}, {"b64": …} (TF Serving's binary values),
# {"data": …} (TorchServe's KServe envelope); the value a base64 string or {"b64": string}
INSTANCE_KEYS = ("image", "image_bytes", "b64", "data")


async def parse_kserve(
    request: Request, options_type: type[OptionsT], settings: Settings
) -> ParsedRequest[OptionsT]:
    """A KServe v1 body: ``{"instances": [<instance>, ...], "parameters": {...}}`` (``inputs`` is
    read like ``instances``), the JSON read whatever the content type says (``curl -d @file``
    sends it as a form). Each instance is a base64 string or an object holding one in one of
    ``INSTANCE_KEYS``; ``parameters`` are the route's options (field names ``parameters.<name>``
    in errors). At most ``max_sync_images`` instances."""
    fields: dict[str, Any] = {k: v for k, v in request.query_params.items() if v != ""}
    errors: list[dict[str, Any]] = []
    images: list[bytes] = []
    try:
        body = await run_in_threadpool(parse_json, await request.body(), settings.max_json_depth)
    except ValueError as exc:
        errors.append({"field": "body", "message": str(exc)})
    else:
        images = _read_kserve(body, settings, fields, errors)
    return _validated(
        request,
        options_type,
        settings,
        fields,
        images,
        errors,
        "instances",
        settings.max_sync_images,
        within=("parameters",),
    )


def _read_kserve(
    body: Any, settings: Settings, fields: dict[str, Any], errors: list[dict[str, Any]]
) -> list[bytes]:
    if not isinstance(body, dict):
        errors.append({"field": "body", "message": 'the JSON body must be an object: {"instances": [...]}'})
        return []
    unknown = sorted(set(body) - {"instances", "inputs", "parameters"})
    for key in unknown[:16]:
        errors.append({"field": key, "message": "unexpected member; the body holds instances and parameters"})
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and len(parameters) <= settings.max_form_fields:
        fields.update({k: v for k, v in parameters.items() if v is not None})
    elif parameters is not None:
        errors.append(
            {
                "field": "parameters",
                "message": f"must be an object of at most {settings.max_form_fields} members",
            }
        )
    if "instances" in body and "inputs" in body:
        errors.append({"field": "inputs", "message": "give instances or inputs, not both"})
    key = "instances" if "instances" in body or "inputs" not in body else "inputs"
    instances = body.get(key)
    if not isinstance(instances, list) or not instances:
        errors.append({"field": key, "message": "required: a list of images, " + _INSTANCE_HINT})
        return []
    if len(instances) > settings.max_sync_images:
        errors.append({"field": key, "message": f"at most {settings.max_sync_images} instances per request"})
        return []
    images: list[bytes] = []
    for i, instance in enumerate(instances):
        try:
            images.append(decode_base64(_instance_text(instance)))
        except ValueError as exc:
            errors.append({"field": f"{key}.{i}", "message": str(exc)})
    return images


_INSTANCE_HINT = 'each {"image": {"b64": "<base64 of the image file>"}} or the base64 string itself'


def _instance_text(instance: Any) -> str:
    """The base64 text of one instance; ``ValueError`` naming the accepted shapes otherwise."""
    value = instance
    if isinstance(instance, dict):
        keys = [k for k in INSTANCE_KEYS if k in instance]
        if len(keys) != 1 or len(instance) != 1:
            raise ValueError(f"an instance holds one of {', '.join(INSTANCE_KEYS)}: {_INSTANCE_HINT}")
        value = instance[keys[0]]
        if isinstance(value, dict) and set(value) == {"b64"}:
            value = value["b64"]
    if isinstance(value, str):
        return value
    if isinstance(instance, list):
        raise ValueError(
            "tensor instances are not accepted: send the encoded image file (JPEG, PNG, …) so the "
            f"model's own preprocessing applies; {_INSTANCE_HINT}"
        )
    raise ValueError(f"not an image: {_INSTANCE_HINT}")


async def parse_torchserve(
    request: Request, options_type: type[OptionsT], settings: Settings
) -> ParsedRequest[OptionsT]:
    """A TorchServe inference request: the image as the raw body (``curl -T kitten.jpg``,
    ``curl --data-binary @kitten.jpg``, ``requests.post(url, data=f)``: whatever the content type
    says), or ``multipart/form-data`` with one or more files in ``data``
    (``requests.post(url, files={"data": f})``, ``curl -F data=@kitten.jpg``). Parameters come
    from the query string (and the form's other fields). At most ``max_sync_images`` images."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any] = {k: v for k, v in request.query_params.items() if v != ""}
    errors: list[dict[str, Any]] = []
    if content_type == "multipart/form-data":
        images = await _read_form(request, settings, fields, errors, "data", True)
    else:
        raw = await request.body()
        images = [raw] if raw else []
    if not images and not any(e["field"] == "data" for e in errors):
        errors.append(
            {
                "field": "data",
                "message": "required: send the image file as the body, or in the multipart field 'data'",
            }
        )
    return _validated(
        request, options_type, settings, fields, images, errors, "data", settings.max_sync_images
    )


def _image_hint(field: str, many: bool) -> str:
    what = "one or more image files" if many else "an image file"
    return f"send {what} in the multipart field {field!r}, or base64 in the JSON key {field!r}"


def _summary(errors: list[dict[str, Any]]) -> str:
    listed = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return f"invalid request: {listed}" if listed else "invalid request"


async def _read_form(
    request: Request,
    settings: Settings,
    fields: dict[str, Any],
    errors: list[dict[str, Any]],
    image_field: str,
    many: bool,
) -> list[bytes]:
    images: list[bytes] = []
    async with request.form(max_files=1024, max_fields=settings.max_form_fields) as form:
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
    request: Request,
    settings: Settings,
    fields: dict[str, Any],
    errors: list[dict[str, Any]],
    image_field: str,
    many: bool,
) -> list[bytes]:
    raw = await request.body()
    try:
        body = await run_in_threadpool(parse_json, raw, settings.max_json_depth)
    except ValueError as exc:
        errors.append({"field": "body", "message": str(exc)})
        return []
    if not isinstance(body, dict):
        errors.append({"field": "body", "message": "the JSON body must be an object"})
        return []
    if len(body) > settings.max_form_fields:
        errors.append({"field": "body", "message": f"at most {settings.max_form_fields} members"})
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


def parse_json(raw: bytes, max_depth: int) -> Any:
    """A JSON body (empty: ``{}``), at most ``max_depth`` containers deep. ``ValueError`` with a
    client-facing message otherwise. Called in a worker thread: a body of tens of megabytes takes
    time to parse, and not the event loop's. orjson refuses nesting beyond 1024 by itself (the
    standard library would recurse until ``RecursionError``)."""
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    raise ValueError(f"the JSON body nests deeper than {max_depth} levels")
                stack.append((child, depth + 1))
    return body


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
