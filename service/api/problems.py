"""The one place where errors become HTTP: RFC 9457 ``application/problem+json`` responses.

Domain errors (``service.errors``) are mapped to a status by class, most specific first (the
exception's MRO is walked, as Starlette looks up its handlers). FastAPI's request validation
errors and Starlette's HTTP exceptions (unknown route 404, 405) get the same body shape.
Anything else is logged with its traceback and answered with a bare 500 (see
``service.api.middleware``).

Body: ``{"type", "title", "status", "detail", "instance"}``, plus ``"errors"`` (a list of
``{"field", "message"}``) on every 422.
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from service import errors as e

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:saliency:problem:"

STATUS: dict[type[e.SaliencyError], int] = {
    e.NotFound: 404,  # UnknownModel, JobNotFound
    e.UnknownMethod: 422,
    e.UnknownLayer: 422,
    e.InvalidParameter: 422,  # TargetOutOfRange
    e.MethodNotApplicable: 422,
    e.PrecisionUnavailable: 422,
    e.TooHeavy: 422,
    e.ResponseTooLarge: 422,
    e.Unauthorized: 401,
    e.RateLimited: 429,
    e.CorruptImage: 422,
    e.ImageTooSmall: 422,
    e.UnsupportedImage: 415,
    e.PayloadTooLarge: 413,  # ImageTooLarge
    e.NotAcceptable: 406,
    e.JobNotFinished: 409,
    e.Cancelled: 409,
    e.JobExpired: 410,
    e.Overloaded: 503,
    e.NotReady: 503,
    e.ModelLoadError: 503,
    e.DeadlineExceeded: 504,
}

NOT_READY_RETRY_AFTER_S = 2


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def status_of(exc: e.SaliencyError) -> int:
    """The HTTP status of a domain error: its nearest mapped class, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem(
    status: int,
    *,
    detail: str,
    instance: str,
    title: str | None = None,
    type_: str = "about:blank",
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> ProblemResponse:
    """A problem+json response. ``title`` defaults to the status phrase; ``extensions`` are
    members of the problem type's own (RFC 9457 §3.2)."""
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if status == 422:
        body["errors"] = errors or []
    body.update(extensions or {})
    return ProblemResponse(body, status_code=status, headers=headers)


def from_domain(exc: e.SaliencyError, instance: str) -> ProblemResponse:
    """The response for a domain error."""
    status = status_of(exc)
    if status >= 500 and status not in (503, 504):
        log.error("unmapped domain error %s: %s", type(exc).__name__, exc.message)
        return internal_error(instance)
    headers: dict[str, str] = {}
    if isinstance(exc, e.Overloaded | e.RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, e.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="saliency"'
    elif isinstance(exc, e.NotReady | e.ModelLoadError):
        headers["Retry-After"] = str(NOT_READY_RETRY_AFTER_S)
    errors = exc.extra.get("errors")
    if errors is None and exc.field is not None:
        errors = [{"field": exc.field, "message": exc.message}]
    return problem(
        status,
        detail=exc.message,
        instance=instance,
        title=exc.title,
        type_=TYPE_PREFIX + exc.code,
        errors=errors,
        headers=headers or None,
    )


def internal_error(instance: str) -> ProblemResponse:
    """A 500 that tells nothing about the internals."""
    return problem(
        500,
        detail="the server failed to handle this request; quote its X-Request-ID when reporting it",
        instance=instance,
        type_=TYPE_PREFIX + "internal-error",
    )


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """pydantic/FastAPI error dicts → ``{"field", "message"}`` (``in`` when it is not the body)."""
    out: list[dict[str, Any]] = []
    for err in raw:
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc and loc[0] in {"body", "query", "path", "header", "cookie"} else "body"
        name = ".".join(loc[1:] if loc and loc[0] == where else loc) or where
        item: dict[str, Any] = {"field": name, "message": str(err.get("msg", "invalid"))}
        if where != "body":
            item["in"] = where
        out.append(item)
    return out


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _instance(request: Request) -> str:
    return request.url.path


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.SaliencyError)
    return from_domain(exc, _instance(request))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(list(exc.errors()))
    listed = "; ".join(f"{x['field']}: {x['message']}" for x in errors)
    return problem(
        422,
        detail=f"invalid request: {listed}" if listed else "invalid request",
        instance=_instance(request),
        title="Invalid request",
        type_=TYPE_PREFIX + "invalid-parameter",
        errors=errors,
    )


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    headers = dict(exc.headers or {})
    return problem(exc.status_code, detail=detail, instance=_instance(request), headers=headers or None)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(e.SaliencyError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
