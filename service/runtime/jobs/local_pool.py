"""The local worker pool: one job lane (a thread) per device, jobs in FIFO order.

Each lane owns a *replica* of every model on its device: a ``ModelHandle`` over the same
resident weights with its own lock and its own private prepared copy. So a job never holds the
lock that synchronous requests take, and the two lanes of a device interleave: the job lane
yields to the synchronous lane at every chunk boundary (``PriorityGate``), so a Grad-CAM request
waits for at most the rest of one job chunk, never for the whole job. The price is one more
prepared copy of each model per device.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import replace

from service.config import Settings
from service.explainers import ModelHandle
from service.metrics import Metrics
from service.models.registry import LoadedModel, ModelRegistry
from service.runtime.jobs.runner import JobRunner
from service.runtime.jobs.store import JobStore
from service.runtime.sync.devices import PriorityGate
from service.runtime.sync.executor import Executor

log = logging.getLogger(__name__)


def replica(handle: ModelHandle) -> ModelHandle:
    """A handle over the same weights with its own lock and prepared copies."""
    return replace(handle, lock=threading.RLock(), _prepared=OrderedDict())


class JobLane:
    """One device's job thread and its FIFO of job ids."""

    def __init__(self, device: str, runner: JobRunner) -> None:
        self.device = device
        self.runner = runner
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"jobs-{device}", daemon=True)
        self._thread.start()

    def put(self, job_id: str) -> None:
        self._queue.put(job_id)

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                self.runner.run(job_id)
            except Exception:  # the runner stores job failures itself; this is the store failing
                log.exception("job lane %s: job %s could not be run", self.device, job_id)


class LocalPool:
    """Job lanes for the devices of the registry's models, sharing one ``JobRunner``."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: JobStore,
        settings: Settings,
        executor: Executor,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self._replicas: dict[str, tuple[LoadedModel, ModelHandle]] = {}
        self._lock = threading.Lock()
        self._lanes: dict[str, JobLane] = {}
        self.runner = JobRunner(
            store=store,
            settings=settings,
            models=self.lookup,
            worker="local",
            gate=self.gate,
            metrics=metrics,
        )

    def lookup(self, name: str) -> tuple[LoadedModel, ModelHandle]:
        """The model and this pool's replica of it (made on first use)."""
        with self._lock:
            if name not in self._replicas:
                model = self.registry.get(name)
                self._replicas[name] = (model, replica(model.handle))
            return self._replicas[name]

    def gate(self, handle: ModelHandle) -> PriorityGate:
        return self.executor.gate(handle.device)

    def submit(self, job_id: str, model: str) -> None:
        """Queue the job on the lane of its model's device."""
        device = str(self.registry.get(model).device)
        with self._lock:
            lane = self._lanes.get(device)
            if lane is None:
                lane = self._lanes[device] = JobLane(device, self.runner)
        lane.put(job_id)

    def stop(self, timeout: float = 10.0) -> None:
        self.runner.stopping.set()  # a running job stops at its next chunk
        with self._lock:
            lanes = list(self._lanes.values())
            self._lanes.clear()
        for lane in lanes:
            lane.stop(timeout)
