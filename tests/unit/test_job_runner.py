"""The job runner when its store fails: storing the outcome is retried with backoff, a failed
progress report or heartbeat never fails the job, and a failing start leaves the job queued.

A ``MemoryJobStore`` wrapped by a store that fails on purpose; no model runs.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from service.config import Settings
from service.runtime.jobs.runner import JobRunner, _Lease
from service.runtime.jobs.store import JobRecord, JobSpec, Limits, MemoryJobStore, new_job_id


class Flaky:
    """A store whose ``name`` calls raise ``failures`` times before they go through."""

    def __init__(self, store: MemoryJobStore, name: str, failures: int) -> None:
        self.store, self.name, self.failures, self.calls = store, name, failures, 0

    def __getattr__(self, attr: str) -> Any:
        real = getattr(self.store, attr)
        if attr != self.name:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls <= self.failures:
                raise redis.ConnectionError("Connection refused")
            return real(*args, **kwargs)

        return call


def runner(store: Any, attempts: int = 4) -> JobRunner:
    def no_models(name: str) -> Any:
        raise AssertionError("no model is needed here")

    return JobRunner(
        store=store,
        settings=Settings(models_config=None),
        models=no_models,
        worker="w",
        finish_attempts=attempts,
        finish_backoff_s=0.01,
    )


def running_job(store: MemoryJobStore) -> _Lease:
    spec = JobSpec("tiny", "gradcam", {}, None, 1, 1)
    record = JobRecord(id=new_job_id(), status="queued", spec=spec, created_at=time.time())
    store.create(record, [b"a"], limits=Limits.only_queue(10))
    token = store.start(record.id, "w")
    assert token is not None
    return _Lease(record.id, token)


def test_finishing_is_retried_while_the_store_fails(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryJobStore(60)
    lease = running_job(memory)
    flaky = Flaky(memory, "finish", failures=3)
    assert runner(flaky, attempts=4)._finish(lease, "succeeded", result=b"r")
    assert flaky.calls == 4 and memory.get(lease.job_id).status == "succeeded"
    assert memory.result(lease.job_id) == b"r"
    assert sum("could not store its outcome" in r.message for r in caplog.records) == 3


def test_finishing_gives_up_after_its_last_try() -> None:
    memory = MemoryJobStore(60)
    lease = running_job(memory)
    flaky = Flaky(memory, "finish", failures=10)
    with pytest.raises(redis.ConnectionError):
        runner(flaky, attempts=3)._finish(lease, "failed", error={"code": "x"})
    assert flaky.calls == 3 and memory.get(lease.job_id).status == "running"  # left to lease recovery


def test_a_failing_progress_report_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryJobStore(60)
    lease = running_job(memory)
    r = runner(Flaky(memory, "progress", failures=1))
    r._report(lease, 0.5)  # raises nothing
    assert not lease.lost.is_set() and "could not record progress" in caplog.text
    r._report(lease, 0.5)
    assert memory.get(lease.job_id).progress == 0.5


def test_a_failing_start_leaves_the_job_queued() -> None:
    """The Celery task logs the error; the API sends the job again once it is due."""
    memory = MemoryJobStore(60)
    spec = JobSpec("tiny", "gradcam", {}, None, 1, 1)
    record = JobRecord(id=new_job_id(), status="queued", spec=spec, created_at=time.time())
    memory.create(record, [b"a"], limits=Limits.only_queue(10))
    with pytest.raises(redis.ConnectionError):
        runner(Flaky(memory, "start", failures=1)).run(record.id)
    assert memory.get(record.id).status == "queued"
