"""Domain exceptions, shared by the engine, the registry, imaging and the runtime.

Nothing here knows about HTTP. Each exception carries a stable ``code`` (a short slug used as the
problem ``type``) and a human-readable message; ``service.api.problems`` maps each class to a
status code exactly once, at the edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class SaliencyError(Exception):
    """Base class of every error the service raises on purpose."""

    code: str = "saliency-error"
    title: str = "Saliency service error"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra


def _known(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "(none)"


# --- lookups -----------------------------------------------------------------------------------
class NotFound(SaliencyError):
    code = "not-found"
    title = "Not found"


class UnknownModel(NotFound):
    code = "unknown-model"
    title = "Unknown model"

    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(f"no model named {name!r}; known models: {_known(known)}", field="model")
        self.name = name


class UnknownMethod(SaliencyError):
    """An unknown method name in a request (a parameter problem, so 422 at the edge)."""

    code = "unknown-method"
    title = "Unknown method"

    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(f"no method named {name!r}; known methods: {_known(known)}", field="method")
        self.name = name


class UnknownLayer(SaliencyError):
    code = "unknown-layer"
    title = "Unknown layer"

    def __init__(
        self, name: str, known: Iterable[str], *, usable: bool = False, reason: str | None = None
    ) -> None:
        """``usable``: ``known`` lists the layers CAM methods can use (``GET /v1/models/{model}/layers``),
        not every module; ``reason``: why ``name``, a module of the model, is not among them."""
        names = list(known)
        shown = ", ".join(names[:200]) + (" …" if len(names) > 200 else "")
        if reason is not None:
            what = f"layer {name!r} cannot be used by CAM methods: {reason}; usable layers: {shown}"
        elif usable:
            what = f"the model has no layer named {name!r} that CAM methods can use; usable layers: {shown}"
        else:
            what = f"the model has no layer named {name!r}; valid layers: {shown}"
        super().__init__(what, field="layer")
        self.name = name


class DuplicateName(SaliencyError):
    """Raised at import/start-up when a registry gets the same name twice."""

    code = "duplicate-name"
    title = "Duplicate registry name"


# --- invalid requests ----------------------------------------------------------------------------
class InvalidParameter(SaliencyError):
    code = "invalid-parameter"
    title = "Invalid parameter"


class TargetOutOfRange(InvalidParameter):
    code = "target-out-of-range"
    title = "Target class out of range"


class MethodNotApplicable(SaliencyError):
    """The method cannot explain this model (for example CAM on a model without a GAP+linear head)."""

    code = "method-not-applicable"
    title = "Method not applicable to this model"


class PrecisionUnavailable(SaliencyError):
    """The requested arithmetic precision cannot serve this call: the device has no bf16 matrix
    units, or the method's bf16 maps were not measured to agree with its fp32 maps."""

    code = "precision-unavailable"
    title = "Precision not available"


class TooHeavy(SaliencyError):
    """Work too large for where it was asked: a synchronous request (submit a job instead) or a
    job (above ``job_max_passes`` or ``job_max_result_bytes``: split it)."""

    code = "too-heavy"
    title = "Too heavy for a synchronous request"


class ResultTooLarge(TooHeavy):
    """A job's encoded result is larger than the store keeps (``job_max_result_bytes``).

    Submission refuses jobs whose estimated result is too large; this is the backstop when the
    estimate fell short. 422 (through ``TooHeavy``), not 507: the limit is a property of the
    request (the same job fails the same way every time, whatever the server's free space), and
    the remedy is the client's (fewer images, targets or per-channel attributions)."""

    code = "result-too-large"
    title = "Result too large"


# --- images --------------------------------------------------------------------------------------
class PayloadTooLarge(SaliencyError):
    code = "payload-too-large"
    title = "Payload too large"


class ImageTooLarge(PayloadTooLarge):
    code = "image-too-large"
    title = "Image has too many pixels"


class UnsupportedImage(SaliencyError):
    code = "unsupported-media-type"
    title = "Unsupported media type"


class CorruptImage(SaliencyError):
    code = "corrupt-image"
    title = "Corrupt or truncated image"


class ImageTooSmall(SaliencyError):
    code = "image-too-small"
    title = "Image too small"


class NotAcceptable(SaliencyError):
    code = "not-acceptable"
    title = "Not acceptable"


# --- runtime -------------------------------------------------------------------------------------
class Overloaded(SaliencyError):
    code = "overloaded"
    title = "Service overloaded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(SaliencyError):
    """One client (API key) is over its share: concurrent requests or queued jobs (429)."""

    code = "rate-limited"
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(SaliencyError):
    """No API key, or one the server does not know (401). Never carries the key."""

    code = "unauthorized"
    title = "Unauthorized"


class ResponseTooLarge(SaliencyError):
    """The response a request asks for is estimated above the server's limit (422)."""

    code = "response-too-large"
    title = "Response too large"


class DeviceOutOfMemory(Overloaded):
    """The device ran out of memory on a request; its cache was emptied (503, retry)."""

    code = "device-out-of-memory"
    title = "Device out of memory"


class DeadlineExceeded(SaliencyError):
    code = "deadline-exceeded"
    title = "Request deadline exceeded"


class NotReady(SaliencyError):
    code = "not-ready"
    title = "Not ready"


class ModelUnavailable(NotReady):
    """A configured model that failed to load or warm up: the others serve, this one answers 503."""

    code = "model-unavailable"
    title = "Model unavailable"


class JobNotFound(NotFound):
    code = "job-not-found"
    title = "Job not found"


class JobExpired(SaliencyError):
    code = "job-expired"
    title = "Job expired"


class JobNotFinished(SaliencyError):
    code = "job-not-finished"
    title = "Job not finished"


class Cancelled(SaliencyError):
    """Raised inside the engine's chunk loop when a caller's cancel flag is set."""

    code = "cancelled"
    title = "Cancelled"


class ModelLoadError(SaliencyError):
    code = "model-load-error"
    title = "Model could not be loaded"


class ConfigError(SaliencyError):
    code = "config-error"
    title = "Invalid configuration"
