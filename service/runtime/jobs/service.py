"""The job service: heavy explanations run as jobs that clients submit, poll and fetch.

Two backends behind one interface (``settings.jobs_backend``):

- ``local`` (default): jobs run in this process on the local worker pool
  (``service.runtime.jobs.local_pool``: one lane per device, FIFO, yielding to synchronous requests);
  records live in memory (``MemoryJobStore``) and end with the process.
- ``celery``: the API enqueues a Celery task on Redis and any ``saliency worker`` runs it
  (``service.runtime.jobs.celery_app``); records, inputs and results live in Redis
  (``RedisJobStore``), so every API replica answers for every job and restarts lose nothing.
  A maintenance loop re-queues running jobs whose worker stopped sending heartbeats (or fails
  them after ``job_max_attempts`` deliveries), and sends a queued job's message again when no
  worker has taken it for a while (a message lost to a worker that could not start it, or to a
  failed enqueue).

Every job belongs to the API key that submitted it: reads on a client's behalf pass its
``owner``, and another owner's job answers exactly as an unknown id. Submission refuses up front
what the service could not carry through: more passes than ``job_max_passes``, a result larger
than ``job_max_result_bytes`` (422), a full store (503) or an owner at ``max_jobs_per_key``
active jobs (429).

Everything the store does is blocking I/O; it runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from service.config import Settings
from service.errors import InvalidParameter, JobNotFinished, Overloaded, TooHeavy
from service.evaluation import EvaluateParams, sanity_blocks
from service.evaluation import cost as evaluation_cost
from service.explainers import ExplainParams, Targets, get_method
from service.explainers.engine import resolve_params
from service.metrics import Metrics
from service.models.registry import LoadedModel, ModelRegistry
from service.runtime.jobs.local_pool import LocalPool
from service.runtime.jobs.result import JobResult, decode, encoded_size
from service.runtime.jobs.store import (
    JobRecord,
    JobSpec,
    JobStore,
    Limits,
    MemoryJobStore,
    check_job_id,
    new_job_id,
)
from service.runtime.sync.executor import Executor

log = logging.getLogger(__name__)

T = TypeVar("T")

#: an evaluate job's result per image and method: target, AUCs, random AUCs, pointing, sanity
EVALUATION_ENTRY_BYTES = 2048
RETRY_AFTER_QUEUED_S = 2
RETRY_AFTER_RUNNING_S = 1


def make_spec(
    model: LoadedModel,
    method: str,
    params: ExplainParams,
    targets: Targets,
    *,
    images: int,
    keep_attributions: bool = False,
    keep_inputs: bool = False,
    options: dict[str, Any] | None = None,
) -> JobSpec:
    """Check everything that can be checked before the job runs, and fix the seed and layer.

    A job that is valid here fails later only for reasons of the server's own. The seed is drawn
    now (when not given), so a redelivered job computes the same result and reports the same
    parameters. Blocking (resolving a layer may measure the model): run it off the event loop.
    """
    m = get_method(method)
    params = resolve_params(m, model.handle, params)
    targets.check(model.num_classes)
    if images < 1:
        raise InvalidParameter("a job needs at least one image", field="images")
    classes = set(targets.classes or ())
    if len(classes) > 1:
        raise InvalidParameter("a job explains the same targets for every image", field="target")
    return JobSpec(
        model=model.name,
        method=m.name,
        params=params.as_dict(),
        targets=list(classes.pop()) if classes else None,
        top_k=1 if targets.explicit else targets.top_k,
        images=images,
        keep_attributions=keep_attributions,
        keep_inputs=keep_inputs,
        options=dict(options or {}),
    )


def check_size(settings: Settings, model: LoadedModel, spec: JobSpec) -> int:
    """``TooHeavy`` (422) for a job above ``job_max_passes`` or whose stored result would exceed
    ``job_max_result_bytes``; else that result's estimated size, which the store reserves.

    Passes are counted with ``Method.cost`` on the model (Score-CAM by its layer's channels), as
    the synchronous budget counts them; the result with ``result.encoded_size``, the estimate that
    sits next to the encoder. Refusing here, before anything runs, is the point: the job would
    otherwise run for hours and then fail to be stored."""
    m = get_method(spec.method)
    per_image = spec.target_set().per_image
    passes = spec.images * per_image * m.cost(spec.explain_params(), model.handle)
    if passes > settings.job_max_passes:
        raise TooHeavy(
            f"this job needs {passes} forward/backward passes; a job may take at most "
            f"{settings.job_max_passes}: fewer images, targets, steps or samples",
            field="images",
        )
    size = encoded_size(spec.images, per_image, model.input_size, keep_attributions=spec.keep_attributions)
    if size > settings.job_max_result_bytes:
        keep = " or without per-channel attributions" if spec.keep_attributions else ""
        raise TooHeavy(
            f"this job's result would take about {size} bytes; the store keeps at most "
            f"{settings.job_max_result_bytes} per job: submit fewer images or targets{keep}",
            field="images",
        )
    return size


def retry_after(record: JobRecord) -> int | None:
    """Seconds a client should wait before polling again; ``None`` once the job has finished."""
    if record.status == "queued":
        return RETRY_AFTER_QUEUED_S
    if record.status == "running":
        return RETRY_AFTER_RUNNING_S
    return None


class JobService:
    """Accepts jobs and answers for them; the backends decide where the jobs run."""

    backend = "base"
    tick_s = 2.0

    def __init__(
        self, settings: Settings, registry: ModelRegistry, store: JobStore, metrics: Metrics | None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._ticker: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers (local) or the maintenance loop (Celery)."""
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"jobs-{self.backend}")

    async def stop(self) -> None:
        """Stop the maintenance loop and release the workers."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await asyncio.to_thread(self._shutdown)

    # --- the API's calls -----------------------------------------------------------------------
    async def plan(
        self,
        model: LoadedModel,
        method: str,
        params: ExplainParams,
        targets: Targets,
        *,
        images: int,
        keep_attributions: bool = False,
        keep_inputs: bool = False,
        options: dict[str, Any] | None = None,
    ) -> tuple[JobSpec, int]:
        """The job's spec and its result's estimated size, or the reason it is refused: too many
        images, an unusable layer, too many passes, too large a result. Nothing is stored; the
        caller checks the images next (decoding is work too: it comes after this)."""
        if images > self.settings.job_max_images:
            raise InvalidParameter(
                f"a job takes at most {self.settings.job_max_images} images (got {images})",
                field="images",
            )

        def plan() -> tuple[JobSpec, int]:
            spec = make_spec(
                model,
                method,
                params,
                targets,
                images=images,
                keep_attributions=keep_attributions,
                keep_inputs=keep_inputs,
                options=options,
            )
            return spec, check_size(self.settings, model, spec)

        return await asyncio.to_thread(plan)

    async def plan_evaluation(
        self,
        model: LoadedModel,
        methods: list[str],
        params: ExplainParams,
        evaluation: EvaluateParams,
        targets: Targets,
        *,
        images: int,
    ) -> tuple[JobSpec, int]:
        """``plan`` for ``task=evaluate``: every method resolved on the model (an unusable layer
        refused now), the seed fixed, the passes of the explanations, curves and sanity checks
        of every image against ``job_max_passes``; the result is small JSON."""
        if images > self.settings.job_max_images:
            raise InvalidParameter(
                f"a job takes at most {self.settings.job_max_images} images (got {images})",
                field="images",
            )

        def plan() -> tuple[JobSpec, int]:
            seeded = params if params.seed is not None else params.with_(seed=secrets.randbits(62))
            spec = make_spec(model, methods[0], seeded, targets, images=images)
            costs = [
                get_method(m).cost(resolve_params(get_method(m), model.handle, seeded), model.handle)
                for m in methods
            ]
            blocks = sanity_blocks(model.handle) if "sanity" in evaluation.metric_list else 0
            passes = images * evaluation_cost(evaluation, costs, blocks)
            if passes > self.settings.job_max_passes:
                raise TooHeavy(
                    f"this job needs {passes} forward/backward passes; a job may take at most "
                    f"{self.settings.job_max_passes}: fewer images, methods or curve_steps",
                    field="images",
                )
            size = images * len(methods) * EVALUATION_ENTRY_BYTES + 4096
            spec = replace(
                spec,
                params=seeded.as_dict(),
                task="evaluate",
                methods=list(methods),
                evaluate=evaluation.as_dict(),
            )
            return spec, size

        return await asyncio.to_thread(plan)

    async def submit(
        self, spec: JobSpec, result_bytes: int, images: list[bytes], *, owner: str | None
    ) -> JobRecord:
        """Queue a planned job (``plan``) over ``images`` (upload bytes, already validated by
        the caller) for ``owner``; the store reserves ``result_bytes`` for its result."""
        if len(images) != spec.images:
            raise InvalidParameter(f"the job was planned for {spec.images} images, got {len(images)}")
        record = JobRecord(id=new_job_id(), status="queued", spec=spec, created_at=time.time(), owner=owner)
        limits = Limits.from_settings(self.settings)
        await self._io(self.store.create, record, images, limits=limits, reserve=result_bytes)
        await self._io(self._dispatch, record)
        return await self.get(record.id, owner=owner)

    async def get(self, job_id: str, *, owner: str | None) -> JobRecord:
        """The job; ``JobNotFound`` (404) for an unknown id or another owner's job, ``JobExpired``
        (410) past retention."""
        check_job_id(job_id)
        return await self._io(self.store.get, job_id, owner=owner)

    async def cancel(self, job_id: str, *, owner: str | None) -> JobRecord:
        """Cancel a queued or running job; a finished job is returned as it is."""
        check_job_id(job_id)
        return await self._io(self.store.cancel, job_id, owner=owner)

    async def result(self, job_id: str, *, owner: str | None) -> tuple[JobRecord, JobResult]:
        """The job and its decoded result; ``JobNotFinished`` (409) before it succeeded."""
        record = await self.get(job_id, owner=owner)
        if record.status != "succeeded":
            raise JobNotFinished(_not_ready(record))
        data = await self._io(self.store.result, job_id, owner=owner)
        return record, await asyncio.to_thread(decode, data)

    async def result_bytes(self, job_id: str, *, owner: str | None) -> tuple[JobRecord, bytes]:
        """The job and its stored result as it is (an evaluate job's JSON); 409 before success."""
        record = await self.get(job_id, owner=owner)
        if record.status != "succeeded":
            raise JobNotFinished(_not_ready(record))
        return record, await self._io(self.store.result, job_id, owner=owner)

    async def image(self, job_id: str, index: int, *, owner: str | None) -> bytes:
        """The bytes of the job's image ``index`` as uploaded (for overlays; kept only by jobs
        submitted with ``keep_inputs``)."""
        images = await self._io(self.store.inputs, job_id, owner=owner)
        if not images:
            raise InvalidParameter(
                f"job {job_id} kept no input images; submit it with format=overlay to draw overlays",
                field="format",
            )
        if not 0 <= index < len(images):
            raise InvalidParameter(f"index must be in [0, {len(images)})", field="index")
        return images[index]

    # --- backend hooks ---------------------------------------------------------------------------
    def _dispatch(self, record: JobRecord) -> None:
        """Hand the stored job to a worker (blocking; runs in a thread)."""
        raise NotImplementedError

    def _maintain(self) -> None:
        """Periodic housekeeping (blocking; runs in a thread): the jobs gauge by default."""
        if self.metrics is not None:
            for state, n in self.store.counts().items():
                self.metrics.jobs.labels(state=state).set(n)

    def _shutdown(self) -> None:
        self.store.close()

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _tick_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._maintain)
            except Exception as exc:
                log.warning("job maintenance failed: %r", exc)
            await asyncio.sleep(self.tick_s)


def _not_ready(record: JobRecord) -> str:
    if record.status in ("queued", "running"):
        return f"job {record.id} is {record.status} ({record.progress:.0%}); poll GET /v1/jobs/{record.id}"
    return f"job {record.id} {record.status}; it has no result"


class LocalJobService(JobService):
    """Jobs on this process's worker pool; records in memory."""

    backend = "local"

    def __init__(
        self, settings: Settings, registry: ModelRegistry, executor: Executor, metrics: Metrics | None
    ) -> None:
        super().__init__(settings, registry, MemoryJobStore(settings.job_retention_s), metrics)
        self.pool = LocalPool(registry, self.store, settings, executor, metrics)

    def _dispatch(self, record: JobRecord) -> None:
        self.pool.submit(record.id, record.spec.model)

    def _shutdown(self) -> None:
        self.pool.stop()
        super()._shutdown()


class CeleryJobService(JobService):
    """Jobs on Celery workers over Redis; records, inputs and results in Redis."""

    backend = "celery"

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics | None) -> None:
        from service.runtime.jobs.celery_app import make_celery, make_store

        self.redis_store = make_store(settings)
        super().__init__(settings, registry, self.redis_store, metrics)
        self.celery = make_celery(settings)
        self.tick_s = max(0.5, min(5.0, settings.job_lease_s / 3))

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import kombu.exceptions
        import redis

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (redis.RedisError, kombu.exceptions.OperationalError, OSError) as exc:
            log.warning("job store or broker unavailable: %r", exc)
            raise Overloaded("the job queue is unavailable; retry shortly", retry_after=5) from None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.redis_store.ping)
        except Exception as exc:  # jobs answer 503 until Redis is back; the rest of the API works
            log.warning("the job store at %s is unreachable: %r", self.settings.broker_url, exc)
        await super().start()

    def _dispatch(self, record: JobRecord) -> None:
        from service.runtime.jobs.celery_app import enqueue

        try:
            enqueue(self.celery, self.settings, record.id)
        except Exception:
            self.store.cancel(record.id)  # never leave a queued job that no message will run
            raise

    def _maintain(self) -> None:
        lease, attempts = self.settings.job_lease_s, self.settings.job_max_attempts
        for job_id in self.store.stale(lease):
            outcome = self.store.recover(job_id, lease, attempts)
            if outcome == "requeued":
                log.warning("job %s: its worker stopped sending heartbeats; re-queued", job_id)
                self._dispatch_requeued(job_id)
            elif outcome == "failed":
                log.warning("job %s: its worker died on every attempt; marked failed", job_id)
        self._redispatch_due()
        self.redis_store.prune()
        super()._maintain()

    def _redispatch_due(self) -> None:
        """Send again the message of each queued job no worker has taken in its due time.

        A queued job has no message when a worker took it but could not start it (its store call
        failed) or when an enqueue failed; without this it would stay queued until its safety TTL.
        A job merely waiting behind others gets a duplicate, which is harmless (only a queued job
        starts) and rare: each job's wait before the next one doubles (``RedisJobStore``)."""
        for job_id in self.redis_store.due_for_dispatch():
            n = self.redis_store.redispatched(job_id)
            if n:
                log.warning("job %s: still queued after its due time; message sent again (%d)", job_id, n)
                self._dispatch_requeued(job_id)

    def _dispatch_requeued(self, job_id: str) -> None:
        """Enqueue a job the store holds as queued already; a failure is logged, not raised: the
        job stays queued and is due again later (``_redispatch_due``)."""
        from service.runtime.jobs.celery_app import enqueue

        try:
            enqueue(self.celery, self.settings, job_id)
        except Exception as exc:
            log.warning("job %s: could not be enqueued (%r); it will be sent again later", job_id, exc)

    def _shutdown(self) -> None:
        super()._shutdown()
        self.celery.close()


def create_job_service(
    settings: Settings, registry: ModelRegistry, executor: Executor, metrics: Metrics | None
) -> JobService:
    """The job service ``settings.jobs_backend`` asks for (``local`` or ``celery``)."""
    if settings.jobs_backend == "celery":
        return CeleryJobService(settings, registry, metrics)
    return LocalJobService(settings, registry, executor, metrics)
