"""Scale-out: jobs as Celery tasks over Redis, run by ``saliency worker`` processes.

The API stores a job in Redis (``RedisJobStore``) and sends a task carrying only the job id;
a worker loads the model registry on its device once, at start-up, and runs the task with the
same ``JobRunner`` the local pool uses. Job state, progress and results stay in the job store,
not in Celery's result backend: an id Celery never saw is a 404, not ``PENDING``.

Worker settings for a GPU (one worker process per device):

- ``--pool solo`` (default; ``threads`` also works) and concurrency 1: the task runs in the
  process that loaded the models, with no fork after CUDA was initialised;
- ``worker_prefetch_multiplier = 1``: a worker reserves one job at a time, so queued jobs wait
  on the broker, where any free worker can take them;
- ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only after
  the job finished, so a worker that dies mid-job leaves it for redelivery;
- the Redis transport's ``visibility_timeout`` (``job_visibility_timeout_s``) must exceed the
  longest job: that is when Redis hands an unacknowledged message out again.

Redelivery after a crash does not have to wait for the visibility timeout: the worker refreshes
a lease on its running job (a heartbeat every ``job_lease_s / 4`` seconds); when the lease runs
out, the API re-queues the job (a new task) or, after ``job_max_attempts`` starts, marks it
``failed`` with a clear error. Duplicate deliveries are harmless: only a queued job can start.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import IO, Any

import torch
from celery import Celery
from celery.signals import setup_logging
from prometheus_client import start_http_server

from service.config import Settings
from service.logs import configure_logging
from service.metrics import Metrics
from service.runtime.jobs.redis_store import RedisJobStore
from service.runtime.jobs.runner import JobRunner
from service.runtime.jobs.store import JobStore

log = logging.getLogger(__name__)

TASK_NAME = "saliency.run_job"

# the worker's job runner, set by ``run_worker`` before Celery starts consuming
_runner: JobRunner | None = None


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_namespace}.jobs"


def make_store(settings: Settings) -> RedisJobStore:
    """The Redis job store of these settings (shared by the API and the workers)."""
    return RedisJobStore(
        settings.broker_url,
        namespace=settings.redis_namespace,
        retention_s=settings.job_retention_s,
        active_ttl_s=settings.job_visibility_timeout_s + settings.job_retention_s,
        redispatch_s=redispatch_s(settings),
    )


def redispatch_s(settings: Settings) -> float:
    """How long a queued job waits for a worker before the API sends its message again: a few
    leases, so a message lost to a worker that failed to start the job costs minutes, not the
    visibility timeout."""
    return max(10.0, 4 * settings.job_lease_s)


def make_celery(settings: Settings) -> Celery:
    """The Celery app, configured for one-job-at-a-time GPU workers (see the module docstring)."""
    app = Celery("saliency", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue_name(settings),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # state and results live in the job store
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.job_visibility_timeout_s,
            "global_keyprefix": f"{settings.redis_namespace}:celery:",
        },
    )
    app.task(name=TASK_NAME, bind=False, ignore_result=True)(_run_job)
    return app


def enqueue(app: Celery, settings: Settings, job_id: str) -> None:
    """Send the task that runs job ``job_id`` (blocking)."""
    app.send_task(TASK_NAME, args=[job_id], queue=queue_name(settings))


def _run_job(job_id: str) -> None:
    """The Celery task: run one job with this worker's runner.

    A store that fails before the job started (Redis unreachable) leaves the job queued: the
    message is acknowledged and the API's maintenance loop sends it again once the job is due
    (``CeleryJobService._redispatch_due``). Logged here, not raised: Celery would only log it again."""
    if _runner is None:
        raise RuntimeError("this worker was not started with `saliency worker`")
    try:
        _runner.run(job_id)
    except Exception as exc:
        log.error(
            "job %s: the job store failed (%r); the job is left to be sent again or recovered", job_id, exc
        )


def worker_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    """The worker's logging: ``configure_logging`` as in the API (``SALIENCY_LOG_FORMAT``), and a
    receiver of Celery's ``setup_logging`` signal, with which Celery leaves logging alone: its
    records and the tasks' go through the same handler instead of Celery's own."""
    configure_logging(settings.log_level, settings.log_format, stream)
    setup_logging.connect(_keep_logging, weak=False)


def _keep_logging(**_kwargs: Any) -> None:
    """Celery's ``setup_logging`` receiver: logging is configured already (``worker_logging``)."""


def worker_runner(
    settings: Settings, store: JobStore, registry: Any, metrics: Metrics | None = None
) -> JobRunner:
    """The job runner of a worker process: the registry's own handles, a lease heartbeat."""

    def lookup(name: str) -> tuple[Any, Any]:
        model = registry.get(name)
        return model, model.handle

    return JobRunner(
        store=store,
        settings=settings,
        models=lookup,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        heartbeat_s=max(0.25, settings.job_lease_s / 4),
        metrics=metrics,
    )


def worker_argv(settings: Settings, argv: Sequence[str] = ()) -> list[str]:
    """Celery's worker command line; options in ``argv`` come last, so they win."""
    extra = [a for a in argv if a != "--"]
    return [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--loglevel={settings.log_level.upper()}",
        "--without-gossip",
        "--without-mingle",
        f"--queues={queue_name(settings)}",
        "--hostname=saliency@%h",
        *extra,
    ]


def run_worker(settings: Settings, argv: Sequence[str] = ()) -> int:
    """``saliency worker``: load the registry on this worker's device, then consume jobs.

    Returns the exit status once Celery stops (after a warm shutdown on SIGTERM: the running job
    finishes first)."""
    global _runner
    from service.models.registry import ModelRegistry

    worker_logging(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    registry = ModelRegistry.from_settings(settings)
    if settings.warmup:
        registry.warmup()
    else:
        registry.mark_ready()
    store = make_store(settings)
    metrics = Metrics()
    if settings.worker_metrics_port is not None:
        # compute and job durations are measured where jobs run: scrape each worker for them
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
        log.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
    _runner = worker_runner(settings, store, registry, metrics)
    app = make_celery(settings)
    log.info("worker ready: models %s on queue %s", ", ".join(registry.names()), queue_name(settings))
    app.worker_main(worker_argv(settings, argv))
    return 0
