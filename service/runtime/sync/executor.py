"""Runs synchronous model work off the event loop: a worker per device, batching, limits, deadlines.

The HTTP layer awaits ``Executor.explain`` / ``Executor.predict``; the work runs on the device's
worker thread (``service.runtime.sync.devices``), so the event loop (and ``/healthz``) keeps answering.
With batching on, concurrent compatible explain requests share one engine call
(``service.runtime.sync.batcher``). Limits: at most ``queue_size`` requests waiting or running per
model (503 beyond), and a deadline per request (504 past it; a queued request never starts, a
running one stops at its next chunk). The cost limit of synchronous requests (422 pointing to
``/v1/jobs``) is checked by the API before it calls here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from service.config import Settings
from service.errors import DeadlineExceeded, Overloaded
from service.evaluation import EvaluateParams, Evaluation, evaluate, score_maps
from service.explainers import ExplainParams, Explanation, ModelHandle, Targets, predict
from service.imaging.geometry import Geometry
from service.metrics import Metrics
from service.runtime.sync.batcher import CallRequest, make_request
from service.runtime.sync.devices import DeviceWorker, PriorityGate, Request

T = TypeVar("T")


class Executor:
    """The synchronous lane of every device, created on first use."""

    def __init__(
        self,
        *,
        queue_size: int = 64,
        timeout_s: float = 60.0,
        batching: bool = False,
        batch_max_delay_ms: float = 5.0,
        batch_max_size: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.batching = batching and batch_max_size > 1
        self.batch_max_delay_s = batch_max_delay_ms / 1000.0
        self.batch_max_size = batch_max_size
        self.metrics = metrics
        self._workers: dict[str, DeviceWorker] = {}
        self._waiting: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Executor:
        return cls(
            queue_size=settings.sync_queue_size,
            timeout_s=settings.request_timeout_s,
            batching=settings.batching,
            batch_max_delay_ms=settings.batch_max_delay_ms,
            batch_max_size=settings.batch_max_size,
            metrics=metrics,
        )

    # --- devices -------------------------------------------------------------------------------
    def worker(self, device: torch.device | str) -> DeviceWorker:
        key = str(device)
        with self._lock:
            if key not in self._workers:
                self._workers[key] = DeviceWorker(
                    key,
                    max_batch=self.batch_max_size if self.batching else 1,
                    max_delay_s=self.batch_max_delay_s,
                    metrics=self.metrics,
                )
            return self._workers[key]

    def gate(self, device: torch.device | str) -> PriorityGate:
        """The gate that background work on ``device`` yields through (see ``devices``)."""
        return self.worker(device).gate

    # --- calls ---------------------------------------------------------------------------------
    async def explain(
        self,
        handle: ModelHandle,
        x: Tensor,
        method: str,
        params: ExplainParams,
        *,
        targets: Targets | None = None,
        timeout: float | None = None,
    ) -> Explanation:
        """Explain ``x`` for ``targets`` (default: top-1) on the handle's device; may share an
        engine call with concurrent requests."""
        request = make_request(handle, x, method, params, targets or Targets.top(1), batching=self.batching)
        result: Explanation = await self._submit(handle, request, timeout)
        return result

    async def predict(self, handle: ModelHandle, x: Tensor, *, timeout: float | None = None) -> Tensor:
        request = CallRequest(fn=lambda _c: predict(handle, x))
        result: Tensor = await self._submit(handle, request, timeout)
        return result

    async def call(
        self, handle: ModelHandle, fn: Callable[[Callable[[], bool]], T], *, timeout: float | None = None
    ) -> T:
        """Any other model work on the handle's device lane (never batched): ``fn`` gets the
        request's cancellation check, which turns true once its deadline passed."""
        result: T = await self._submit(handle, CallRequest(fn=fn), timeout)
        return result

    async def evaluate(
        self,
        handle: ModelHandle,
        x: Tensor,
        explanations: Sequence[Explanation],
        params: EvaluateParams,
        *,
        seed: int,
        batch_size: int,
        geometry: Geometry | None = None,
        timeout: float | None = None,
    ) -> Evaluation:
        """``service.evaluation.evaluate`` of one image's explanations on the device lane."""
        return await self.call(
            handle,
            lambda cancelled: evaluate(
                handle,
                x,
                explanations,
                params,
                seed=seed,
                batch_size=batch_size,
                geometry=geometry,
                cancel=cancelled,
            ),
            timeout=timeout,
        )

    async def score(
        self,
        handle: ModelHandle,
        x: Tensor,
        expl: Explanation,
        params: EvaluateParams,
        *,
        timeout: float | None = None,
    ) -> list[list[dict[str, list[float]]]]:
        """The curves of every (image, target) map of ``expl`` over ``x``, as (N, K) dicts by kind."""
        n, k = int(expl.maps.shape[0]), int(expl.maps.shape[1])
        maps = [expl.maps[i, j] for i in range(n) for j in range(k)]
        images = [i for i in range(n) for _ in range(k)]
        targets = [int(t) for t in expl.targets.reshape(-1)]

        def run(cancelled: Callable[[], bool]) -> list[dict[str, list[float]]]:
            return score_maps(
                handle,
                x,
                maps,
                images,
                targets,
                kinds=params.curves,
                steps=params.curve_steps,
                substitute=params.substitute,
                batch_size=expl.params.batch_size,
                keep=expl.params.layer,
                cancel=cancelled,
            )

        flat = await self.call(handle, run, timeout=timeout)
        return [flat[i * k : (i + 1) * k] for i in range(n)]

    async def _submit(self, handle: ModelHandle, request: Request, timeout: float | None) -> Any:
        self._reserve(handle)
        request.future.add_done_callback(lambda _f: self._release(handle))
        try:
            self.worker(handle.device).submit(request)
        except RuntimeError:
            raise Overloaded("the service is shutting down", retry_after=1) from None
        return await self._wait(request, timeout or self.timeout_s)

    async def _wait(self, request: Request, timeout: float) -> Any:
        waiter = asyncio.wrap_future(request.future)
        waiter.add_done_callback(_consume)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            request.stop.set()  # a running call stops at its next chunk
            request.future.cancel()  # a queued one never starts
            raise DeadlineExceeded(f"the request did not finish within {timeout:g} s") from None

    def _reserve(self, handle: ModelHandle) -> None:
        with self._lock:
            waiting = self._waiting.get(id(handle), 0)
            if waiting >= self.queue_size:
                raise Overloaded(
                    f"{waiting} requests are already waiting for model {handle.name!r}; retry shortly",
                    retry_after=1,
                )
            self._waiting[id(handle)] = waiting + 1

    def _release(self, handle: ModelHandle) -> None:
        with self._lock:
            self._waiting[id(handle)] = max(0, self._waiting.get(id(handle), 1) - 1)

    def waiting(self, handle: ModelHandle) -> int:
        """Requests waiting or running for ``handle`` (the queue bound's count)."""
        with self._lock:
            return self._waiting.get(id(handle), 0)

    def shutdown(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.close()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a late result's exception so asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()
