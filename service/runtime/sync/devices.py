"""One worker thread per device for synchronous model work, and the gate jobs yield through.

A ``DeviceWorker`` owns the device's queue of synchronous requests (explain and predict): it
takes batches from a ``BatchQueue``, runs each batch as one engine call on its own thread and
completes the callers' futures. The event loop only ever waits on those futures.

Jobs run on a separate, lower-priority lane (``service.runtime.jobs.local_pool``) with their own model
replica, so a long job never holds the lock of the replica that synchronous requests use. The
``PriorityGate`` gives the synchronous lane precedence: a job calls ``yield_to_foreground``
between chunks and pauses while synchronous requests are waiting or running on its device.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from service.errors import Cancelled, DeviceOutOfMemory
from service.explainers import explain
from service.metrics import Metrics
from service.runtime.sync.batcher import BatchQueue, CallRequest, ExplainRequest, combine, split

log = logging.getLogger(__name__)

Request = ExplainRequest | CallRequest


class PriorityGate:
    """Counts the synchronous requests pending on a device; background work waits while any is.

    A job waits at most ``max_wait_s`` per call, so it still advances (one chunk at a time) under a
    constant stream of requests instead of starving.
    """

    def __init__(self) -> None:
        self._pending = 0
        self._cond = threading.Condition()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._pending > 0

    def enter(self) -> None:
        with self._cond:
            self._pending += 1

    def leave(self) -> None:
        with self._cond:
            self._pending = max(0, self._pending - 1)
            if self._pending == 0:
                self._cond.notify_all()

    def yield_to_foreground(self, max_wait_s: float) -> float:
        """Block while foreground work is pending (at most ``max_wait_s``); returns the seconds waited."""
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0, timeout=max_wait_s)
        return time.monotonic() - start


class DeviceWorker:
    """The synchronous lane of one device: a thread, a batching queue and a priority gate."""

    def __init__(
        self, device: str, *, max_batch: int, max_delay_s: float, metrics: Metrics | None = None
    ) -> None:
        self.device = device
        self.gate = PriorityGate()
        self.metrics = metrics
        self._queue: BatchQueue[Request] = BatchQueue(max_batch, max_delay_s)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, request: Request) -> None:
        """Queue ``request``; its future completes on this worker's thread."""
        self.gate.enter()
        request.future.add_done_callback(lambda _f: self.gate.leave())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"model-{self.device}", daemon=True)
                self._thread.start()
        try:
            self._queue.put(request)
        except RuntimeError:
            request.future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is still queued and stop the thread (the running batch finishes)."""
        for request in self._queue.close():
            request.stop.set()
            request.future.cancel()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while (batch := self._queue.take()) is not None:
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            now = time.monotonic()
            if self.metrics is not None:
                for r in live:
                    self.metrics.queue_wait.labels(kind="sync").observe(now - r.enqueued)
            try:
                if isinstance(live[0], CallRequest):
                    for r in live:
                        assert isinstance(r, CallRequest)
                        _call(r.future, r.fn, r.stop.is_set)
                else:
                    self._explain([r for r in live if isinstance(r, ExplainRequest)])
            except BaseException:  # pragma: no cover - every path above completes its futures
                log.exception("device worker %s: unexpected failure", self.device)
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(RuntimeError("the device worker failed"))

    def _explain(self, requests: list[ExplainRequest]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=requests[0].handle.name).observe(
                sum(r.size for r in requests)
            )
        if len(requests) == 1:
            _explain_alone(requests[0], self.metrics)
            return
        head = requests[0]
        x, targets = combine(requests)
        started = time.perf_counter()
        try:
            out = explain(
                head.handle,
                x,
                head.method,
                head.params,
                targets=targets,
                cancel=lambda: all(r.stop.is_set() for r in requests),
            )
        except Cancelled as exc:
            for r in requests:
                r.future.set_exception(exc)
            return
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                free_device_memory()  # then each alone: smaller calls may fit
            # one request's bad input (say, a target out of range) must not fail the others:
            # each runs alone and gets its own answer or its own error
            log.debug("batch of %d failed (%r); running its requests one by one", len(requests), exc)
            for r in requests:
                _explain_alone(r, self.metrics)
            return
        observe_compute(self.metrics, head.handle.name, head.method, time.perf_counter() - started)
        for r, part in zip(requests, split(out, requests), strict=True):
            r.future.set_result(part)


def _explain_alone(r: ExplainRequest, metrics: Metrics | None) -> None:
    def run(is_cancelled: Any) -> Any:
        started = time.perf_counter()
        out = explain(r.handle, r.x, r.method, r.params, targets=r.targets, cancel=is_cancelled)
        observe_compute(metrics, r.handle.name, r.method, time.perf_counter() - started)
        return out

    _call(r.future, run, r.stop.is_set)


def observe_compute(metrics: Metrics | None, model: str, method: str, seconds: float) -> None:
    """One engine call's time in ``saliency_compute_seconds`` (model and method: the registry's
    and the method registry's names, checked before the work was queued)."""
    if metrics is not None:
        metrics.compute.labels(model=model, method=method).observe(seconds)


#: how long a client should wait after the device ran out of memory
OOM_RETRY_AFTER_S = 2


def free_device_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back after an out-of-memory error, so the
    next request starts from a clean device."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _call(future: Future[Any], fn: Any, is_cancelled: Any) -> None:
    try:
        result = fn(is_cancelled)
    except torch.OutOfMemoryError:
        # the tensors of the failed call are gone with its frames: free the cache, answer 503
        log.warning("the device ran out of memory on a synchronous request; its cache was emptied")
        free_device_memory()
        future.set_exception(
            DeviceOutOfMemory(
                "the device ran out of memory on this request; retry shortly, or ask for less at "
                "once (fewer images or targets, a smaller batch_size), or submit a job",
                retry_after=OOM_RETRY_AFTER_S,
            )
        )
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)
