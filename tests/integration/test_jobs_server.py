"""The local worker pool in a real server (``saliency serve``, uvicorn on 127.0.0.1).

While a heavy job runs, the event loop keeps answering and a synchronous Grad-CAM request is
served before the job finishes: it does not wait behind the job (the job runs on its own model
replica and yields to synchronous work between chunks).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from jobs_helpers import files, png, service_env, start_api, until, write_tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    folder = tmp_path_factory.mktemp("jobs-server")
    env = service_env(
        models_config=write_tiny_config(folder / "models"), device="cpu", warmup="false", torch_threads=1
    )
    api, base = start_api(env, folder / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client
    finally:
        api.kill()


def test_sync_requests_are_served_while_a_job_runs(server: httpx.Client) -> None:
    r = server.post(
        "/v1/jobs",
        files=files([png(i) for i in range(4)]),
        data={"model": "tiny", "method": "integrated_gradients", "steps": "512", "batch_size": "8"},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    until(lambda: server.get(f"/v1/jobs/{job_id}").json()["progress"] > 0.0, "the job to make progress")

    for _ in range(3):
        assert server.get("/healthz").status_code == 200
        sync = server.post(
            "/v1/models/tiny/explain",
            files={"image": ("x.png", png(7), "image/png")},
            data={"format": "json"},
        )
        assert sync.status_code == 200
    during = server.get(f"/v1/jobs/{job_id}").json()
    assert during["status"] == "running", "the synchronous requests waited for the whole job"
    assert 0.0 < during["progress"] < 1.0

    until(lambda: 'saliency_jobs{state="running"} 1.0' in server.get("/metrics").text, "the jobs gauge")
    assert 'saliency_queue_wait_seconds_count{kind="job"} 1.0' in server.get("/metrics").text
    assert server.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    until(lambda: 'saliency_jobs{state="running"} 0.0' in server.get("/metrics").text, "the jobs gauge")
