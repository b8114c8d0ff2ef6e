"""Typed errors: every problem+json answer (RFC 9457) of the service becomes one of these.

``ProblemError`` carries the problem's members (``status``, ``type``, ``title``, ``detail``,
``instance``, the field-level ``errors`` of a 422) and the response's ``X-Request-ID`` and
``Retry-After``. Its subclasses follow the status, so ``except NotFound`` catches an unknown
model or job; the problem ``type`` (``urn:saliency:problem:<code>``) says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saliency_client.types import Job

TYPE_PREFIX = "urn:saliency:problem:"


class SaliencyClientError(Exception):
    """Base class of the client's own errors."""


class ProblemError(SaliencyClientError):
    """An error answer of the service (a 4xx or 5xx, problem+json or not)."""

    def __init__(
        self,
        status: int,
        *,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        instance: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.instance = instance
        self.errors: list[dict[str, Any]] = list(errors or [])
        self.request_id = request_id
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})
        super().__init__(f"{status} {title or 'error'}: {detail}" if detail else f"{status} {title}")

    @property
    def code(self) -> str:
        """The problem type without the service's prefix (``unknown-model``, ``corrupt-image``…)."""
        return self.type.removeprefix(TYPE_PREFIX)

    def fields(self) -> dict[str, str]:
        """The field-level ``errors`` as ``{field: message}``."""
        return {str(e.get("field")): str(e.get("message")) for e in self.errors}


class BadRequest(ProblemError):
    """400."""


class Unauthorized(ProblemError):
    """401: no API key, or a wrong one."""


class Forbidden(ProblemError):
    """403."""


class NotFound(ProblemError):
    """404: unknown model, route, or job (or another key's job)."""


class NotAcceptable(ProblemError):
    """406: no output format satisfies ``Accept``."""


class Conflict(ProblemError):
    """409: the job has not succeeded (yet)."""


class Gone(ProblemError):
    """410: the job finished longer ago than the retention time."""


class PayloadTooLarge(ProblemError):
    """413: the upload, or its decoded pixels, are over the limit."""


class UnsupportedMediaType(ProblemError):
    """415: bytes that are no image of a supported type."""


class Unprocessable(ProblemError):
    """422: invalid parameter (see ``errors``), corrupt image, too heavy, response too large…"""


class RateLimited(ProblemError):
    """429: this API key has too many requests or jobs in flight (see ``retry_after``)."""


class ServerError(ProblemError):
    """500 and other 5xx without a class of their own."""


class ServiceUnavailable(ProblemError):
    """503: the service or a model is not ready, or a queue is full (see ``retry_after``)."""


class GatewayTimeout(ProblemError):
    """504: the request outlived its deadline."""


BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    406: NotAcceptable,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
    429: RateLimited,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}


def error_class(status: int) -> type[ProblemError]:
    """The exception class of an error status."""
    if status in BY_STATUS:
        return BY_STATUS[status]
    return ServerError if status >= 500 else ProblemError


class JobFailed(SaliencyClientError):
    """``wait`` saw the job end without success: failed (``problem`` says why) or cancelled."""

    def __init__(self, job: Job, problem: ProblemError | None) -> None:
        self.job = job
        self.problem = problem
        why = f": {problem.detail}" if problem is not None else ""
        super().__init__(f"job {job.id} {job.status}{why}")


class JobTimeout(SaliencyClientError):
    """``wait`` gave up: the job had not finished within its ``timeout``."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")
