"""Running one job: the code both the local worker pool and the Celery worker execute.

``JobRunner.run(job_id)`` takes the job from the store (compare-and-set: a job that was
cancelled, already taken or is gone is skipped), decodes and preprocesses its images, runs the
engine over them in groups, reports progress after every chunk of passes, and stores the result
or a problem object. Between chunks it checks that it still holds the job (a ``DELETE`` or a
re-queue takes it away) and, on a shared device, lets synchronous requests go first.

The store may be briefly unreachable (Redis restarting): a failed progress report or heartbeat is
logged and the job goes on, and storing the outcome is retried with backoff
(``finish_attempts``) before the runner gives up and leaves the job to lease recovery. A result
larger than ``job_max_result_bytes`` fails the job with ``result-too-large`` instead of being
sent to a store that would refuse it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from torch import Tensor

from service.config import Settings
from service.errors import Cancelled, ResultTooLarge, SaliencyError
from service.evaluation import EvaluateParams, evaluate, report
from service.explainers import ExplainParams, Explanation, ModelHandle, Targets, explain, get_method, predict
from service.imaging.decode import decode_upload
from service.imaging.geometry import Geometry
from service.metrics import JOB_TASKS, Metrics
from service.models.registry import LoadedModel
from service.runtime.jobs.result import JobResult, concat, encode
from service.runtime.jobs.store import JobRecord, JobSpec, JobStatus, JobStore, error_info
from service.runtime.sync.devices import PriorityGate, observe_compute

log = logging.getLogger(__name__)

# longest a job pauses at one chunk boundary while synchronous requests use its device
MAX_YIELD_S = 1.0
# most images in one engine call of a job
MAX_GROUP_IMAGES = 64
# storing a job's outcome: tries, and the first wait between them (doubling up to MAX_BACKOFF_S)
FINISH_ATTEMPTS = 6
FINISH_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0

ModelLookup = Callable[[str], tuple[LoadedModel, ModelHandle]]


def internal_error(job_id: str) -> dict[str, str]:
    return {
        "code": "internal-error",
        "title": "Internal error",
        "detail": f"the job failed unexpectedly; quote its id {job_id} when reporting it",
    }


def out_of_memory_error(params: ExplainParams) -> dict[str, str]:
    return {
        "code": "out-of-memory",
        "title": "Out of device memory",
        "detail": f"the device ran out of memory; submit the job again with a batch_size below {params.batch_size}",
    }


def group_size(spec: JobSpec, params: ExplainParams) -> int:
    """Images per engine call: enough to fill ``batch_size`` passes, at least one."""
    per_image = get_method(spec.method).passes(params) * spec.target_set().per_image
    return max(1, min(MAX_GROUP_IMAGES, params.batch_size // max(1, per_image)))


@dataclass
class _Lease:
    """The runner's hold on one job; ``lost`` once the store says the job is no longer ours."""

    job_id: str
    token: str
    lost: threading.Event = field(default_factory=threading.Event)


@dataclass
class JobRunner:
    """Executes jobs from ``store`` with the models ``models`` hands out (name → model, replica)."""

    store: JobStore
    settings: Settings
    models: ModelLookup
    worker: str
    gate: Callable[[ModelHandle], PriorityGate | None] = lambda _h: None
    metrics: Metrics | None = None
    heartbeat_s: float | None = None  # a thread refreshes the lease this often (Celery workers)
    stopping: threading.Event = field(default_factory=threading.Event)
    finish_attempts: int = FINISH_ATTEMPTS
    finish_backoff_s: float = FINISH_BACKOFF_S

    def run(self, job_id: str) -> JobStatus | None:
        """Run the job if it is queued; its final status, or ``None`` if it was not ours to run."""
        if self.stopping.is_set():
            return None
        token = self.store.start(job_id, self.worker)
        if token is None:
            log.info("job %s is not queued any more; skipped", job_id)
            return None
        lease = _Lease(job_id, token)
        beat = self._heartbeat(lease)
        try:
            record = self.store.get(job_id)
            if self.metrics is not None and record.started_at is not None:
                self.metrics.queue_wait.labels(kind="job").observe(
                    max(0.0, record.started_at - record.created_at)
                )
            return self._run(record, lease)
        finally:
            if beat is not None:
                beat.set()

    def _run(self, record: JobRecord, lease: _Lease) -> JobStatus | None:
        spec = record.spec
        started = time.perf_counter()
        status: JobStatus
        try:
            params = spec.explain_params()
            loaded, handle = self.models(spec.model)
            images = self.store.inputs(record.id)
            if len(images) != spec.images:
                raise SaliencyError(f"the job's {spec.images} input images are gone from the store")
            x, geometries = self._prepare(loaded, images)
            if spec.task == "evaluate":
                blob = self._evaluate(lease, loaded, handle, x, spec, params, started)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
            else:
                explanation = self._explain(lease, handle, x, spec, params)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                blob = encode(
                    JobResult(explanation, geometries, elapsed_ms), keep_attributions=spec.keep_attributions
                )
            self._check_size(blob)
        except Cancelled:
            self._observe(record, "stopped", started)
            log.info(
                "job %s stopped: %s",
                record.id,
                "lost its lease" if lease.lost.is_set() else "shutdown",
                extra=self._fields(record, "stopped", started),
            )
            return None
        except SaliencyError as exc:
            log.info(
                "job %s failed: %s", record.id, exc.message, extra=self._fields(record, "failed", started)
            )
            status, error = "failed", error_info(exc)
        except torch.OutOfMemoryError:
            log.warning(
                "job %s ran out of device memory", record.id, extra=self._fields(record, "failed", started)
            )
            status, error = "failed", out_of_memory_error(spec.explain_params())
        except Exception:
            log.exception(
                "job %s failed unexpectedly", record.id, extra=self._fields(record, "failed", started)
            )
            status, error = "failed", internal_error(record.id)
        else:
            ok = self._finish(lease, "succeeded", result=blob)
            self._observe(record, "succeeded", started)
            log.info(
                "job %s succeeded in %.0f ms%s",
                record.id,
                elapsed_ms,
                "" if ok else " (too late)",
                extra=self._fields(record, "succeeded", started),
            )
            return "succeeded" if ok else None
        self._observe(record, status, started)
        return status if self._finish(lease, status, error=error) else None

    def _observe(self, record: JobRecord, outcome: str, started: float) -> None:
        """The job's run time in ``saliency_job_duration_seconds`` (task and outcome: closed sets)."""
        if self.metrics is not None:
            task = record.spec.task if record.spec.task in JOB_TASKS else "explain"
            self.metrics.job_duration.labels(task=task, state=outcome).observe(time.perf_counter() - started)

    @staticmethod
    def _fields(record: JobRecord, outcome: str, started: float) -> dict[str, Any]:
        """The structured fields of a job's outcome log line."""
        spec = record.spec
        return {
            "job_id": record.id,
            "task": spec.task,
            "model": spec.model,
            "method": ",".join(spec.methods or [spec.method]),
            "images": spec.images,
            "state": outcome,
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 1),
        }

    def _check_size(self, blob: bytes) -> None:
        limit = self.settings.job_max_result_bytes
        if len(blob) > limit:
            raise ResultTooLarge(
                f"the job's result takes {len(blob)} bytes; the store keeps at most {limit} per job: "
                "submit fewer images or targets",
            )

    def _finish(
        self,
        lease: _Lease,
        status: JobStatus,
        *,
        error: dict[str, str] | None = None,
        result: bytes | None = None,
    ) -> bool:
        """``store.finish``, retried with backoff while the store fails (a restart, a failover):
        the work is done and worth waiting for. The heartbeat goes on meanwhile, so the lease holds.
        After the last try the error propagates and lease recovery takes over."""
        delay = self.finish_backoff_s
        for attempt in range(1, self.finish_attempts + 1):
            try:
                return self.store.finish(lease.job_id, lease.token, status, error=error, result=result)
            except Exception as exc:
                if attempt == self.finish_attempts:
                    log.error(
                        "job %s: could not store its outcome after %d tries: %r", lease.job_id, attempt, exc
                    )
                    raise
                log.warning(
                    "job %s: could not store its outcome (try %d of %d): %r; retrying in %.1f s",
                    lease.job_id,
                    attempt,
                    self.finish_attempts,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)
        return False  # not reached: the last try returns or raises

    def _prepare(self, loaded: LoadedModel, images: list[bytes]) -> tuple[Tensor, list[Geometry]]:
        xs: list[Tensor] = []
        geometries: list[Geometry] = []
        for data in images:
            image = decode_upload(data, self.settings)
            x, geometry = loaded.preprocess(image)
            xs.append(x)
            geometries.append(geometry)
        return torch.stack(xs), geometries

    def _explain(
        self, lease: _Lease, handle: ModelHandle, x: Tensor, spec: JobSpec, params: ExplainParams
    ) -> Explanation:
        n = int(x.shape[0])
        group = group_size(spec, params)
        targets = spec.target_set()
        gate = self.gate(handle)
        done = 0
        outside = 0.0  # seconds of the current chunk spent reporting and yielding, not computing

        def cancelled() -> bool:
            return lease.lost.is_set() or self.stopping.is_set()

        def progress(fraction: float) -> None:
            nonlocal outside
            t0 = time.perf_counter()
            self._report(lease, (done + fraction * min(group, n - done)) / n)
            if gate is not None:
                gate.yield_to_foreground(MAX_YIELD_S)
            outside += time.perf_counter() - t0

        parts: list[Explanation] = []
        for start in range(0, n, group):
            if gate is not None:
                gate.yield_to_foreground(MAX_YIELD_S)
            if cancelled():
                raise Cancelled("the job was cancelled")
            stop = min(n, start + group)
            outside, t0 = 0.0, time.perf_counter()
            parts.append(
                explain(
                    handle,
                    x[start:stop],
                    spec.method,
                    params,
                    targets=targets.select(slice(start, stop)),
                    progress=progress,
                    cancel=cancelled,
                )
            )
            observe_compute(self.metrics, spec.model, spec.method, time.perf_counter() - t0 - outside)
            done = stop
        return concat(parts)

    def _evaluate(
        self,
        lease: _Lease,
        loaded: LoadedModel,
        handle: ModelHandle,
        x: Tensor,
        spec: JobSpec,
        params: ExplainParams,
        started: float,
    ) -> bytes:
        """An evaluate job: per image, each method's explanation for the image's one target (the
        given class, else its top-1), then ``service.evaluation.evaluate`` (without curves in the
        result: the scores); the JSON of every image and each method's mean and deviation."""
        evaluation = EvaluateParams(**(spec.evaluate or {}))
        methods = spec.methods or [spec.method]
        assert params.seed is not None, "the seed is drawn at submission"
        gate = self.gate(handle)

        def cancelled() -> bool:
            return lease.lost.is_set() or self.stopping.is_set()

        images: list[dict[str, Any]] = []
        n = int(x.shape[0])
        for i in range(n):
            if gate is not None:
                gate.yield_to_foreground(MAX_YIELD_S)
            if cancelled():
                raise Cancelled("the job was cancelled")
            xi = x[i : i + 1]
            target = spec.targets[0] if spec.targets else int(predict(handle, xi).argmax(dim=1)[0])
            given = Targets.given([[target]])
            explanations = []
            for m in methods:
                t0 = time.perf_counter()
                explanations.append(explain(handle, xi, m, params, targets=given, cancel=cancelled))
                observe_compute(self.metrics, spec.model, m, time.perf_counter() - t0)
            ev = evaluate(
                handle,
                xi,
                explanations,
                evaluation,
                seed=params.seed,
                batch_size=params.batch_size,
                cancel=cancelled,
            )
            images.append(
                {
                    "image_index": i,
                    "target": {
                        "index": ev.target,
                        "label": loaded.label(ev.target),
                        "score": round(ev.score, 6),
                    },
                    "results": report.results(ev, evaluation, curves=False),
                }
            )
            self._report(lease, (i + 1) / n)
        body = {
            "model": spec.model,
            "task": "evaluate",
            "methods": methods,
            "parameters": {**evaluation.requested(), **params.requested()},
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 1),
            "images": images,
            "summary": report.summary(images, methods),
        }
        return orjson.dumps(body)

    def _report(self, lease: _Lease, value: float | None) -> None:
        try:
            if not self.store.progress(lease.job_id, lease.token, value):
                lease.lost.set()
        except Exception as exc:  # a store hiccup must not fail the job; the lease covers it
            log.warning("job %s: could not record progress: %r", lease.job_id, exc)

    def _heartbeat(self, lease: _Lease) -> threading.Event | None:
        """Refresh the lease from a thread of its own, so a long chunk does not look like a dead worker."""
        if self.heartbeat_s is None:
            return None
        stop = threading.Event()
        interval = self.heartbeat_s

        def beat() -> None:
            while not stop.wait(interval):
                self._report(lease, None)

        threading.Thread(target=beat, name=f"heartbeat-{lease.job_id[:8]}", daemon=True).start()
        return stop
