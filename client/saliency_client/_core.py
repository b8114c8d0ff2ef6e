"""What ``Client`` and ``AsyncClient`` share: how each call is built and how each answer is read
(no I/O here), the retry policy and the problem+json mapping."""

from __future__ import annotations

import email.utils
import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from numpy.typing import NDArray

from saliency_client.errors import ProblemError, error_class
from saliency_client.types import (
    CompareResult,
    EvaluateResult,
    ExplainResult,
    Job,
    LayerInfo,
    MethodInfo,
    ModelInfo,
    PredictResult,
    Target,
    load_npy,
)

T = TypeVar("T")

#: an image: its encoded bytes, a file path, an open binary file, or a uint8 array
#: ((H, W), (H, W, 3) or (H, W, 4); sent as PNG)
ImageInput: TypeAlias = bytes | str | os.PathLike[str] | IO[bytes] | NDArray[Any]
#: a request parameter's value (``None``: leave it unset, the server's default applies)
ParamValue: TypeAlias = str | int | float | bool | Sequence[str] | Sequence[int] | None
#: the ``Job`` or its id
JobRef: TypeAlias = "Job | str"

MEDIA = {
    "json": "application/json",
    "npy": "application/x-npy",
    "png": "image/png",
    "overlay": "image/png",
}
RETRY_STATUSES = frozenset({429, 503})


# ------------------------------------------------------------------------------------------------
# retries
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Retries of answers that say "later" (429, 503): at most ``retries`` more attempts, each
    after the answer's ``Retry-After`` when it gives one, else after exponential back-off with
    jitter (``backoff`` × 2^attempt, up to ``max_backoff`` seconds). ``Retry-After`` above
    ``max_backoff`` is not waited for: the error is raised at once, carrying it."""

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    statuses: frozenset[int] = RETRY_STATUSES

    def delay(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None``: do not retry."""
        if response.status_code not in self.statuses or attempt >= self.retries:
            return None
        hinted = retry_after(response)
        if hinted is not None:
            return hinted if hinted <= self.max_backoff else None
        wait = min(self.max_backoff, self.backoff * 2.0**attempt)
        return wait * (0.5 + random.random() / 2)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), ``None`` when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def problem(response: httpx.Response) -> ProblemError:
    """The typed exception of an error answer (problem+json, or any other body)."""
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    status = response.status_code
    detail = body.get("detail")
    if detail is None:
        detail = response.text[:200] if not body else ""
    errors = body.get("errors")
    return error_class(status)(
        status,
        type=str(body.get("type", "about:blank")),
        title=str(body.get("title") or response.reason_phrase),
        detail=str(detail),
        instance=body.get("instance"),
        errors=errors if isinstance(errors, list) else None,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after(response),
        body=body,
    )


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise problem(response)
    return response


# ------------------------------------------------------------------------------------------------
# calls
# ------------------------------------------------------------------------------------------------
@dataclass
class Call(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    accept: str | None = None

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        headers = {"Accept": self.accept} if self.accept else None
        return client.build_request(
            self.method,
            self.path,
            params=self.params or None,
            data=self.data or None,
            files=self.files or None,
            headers=headers,
        )


def segment(name: str) -> str:
    """A path segment (model name, job id), percent-encoded."""
    return quote(name, safe="")


def value(v: Any) -> str:
    """A parameter as a form field or query value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, Sequence):
        return ",".join(str(x) for x in v)
    return str(v)


def fields(params: Mapping[str, ParamValue]) -> dict[str, str]:
    """The parameters that are set, as form fields."""
    return {k: value(v) for k, v in params.items() if v is not None}


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"GIF8", "image/gif", "gif"),
    (b"BM", "image/bmp", "bmp"),
    (b"II*\x00", "image/tiff", "tif"),
    (b"MM\x00*", "image/tiff", "tif"),
)


def media_type(data: bytes) -> tuple[str, str]:
    """The media type and extension the leading bytes suggest (the server decides, not this)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    for signature, mime, ext in _SIGNATURES:
        if data.startswith(signature):
            return mime, ext
    return "application/octet-stream", "bin"


def png_encode(array: NDArray[Any]) -> bytes:
    """A uint8 (H, W), (H, W, 3) or (H, W, 4) array as a PNG (no Pillow needed)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8 (got {a.dtype}); scale it to 0..255 first")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    colours = {2: 0, 3: 2, 4: 6}  # grey, RGB, RGBA
    colour = 0 if a.ndim == 2 else colours.get(a.shape[2], -1) if a.ndim == 3 and a.shape[2] > 2 else -1
    if colour < 0:
        raise ValueError(f"an image array is (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    height, width = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def read_image(image: ImageInput, name: str = "image") -> tuple[str, bytes, str]:
    """``(filename, bytes, media type)`` of an image input."""
    if isinstance(image, np.ndarray):
        return f"{name}.png", png_encode(image), "image/png"
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        filename = name
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        data = path.read_bytes()
        filename = path.name
    else:
        data = image.read()
        filename = Path(str(getattr(image, "name", name))).name
    mime, ext = media_type(data)
    if "." not in filename:
        filename = f"{filename}.{ext}"
    return filename, data, mime


# ------------------------------------------------------------------------------------------------
# answers
# ------------------------------------------------------------------------------------------------
def _json(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object from {response.request.url}, got {type(body).__name__}")
    return body


def header_target(response: httpx.Response) -> Target | None:
    h = response.headers
    if "x-target-index" not in h:
        return None
    from urllib.parse import unquote

    return Target(
        index=int(h["x-target-index"]),
        label=unquote(h.get("x-target-label", "")),
        score=float(h.get("x-target-score", "nan")),
    )


def _elapsed(response: httpx.Response) -> float | None:
    v = response.headers.get("x-elapsed-ms")
    return None if v is None else float(v)


def explain_answer(fmt: str) -> Callable[[httpx.Response], ExplainResult]:
    """Reads an explain (or job result) answer in ``fmt``."""

    def parse(response: httpx.Response) -> ExplainResult:
        rid = response.headers.get("x-request-id")
        kind = response.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            return ExplainResult.from_json(_json(response), request_id=rid)
        target = header_target(response)
        if kind == MEDIA["npy"]:
            return ExplainResult(
                format="npy",
                array=load_npy(response.content),
                target=target,
                elapsed_ms=_elapsed(response),
                request_id=rid,
            )
        return ExplainResult(
            format=fmt, image=response.content, target=target, elapsed_ms=_elapsed(response), request_id=rid
        )

    return parse


def _compare(response: httpx.Response) -> CompareResult:
    rid = response.headers.get("x-request-id")
    if response.headers.get("content-type", "").startswith("application/json"):
        body = _json(response)
        results = [ExplainResult.from_json(r, request_id=rid) for r in body.get("results", [])]
        return CompareResult(
            format="json", results=results, methods=list(body.get("methods", [])), request_id=rid, raw=body
        )
    return CompareResult(format="png", image=response.content, request_id=rid)


def _evaluate(response: httpx.Response) -> EvaluateResult:
    rid = response.headers.get("x-request-id")
    if response.headers.get("content-type", "").startswith("application/json"):
        return EvaluateResult.from_json(_json(response), request_id=rid)
    return EvaluateResult(format="png", image=response.content, request_id=rid)


def _job(response: httpx.Response) -> Job:
    return Job.from_json(_json(response), retry_after=retry_after(response))


def job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else str(job)


# ------------------------------------------------------------------------------------------------
# the calls of the API
# ------------------------------------------------------------------------------------------------
def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: [ModelInfo.from_json(m) for m in _json(r)["models"]])


def model(name: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{segment(name)}", lambda r: ModelInfo.from_json(_json(r)))


def layers(name: str) -> Call[list[LayerInfo]]:
    return Call(
        "GET",
        f"/v1/models/{segment(name)}/layers",
        lambda r: [LayerInfo.from_json(x) for x in _json(r)["layers"]],
    )


def methods() -> Call[list[MethodInfo]]:
    return Call("GET", "/v1/methods", lambda r: [MethodInfo.from_json(m) for m in _json(r)["methods"]])


def predict(name: str, image: ImageInput, top_k: int | None) -> Call[PredictResult]:
    return Call(
        "POST",
        f"/v1/models/{segment(name)}/predict",
        lambda r: PredictResult.from_json(_json(r)),
        data=fields({"top_k": top_k}),
        files=[("image", read_image(image))],
        accept=MEDIA["json"],
    )


def explain(name: str, image: ImageInput, fmt: str, params: Mapping[str, ParamValue]) -> Call[ExplainResult]:
    return Call(
        "POST",
        f"/v1/models/{segment(name)}/explain",
        explain_answer(fmt),
        data=fields({**params, "format": fmt}),
        files=[("image", read_image(image))],
        accept=MEDIA.get(fmt),
    )


def compare(
    name: str, image: ImageInput, methods: Sequence[str] | None, fmt: str, params: Mapping[str, ParamValue]
) -> Call[CompareResult]:
    return Call(
        "POST",
        f"/v1/models/{segment(name)}/compare",
        _compare,
        data=fields({**params, "methods": methods, "format": fmt}),
        files=[("image", read_image(image))],
        accept=MEDIA.get(fmt),
    )


def evaluate(
    name: str,
    image: ImageInput,
    methods: Sequence[str] | None,
    metrics: Sequence[str] | None,
    box: Sequence[int] | str | None,
    fmt: str,
    params: Mapping[str, ParamValue],
) -> Call[EvaluateResult]:
    return Call(
        "POST",
        f"/v1/models/{segment(name)}/evaluate",
        _evaluate,
        data=fields({**params, "methods": methods, "metrics": metrics, "box": box, "format": fmt}),
        files=[("image", read_image(image))],
        accept=MEDIA.get(fmt),
    )


def submit_job(name: str, images: Sequence[ImageInput], params: Mapping[str, ParamValue]) -> Call[Job]:
    if isinstance(images, bytes | str) or not len(images):
        raise ValueError("submit_job takes a non-empty sequence of images")
    return Call(
        "POST",
        "/v1/jobs",
        _job,
        data=fields({**params, "model": name}),
        files=[("images", read_image(im, f"image{i}")) for i, im in enumerate(images)],
        accept=MEDIA["json"],
    )


def job(ref: Job | str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{segment(job_id(ref))}", _job)


def cancel(ref: Job | str) -> Call[Job]:
    return Call("DELETE", f"/v1/jobs/{segment(job_id(ref))}", _job)


def result(
    ref: Job | str, fmt: str | None, index: int | None, params: Mapping[str, ParamValue]
) -> Call[ExplainResult]:
    query = fields({**params, "format": fmt, "index": index})
    return Call(
        "GET",
        f"/v1/jobs/{segment(job_id(ref))}/result",
        explain_answer(fmt or "json"),
        params=query,
        accept=MEDIA.get(fmt or "json"),
    )


def poll_delay(job: Job, interval: float | None, max_interval: float) -> float:
    """How long ``wait`` sleeps before polling again: ``interval`` when given, else the job's
    ``Retry-After`` (at most ``max_interval``), else one second."""
    if interval is not None:
        return interval
    hint = job.retry_after if job.retry_after is not None else 1.0
    return max(0.0, min(hint, max_interval))


def headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": "saliency-client/0.1"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    out.update(extra or {})
    return out


def job_problem(job: Job) -> ProblemError | None:
    """A failed job's ``error`` (a problem object) as the typed exception of its status."""
    e = job.error
    if not e:
        return None
    status = int(e.get("status", 500))
    return error_class(status)(
        status,
        type=str(e.get("type", "about:blank")),
        title=str(e.get("title", "")),
        detail=str(e.get("detail", "")),
        body=e,
    )
