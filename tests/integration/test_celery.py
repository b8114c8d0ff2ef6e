"""Jobs on Celery over a real Redis server, run by real ``saliency worker`` processes.

The API runs in this process (``TestClient``) or as real ``saliency serve`` processes (the restart
test). Workers are killed with SIGKILL mid-job: the job must be re-queued and finished by the next
worker, or fail with a clear error after ``job_max_attempts`` starts — never stay ``running``.
The lease is short (3 s) so a dead worker is noticed quickly; every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from jobs_helpers import (
    drop_namespace,
    png,
    service_env,
    start_api,
    start_worker,
    status,
    submit,
    until,
    wait_status,
    write_tiny_config,
)

from service.app import create_app
from service.config import Settings
from service.runtime.jobs.celery_app import make_store
from service.runtime.jobs.service import CeleryJobService

pytestmark = pytest.mark.slow

LEASE_S = 3.0
# long enough to be killed mid-way on a busy CPU: 4 images × (512 + 2) passes, 8 per chunk
LONG = {"method": "integrated_gradients", "steps": "512", "batch_size": "8"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("celery-models"))


@pytest.fixture()
def settings(redis_url: str, config: Path) -> Iterator[dict[str, Any]]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "models_config": config,
        "device": "cpu",
        "warmup": "false",
        "torch_threads": 1,
        "jobs_backend": "celery",
        "broker_url": redis_url,
        "redis_namespace": namespace,
        "job_lease_s": LEASE_S,
        "job_max_attempts": 2,
        "log_level": "info",
    }
    yield values
    drop_namespace(redis_url, namespace)


@pytest.fixture()
def client(settings: dict[str, Any]) -> Iterator[TestClient]:
    app = create_app(Settings(**settings))
    with TestClient(app, raise_server_exceptions=False) as c:
        until(lambda: c.get("/readyz").status_code == 200, "the app to be ready")
        assert isinstance(app.state.services.jobs, CeleryJobService)
        yield c


@pytest.fixture()
def workers(settings: dict[str, Any], tmp_path: Path) -> Iterator[list[Any]]:
    """Started workers; each is killed (by its own pid) at the end."""
    started: list[Any] = []
    yield started
    for w in started:
        w.kill()


def wait_progress(client: Any, job_id: str, above: float = 0.02) -> dict[str, Any]:
    def moving() -> dict[str, Any] | None:
        job = status(client, job_id)
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["progress"] > above else None

    job: dict[str, Any] = until(moving, f"job {job_id} to make progress")
    return job


# ------------------------------------------------------------------------------------------------
def test_a_worker_runs_jobs_and_the_api_answers_from_redis(
    client: TestClient, settings: dict[str, Any], workers: list[Any], tmp_path: Path
) -> None:
    images = [png(0), png(1, (30, 44))]
    job = submit(client, images, method="gradcam", top_k="2", format="overlay")
    assert job["status"] == "queued" and client.get(f"/v1/jobs/{job['id']}").headers["retry-after"] == "2"
    workers.append(start_worker(service_env(**settings), tmp_path / "w1.log", "w1"))
    done = wait_status(client, job["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", (done, workers[0].tail())
    body = client.get(f"/v1/jobs/{job['id']}/result", params={"format": "json"}).json()
    assert [e["image_index"] for e in body["explanations"]] == [0, 0, 1, 1]
    # the worker's maps equal the API process's own synchronous explanation of the same image
    for i, data in enumerate(images):
        sync = client.post(
            "/v1/models/tiny/explain",
            files={"image": ("x.png", data, "image/png")},
            data={"method": "gradcam", "top_k": "2", "format": "json"},
        ).json()
        for got, want in zip(body["explanations"][2 * i : 2 * i + 2], sync["explanations"], strict=True):
            assert got["target"]["index"] == want["target"]["index"]
            np.testing.assert_allclose(np.array(got["heatmap"]), np.array(want["heatmap"]), atol=2e-4)
    r = client.get(f"/v1/jobs/{job['id']}/result", params={"format": "overlay", "index": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"

    # an id nobody ever submitted is 404 (Celery would call it PENDING)
    assert client.get(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404
    # the container health check of a worker: it answers a ping over the broker
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.runtime.process.healthcheck",
            "worker",
            "--node",
            "w1@" + _hostname(),
        ],
        env=service_env(**settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def test_cancel_reaches_a_running_celery_job_and_queued_ones_never_start(
    client: TestClient, settings: dict[str, Any], workers: list[Any], tmp_path: Path
) -> None:
    long = submit(client, [png(i) for i in range(4)], **LONG)
    queued = submit(client, [png(9)], method="gradcam")
    after = submit(client, [png(8)], method="gradcam")
    workers.append(start_worker(service_env(**settings), tmp_path / "w.log", "wc"))
    wait_progress(client, long["id"])
    assert status(client, queued["id"])["status"] == "queued"
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    cancelled = client.delete(f"/v1/jobs/{long['id']}").json()
    assert cancelled["status"] == "cancelled"
    # the worker stops the long job at its next chunk and goes on to the next job
    assert wait_status(client, after["id"], "succeeded", "failed")["status"] == "succeeded"
    stopped = status(client, long["id"])
    assert stopped["status"] == "cancelled" and stopped["progress"] < 1.0
    never = status(client, queued["id"])
    assert never["status"] == "cancelled" and never["started_at"] is None
    assert client.get(f"/v1/jobs/{long['id']}/result").status_code == 409
    assert "stopped: lost its lease" in workers[0].log.read_text()


def test_a_killed_worker_leads_to_redelivery_then_to_a_clear_failure(
    client: TestClient, settings: dict[str, Any], workers: list[Any], tmp_path: Path
) -> None:
    env = service_env(**settings)
    store = make_store(Settings(**settings))
    # 1. the worker dies mid-job: the job is re-queued and the next worker finishes it
    shorter = submit(client, [png(1), png(2)], **{**LONG, "steps": "160"})
    workers.append(start_worker(env, tmp_path / "w1.log", "k1"))
    wait_progress(client, shorter["id"])
    workers[-1].kill()
    requeued = wait_status(client, shorter["id"], "queued", timeout=LEASE_S * 10)
    assert requeued["progress"] == 0.0 and store.get(shorter["id"]).attempts == 1
    workers.append(start_worker(env, tmp_path / "w2.log", "k2"))
    done = wait_status(client, shorter["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", (done, workers[-1].tail())
    assert store.get(shorter["id"]).attempts == 2
    assert client.get(f"/v1/jobs/{shorter['id']}/result").status_code == 200

    # 2. it dies on every attempt: after job_max_attempts (2) the job fails with a clear error
    longer = submit(client, [png(i) for i in range(4)], **LONG)
    wait_progress(client, longer["id"])
    workers[-1].kill()
    wait_status(client, longer["id"], "queued", timeout=LEASE_S * 10)
    workers.append(start_worker(env, tmp_path / "w3.log", "k3"))
    wait_progress(client, longer["id"])
    workers[-1].kill()
    failed = wait_status(client, longer["id"], "failed", timeout=LEASE_S * 10)
    error = failed["error"]
    assert error["type"].endswith("worker-lost") and error["status"] == 500
    assert "stopped unexpectedly" in error["detail"] and "attempt 2 of at most 2" in error["detail"]
    assert store.get(longer["id"]).attempts == 2
    store.close()


def test_restarting_the_api_loses_no_job(
    settings: dict[str, Any], workers: list[Any], tmp_path: Path
) -> None:
    env = service_env(**settings)
    api, base = start_api(env, tmp_path / "api1.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            small = submit(http, [png(3)], method="gradcam")
            long = submit(http, [png(i) for i in range(2)], **{**LONG, "steps": "256"})
    finally:
        api.kill()  # SIGKILL: nothing is flushed on the way out
    # queued jobs survive the API: a new one knows them
    api, base = start_api(env, tmp_path / "api2.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            assert status(http, small["id"])["status"] == "queued"
            assert status(http, long["id"])["status"] == "queued"
            workers.append(start_worker(env, tmp_path / "w.log", "r1"))
            assert wait_status(http, small["id"], "succeeded")["status"] == "succeeded"
            wait_progress(http, long["id"])
    finally:
        api.kill()
    # a running job goes on while no API runs; finished ones stay answerable
    api, base = start_api(env, tmp_path / "api3.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            assert wait_status(http, long["id"], "succeeded", "failed")["status"] == "succeeded"
            for job in (small, long):
                r = http.get(f"/v1/jobs/{job['id']}/result")
                assert r.status_code == 200 and r.json()["explanations"][0]["image_index"] == 0
            assert (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "service.runtime.process.healthcheck",
                        "api",
                        "--url",
                        f"{base}/readyz",
                    ],
                    env=env,
                    timeout=120,
                ).returncode
                == 0
            )
    finally:
        api.kill()
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "service.runtime.process.healthcheck",
                "api",
                "--url",
                f"{base}/readyz",
                "--timeout",
                "2",
            ],
            env=env,
            capture_output=True,
            timeout=120,
        ).returncode
        == 1
    )


def _hostname() -> str:
    import socket

    return socket.gethostname()
