"""Runs model work off the event loop: one worker thread per device, a bounded queue, deadlines.

The HTTP layer awaits ``Executor.explain`` / ``Executor.predict``; model work happens on the
device's worker thread, so the event loop (and ``/healthz``) keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from torch import Tensor

from service.errors import DeadlineExceeded, Overloaded
from service.explainers import ExplainParams, Explanation, ModelHandle, explain, predict
from service.explainers.engine import TargetSpec

T = TypeVar("T")


class Executor:
    """One single-thread pool per device; at most ``queue_size`` calls waiting or running."""

    def __init__(self, *, queue_size: int = 64, timeout_s: float = 60.0) -> None:
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(queue_size)
        self.timeout_s = timeout_s

    def _pool(self, handle: ModelHandle) -> ThreadPoolExecutor:
        key = str(handle.device)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{key}")
            return self._pools[key]

    async def _run(
        self, handle: ModelHandle, fn: Callable[[Callable[[], bool]], T], timeout: float | None
    ) -> T:
        if not self._slots.acquire(blocking=False):
            raise Overloaded("too many requests are waiting for this model; retry shortly", retry_after=1)
        cancelled = threading.Event()
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool(handle), fn, cancelled.is_set)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout or self.timeout_s)
            except TimeoutError:
                cancelled.set()  # the engine stops at its next chunk
                raise DeadlineExceeded(
                    f"the request did not finish within {timeout or self.timeout_s:g} s"
                ) from None
        finally:
            self._slots.release()

    async def explain(
        self,
        handle: ModelHandle,
        x: Tensor,
        method: str,
        params: ExplainParams,
        *,
        targets: TargetSpec = None,
        top_k: int = 1,
        timeout: float | None = None,
    ) -> Explanation:
        def work(is_cancelled: Callable[[], bool]) -> Explanation:
            return explain(handle, x, method, params, targets=targets, top_k=top_k, cancel=is_cancelled)

        return await self._run(handle, work, timeout)

    async def predict(self, handle: ModelHandle, x: Tensor, *, timeout: float | None = None) -> Tensor:
        return await self._run(handle, lambda _c: predict(handle, x), timeout)

    def shutdown(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            self._pools.clear()
