"""Celery jobs when things fail: lost messages, a store that fails under the maintenance loop,
a result larger than the store keeps, Redis restarting mid-job.

Real ``saliency worker`` processes over a real Redis; the API in this process (``TestClient``).
A job must never stay ``queued`` or ``running`` for good, and a Redis restart (append-only file
on) must lose nothing. Every wait is bounded, each test well under a minute.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jobs_helpers import (
    RedisServer,
    drop_namespace,
    png,
    service_env,
    start_worker,
    status,
    submit_id,
    until,
    wait_status,
    write_tiny_config,
)

import service.runtime.jobs.celery_app as celery_app
from service.app import create_app
from service.config import Settings
from service.runtime.jobs.celery_app import make_store, redispatch_s
from service.runtime.jobs.service import CeleryJobService
from service.runtime.jobs.store import JobRecord, JobSpec, Limits, new_job_id

pytestmark = pytest.mark.slow

LEASE_S = 2.0
WAIT_S = 50.0


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("fault-models"))


def values(url: str, config: Path, **more: Any) -> dict[str, Any]:
    return {
        "models_config": config,
        "device": "cpu",
        "warmup": "false",
        "torch_threads": 1,
        "jobs_backend": "celery",
        "broker_url": url,
        "redis_namespace": f"t{uuid.uuid4().hex[:10]}",
        "job_lease_s": LEASE_S,
        "job_max_attempts": 2,
        "log_level": "info",
        **more,
    }


@pytest.fixture()
def settings(redis_url: str, config: Path) -> Iterator[dict[str, Any]]:
    v = values(redis_url, config)
    yield v
    drop_namespace(redis_url, v["redis_namespace"])


@contextmanager
def api(v: dict[str, Any]) -> Iterator[TestClient]:
    app = create_app(Settings(**v))
    with TestClient(app, raise_server_exceptions=False) as c:
        until(lambda: c.get("/readyz").status_code == 200, "the app to be ready")
        assert isinstance(app.state.services.jobs, CeleryJobService)
        yield c


@pytest.fixture()
def workers() -> Iterator[list[Any]]:
    """Started workers; each is killed (by its own pid) at the end."""
    started: list[Any] = []
    yield started
    for w in started:
        w.kill()


def record(**spec: Any) -> JobRecord:
    job_spec = JobSpec("tiny", "gradcam", {}, None, 1, 1, **spec)
    return JobRecord(id=new_job_id(), status="queued", spec=job_spec, created_at=time.time())


# ------------------------------------------------------------------------------------------------
# (a) a queued job whose message is gone is sent again
# ------------------------------------------------------------------------------------------------
def test_the_maintenance_loop_survives_a_failing_enqueue_and_sends_due_jobs_again(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No worker, no API loop: ``_maintain`` called by hand on a store in a real Redis."""
    s = Settings(**settings)
    service = CeleryJobService(s, None, None)  # type: ignore[arg-type]  # the registry is not used
    store = service.redis_store
    sent: list[str] = []
    failing = True

    def enqueue(_app: Any, _settings: Any, job_id: str) -> None:
        if failing:
            raise ConnectionError("broker unreachable")
        sent.append(job_id)

    monkeypatch.setattr(celery_app, "enqueue", enqueue)
    try:
        lost, crashed = record(), record()
        for r in (lost, crashed):
            store.create(r, [b"a"], limits=Limits.only_queue(10))
        store.start(crashed.id, "w")
        store.redis.zadd(store._global("running"), {crashed.id: 0})  # its worker died
        store.redis.zadd(store._global("queued"), {lost.id: 0})  # its message is gone
        with caplog.at_level(logging.WARNING):
            service._maintain()  # re-queues one, re-sends the other; both enqueues fail: logged
        assert "could not be enqueued" in caplog.text and "message sent again (1)" in caplog.text
        assert store.get(crashed.id).status == "queued" and store.get(lost.id).status == "queued"
        assert store.due_for_dispatch() == []  # each is due again later, not at every tick
        failing = False
        for r in (lost, crashed):
            store.redis.zadd(store._global("queued"), {r.id: 0})  # their due time has come
        service._maintain()
        assert sorted(sent) == sorted([lost.id, crashed.id])
        assert int(store.redis.hget(store._job(lost.id), "dispatches") or 0) == 2
    finally:
        service.celery.close()
        store.close()


def test_a_job_whose_message_was_lost_is_sent_again_and_runs(
    settings: dict[str, Any], workers: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first message never reaches the broker (as when a worker took it but could not start
    the job): the job waits ``redispatch_s`` queued, then the API sends it again."""
    real = celery_app.enqueue
    calls: list[str] = []

    def lose_the_first(app: Any, s: Any, job_id: str) -> None:
        calls.append(job_id)
        if len(calls) > 1:
            real(app, s, job_id)

    monkeypatch.setattr(celery_app, "enqueue", lose_the_first)
    assert redispatch_s(Settings(**settings)) <= 10
    workers.append(start_worker(service_env(**settings), tmp_path / "w.log", "fa"))
    with api(settings) as client:
        job_id = submit_id(client, [png(0)], method="gradcam")
        time.sleep(3)
        assert status(client, job_id)["status"] == "queued"  # no message: nothing runs it
        done = wait_status(client, job_id, "succeeded", "failed", timeout=40)
        assert done["status"] == "succeeded", (done, workers[0].tail())
    assert calls == [job_id, job_id]


# ------------------------------------------------------------------------------------------------
# (c) a result larger than the store keeps
# ------------------------------------------------------------------------------------------------
def test_a_result_too_large_for_the_store_fails_the_job_clearly(
    settings: dict[str, Any], workers: list[Any], tmp_path: Path
) -> None:
    """The worker's limit below the API's (as after a configuration change): the job fails with
    result-too-large on its first attempt, instead of the store refusing it and the job being
    redelivered until it counts as worker-lost."""
    workers.append(start_worker(service_env(**settings, job_max_result_bytes=2048), tmp_path / "w.log", "fc"))
    with api(settings) as client:
        job_id = submit_id(client, [png(1)], method="gradcam", top_k="3")
        failed = wait_status(client, job_id, "failed", "succeeded")
        assert failed["status"] == "failed", failed
        assert failed["error"]["type"].endswith("result-too-large") and failed["error"]["status"] == 422
        assert "2048" in failed["error"]["detail"]
    store = make_store(Settings(**settings))
    try:
        assert store.get(job_id).attempts == 1
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------
# (b, d) Redis restarting under a running job
# ------------------------------------------------------------------------------------------------
def test_a_redis_restart_mid_job_loses_nothing(config: Path, workers: list[Any], tmp_path: Path) -> None:
    """Redis (append-only file on) stops and starts again while a worker runs a job: the worker
    logs its failed heartbeats and goes on, its heartbeats renew the job's keys, and the job
    succeeds on its first attempt. The lease (6 s) outlasts the restart, so nothing is re-queued."""
    server = RedisServer(tmp_path)
    server.start()
    v = values(server.url, config, job_lease_s=6.0)
    try:
        workers.append(start_worker(service_env(**v), tmp_path / "w.log", "fd"))
        with api(v) as client:
            job_id = submit_id(
                client, [png(2), png(3)], method="integrated_gradients", steps="512", batch_size="8"
            )
            until(lambda: status(client, job_id)["progress"] > 0.05, "the job to make progress", WAIT_S)
            store = make_store(Settings(**v))
            job_key = store._job(job_id)
            store.redis.expire(job_key, 4)  # as if it had run almost as long as its safety TTL
            until(lambda: store.redis.ttl(job_key) > 60, "a heartbeat to renew the job's TTL", 10)
            assert status(client, job_id)["status"] == "running"  # else the restart proves nothing
            server.stop()
            time.sleep(2.0)  # the worker computes on; its heartbeats fail
            server.start()
            done = wait_status(client, job_id, "succeeded", "failed")
            assert done["status"] == "succeeded", (done, workers[0].tail())
            assert store.get(job_id).attempts == 1
            r = client.get(f"/v1/jobs/{job_id}/result")
            assert r.status_code == 200 and [e["image_index"] for e in r.json()["explanations"]] == [0, 1]
            store.close()
        log = workers[0].log.read_text()
        assert "could not record progress" in log
    finally:
        for w in workers:
            w.kill()
        workers.clear()
        server.stop()
