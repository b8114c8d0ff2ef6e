"""``Client``: the service's API as blocking calls (httpx)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import httpx

from saliency_client import _core
from saliency_client._core import Call, ImageInput, ParamValue, RetryPolicy, problem
from saliency_client.errors import JobFailed, JobTimeout
from saliency_client.types import (
    CompareResult,
    EvaluateResult,
    ExplainResult,
    Job,
    LayerInfo,
    MethodInfo,
    ModelInfo,
    PredictResult,
)

T = TypeVar("T")


class Client:
    """A client of saliency-service.

    ``url``: the service's base URL (``http://127.0.0.1:8000``). ``api_key``: sent as
    ``Authorization: Bearer``. ``timeout``: seconds (or an ``httpx.Timeout``) per request.
    ``retries``, ``backoff``, ``max_backoff``: answers 429 and 503 are retried (see
    ``RetryPolicy``), honouring their ``Retry-After``. Error answers raise ``ProblemError``
    subclasses (``saliency_client.errors``). Use it as a context manager, or ``close()`` it.

    Request parameters (``target``, ``steps``, ``colormap`` …, see ``GET /v1/methods`` and the
    API docs) are keyword arguments; ``None`` leaves one unset (the server's default).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=timeout,
            headers=_core.headers(api_key, headers),
            transport=transport,
        )

    # --------------------------------------------------------------------------------------------
    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            response = self._http.send(call.request(self._http))
            if response.status_code < 400:
                return call.parse(response)
            delay = self.retry.delay(attempt, response)
            if delay is None:
                raise problem(response)
            response.close()
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        """``GET /v1/models``: every configured model (those that failed: ``ready`` false)."""
        return self._send(_core.models())

    def model(self, name: str) -> ModelInfo:
        """``GET /v1/models/{model}``."""
        return self._send(_core.model(name))

    def layers(self, model: str) -> list[LayerInfo]:
        """``GET /v1/models/{model}/layers``: the layers CAM methods can use, the default marked."""
        return self._send(_core.layers(model))

    def methods(self) -> list[MethodInfo]:
        """``GET /v1/methods``: every attribution method and the JSON Schema of its parameters."""
        return self._send(_core.methods())

    def predict(self, model: str, image: ImageInput, *, top_k: int | None = None) -> PredictResult:
        """``POST /v1/models/{model}/predict``: the top-k classes."""
        return self._send(_core.predict(model, image, top_k))

    def explain(
        self,
        model: str,
        image: ImageInput,
        *,
        method: str = "gradcam",
        format: str = "json",
        **params: ParamValue,
    ) -> ExplainResult:
        """``POST /v1/models/{model}/explain``. ``format``: ``json`` (arrays and the resolved
        parameters), ``npy`` (the float32 stack), ``png`` or ``overlay`` (PNG bytes)."""
        return self._send(_core.explain(model, image, format, {**params, "method": method}))

    def compare(
        self,
        model: str,
        image: ImageInput,
        *,
        methods: Sequence[str] | None = None,
        format: str = "png",
        **params: ParamValue,
    ) -> CompareResult:
        """``POST /v1/models/{model}/compare``: one labelled grid (png) or every method's JSON."""
        return self._send(_core.compare(model, image, methods, format, params))

    def evaluate(
        self,
        model: str,
        image: ImageInput,
        *,
        methods: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        box: Sequence[int] | str | None = None,
        format: str = "json",
        **params: ParamValue,
    ) -> EvaluateResult:
        """``POST /v1/models/{model}/evaluate``: deletion/insertion AUCs, pointing, sanity."""
        return self._send(_core.evaluate(model, image, methods, metrics, box, format, params))

    # --------------------------------------------------------------------------------------------
    def submit_job(
        self, model: str, images: Sequence[ImageInput], *, method: str = "gradcam", **params: ParamValue
    ) -> Job:
        """``POST /v1/jobs``: queue the images; returns the job (``queued``)."""
        return self._send(_core.submit_job(model, images, {**params, "method": method}))

    def job(self, job: Job | str) -> Job:
        """``GET /v1/jobs/{id}``: status and progress."""
        return self._send(_core.job(job))

    def cancel(self, job: Job | str) -> Job:
        """``DELETE /v1/jobs/{id}``."""
        return self._send(_core.cancel(job))

    def wait(
        self,
        job: Job | str,
        *,
        progress: Callable[[Job], object] | None = None,
        timeout: float | None = None,
        poll_interval: float | None = None,
        max_poll_interval: float = 5.0,
    ) -> Job:
        """Poll until the job finishes; ``progress(job)`` after each poll. Returns the succeeded
        job; raises ``JobFailed`` (failed or cancelled) or ``JobTimeout`` (after ``timeout`` s).
        Polls as the server's ``Retry-After`` says, unless ``poll_interval`` is given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.job(job)
        while True:
            if progress is not None:
                progress(current)
            if current.finished:
                return _finished(current)
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(current, timeout or 0.0)
            time.sleep(_core.poll_delay(current, poll_interval, max_poll_interval))
            current = self.job(current)

    def result(
        self, job: Job | str, *, format: str | None = None, index: int | None = None, **params: ParamValue
    ) -> ExplainResult:
        """``GET /v1/jobs/{id}/result``: JSON (default: every image, each entry's ``image_index``),
        or ``png``/``overlay``/``npy`` of image ``index``; rendering ``params`` override the job's.
        A ``task="evaluate"`` job's scores are in ``raw`` (no ``explanations``)."""
        return self._send(_core.result(job, format, index, params))


def _finished(job: Job) -> Job:
    if job.status == "succeeded":
        return job
    raise JobFailed(job, _core.job_problem(job))
