"""``AsyncClient``: the same API as ``Client``, awaitable (httpx.AsyncClient)."""

from __future__ import annotations

import asyncio
import inspect
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


class AsyncClient:
    """A client of saliency-service for asyncio code: every method of ``Client``, awaitable.
    ``wait``'s ``progress`` may be a plain function or a coroutine function."""

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=timeout,
            headers=_core.headers(api_key, headers),
            transport=transport,
        )

    # --------------------------------------------------------------------------------------------
    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            response = await self._http.send(call.request(self._http))
            if response.status_code < 400:
                return call.parse(response)
            delay = self.retry.delay(attempt, response)
            if delay is None:
                raise problem(response)
            await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --------------------------------------------------------------------------------------------
    async def models(self) -> list[ModelInfo]:
        return await self._send(_core.models())

    async def model(self, name: str) -> ModelInfo:
        return await self._send(_core.model(name))

    async def layers(self, model: str) -> list[LayerInfo]:
        return await self._send(_core.layers(model))

    async def methods(self) -> list[MethodInfo]:
        return await self._send(_core.methods())

    async def predict(self, model: str, image: ImageInput, *, top_k: int | None = None) -> PredictResult:
        return await self._send(_core.predict(model, image, top_k))

    async def explain(
        self,
        model: str,
        image: ImageInput,
        *,
        method: str = "gradcam",
        format: str = "json",
        **params: ParamValue,
    ) -> ExplainResult:
        return await self._send(_core.explain(model, image, format, {**params, "method": method}))

    async def compare(
        self,
        model: str,
        image: ImageInput,
        *,
        methods: Sequence[str] | None = None,
        format: str = "png",
        **params: ParamValue,
    ) -> CompareResult:
        return await self._send(_core.compare(model, image, methods, format, params))

    async def evaluate(
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
        return await self._send(_core.evaluate(model, image, methods, metrics, box, format, params))

    # --------------------------------------------------------------------------------------------
    async def submit_job(
        self, model: str, images: Sequence[ImageInput], *, method: str = "gradcam", **params: ParamValue
    ) -> Job:
        return await self._send(_core.submit_job(model, images, {**params, "method": method}))

    async def job(self, job: Job | str) -> Job:
        return await self._send(_core.job(job))

    async def cancel(self, job: Job | str) -> Job:
        return await self._send(_core.cancel(job))

    async def wait(
        self,
        job: Job | str,
        *,
        progress: Callable[[Job], object] | None = None,
        timeout: float | None = None,
        poll_interval: float | None = None,
        max_poll_interval: float = 5.0,
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = await self.job(job)
        while True:
            if progress is not None:
                outcome = progress(current)
                if inspect.isawaitable(outcome):
                    await outcome
            if current.finished:
                if current.status == "succeeded":
                    return current
                raise JobFailed(current, _core.job_problem(current))
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(current, timeout or 0.0)
            await asyncio.sleep(_core.poll_delay(current, poll_interval, max_poll_interval))
            current = await self.job(current)

    async def result(
        self, job: Job | str, *, format: str | None = None, index: int | None = None, **params: ParamValue
    ) -> ExplainResult:
        return await self._send(_core.result(job, format, index, params))
