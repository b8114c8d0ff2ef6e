"""The edge of every request, as one pure ASGI middleware (outside FastAPI's exception handling).

- ``X-Request-ID``: echoed when the client sent a sane one, else a fresh id; on every response,
  errors included. Routes read it from ``request.state.request_id``.
- Upload limit: a ``Content-Length`` over the limit is refused before any byte is read, and the
  bytes actually received are counted as they stream in (chunked uploads have no length): past
  the limit the request gets 413, whatever the route was doing with the body.
- Anything that escapes the app (a bug) is logged with its traceback and becomes a problem+json
  500 that carries no internals.
- Request durations go to the Prometheus histogram, labelled from closed sets only: the route
  template (``unmatched`` for any path no route serves), a standard verb or ``other``, the status.
- One log line per request (``service.logs``): ``request_id``, ``route`` (the template),
  ``model`` and ``method`` (set by the routes through ``annotate`` once they are known and valid),
  ``status``, ``duration_ms``, the verb and the caller's ``principal`` (a digest, never the key).
  Nothing from the headers or the body.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import problems
from service.errors import PayloadTooLarge
from service.logs import ACCESS_LOGGER
from service.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_HEADER = "X-Request-ID"
# the verbs a metrics label may name; any other (``curl -X ZZ123``) is counted as ``other``
STANDARD_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class BodyTooLarge(PayloadTooLarge):
    """Raised from ``receive`` once the streamed body passes the limit."""


@dataclass
class _Exchange:
    """What the middleware knows about the response so far."""

    status: int = 500
    started: bool = False  # the response head went out
    overflow: bool = False  # the body passed the limit
    swallow: bool = False  # drop the app's own response (a 413 was sent instead)


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: Callable[[Scope], int], metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        sent_id = headers.get(REQUEST_ID_HEADER, "")
        request_id = sent_id if _SANE_ID.match(sent_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        instance = scope.get("path", "/")
        limit = self.max_body_bytes(scope)
        started = time.perf_counter()
        state = _Exchange()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state.overflow and message["status"] != 413:
                    # the route turned the aborted read into something else: answer 413 regardless
                    state.swallow = True
                    await _send_response(send, _too_large(limit, instance), request_id)
                    state.started = True
                    state.status = 413
                    return
                state.started = True
                state.status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            elif state.swallow:
                return
            await send(message)

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state.overflow = True
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
            return message

        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                state.started = True
                state.status = 413
                await _send_response(send, _too_large(limit, instance), request_id)
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:
            if not state.started:
                state.status = 413
                await _send_response(send, _too_large(limit, instance), request_id)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), instance, request_id)
            if state.started:
                raise
            state.status = 500
            await _send_response(send, problems.internal_error(instance), request_id)
        finally:
            self._observe(scope, state.status, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        verb = scope.get("method", "")
        verb = verb if verb in STANDARD_VERBS else "other"
        self.metrics.request_duration.labels(method=verb, route=template, status=str(status)).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            notes = scope.get("state", {})
            fields = {
                "request_id": notes.get("request_id"),
                "route": template,
                "model": notes.get(LOG_MODEL),
                "method": notes.get(LOG_METHOD),
                "status": status,
                "duration_ms": round(seconds * 1000.0, 1),
                "http_method": verb,
                "principal": notes.get("principal"),
            }
            access_log.info("%s %s %d %.1f ms", verb, template, status, seconds * 1000.0, extra=fields)


# where a route notes the model and method of its request for the request's log line
LOG_MODEL = "log_model"
LOG_METHOD = "log_method"


def annotate(scope: Scope, *, model: str | None = None, method: str | None = None) -> None:
    """Note the request's model and (comma-separated) methods for its log line. Call it with
    values already checked (a registry model, known method names): a log field is no place for
    whatever a client sent."""
    notes = scope.setdefault("state", {})
    if model is not None:
        notes[LOG_MODEL] = model
    if method is not None:
        notes[LOG_METHOD] = method


def _too_large(limit: int, instance: str) -> problems.ProblemResponse:
    return problems.from_domain(
        PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes"), instance
    )


async def _send_response(send: Send, response: problems.ProblemResponse, request_id: str) -> None:
    response.headers[REQUEST_ID_HEADER] = request_id
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})
