"""What keeps ``/v1/jobs`` safe to expose: owners, caps at submission and a bounded store.

Every refusal is checked the way ``test_bad_inputs`` checks bad requests: a 4xx (or 503)
``application/problem+json`` with a clear detail, never a 500, and nothing queued. Owners come
from ``get_owner`` (set by the auth middleware in the real app); here a dependency override
reads them from an ``X-Test-Owner`` header. Each test builds its app with the limits it tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from api_helpers import encode, make_settings, sample_image, wait_for_job, wait_ready
from fastapi import Request
from fastapi.testclient import TestClient

from service.api.deps import get_owner
from service.app import create_app
from service.runtime.jobs.service import LocalJobService

WAIT_S = 120.0
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}

Factory = Callable[..., TestClient]


def owner_header(request: Request) -> str | None:
    return request.headers.get("x-test-owner")


@pytest.fixture()
def make_client(tiny_config: Path) -> Iterator[Factory]:
    """Builds a started app with the given settings; every one is shut down afterwards."""
    with_clients: list[Any] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(make_settings(tiny_config, warmup=False, **overrides))
        app.dependency_overrides[get_owner] = owner_header
        cm = TestClient(app, raise_server_exceptions=False)
        client = cm.__enter__()
        with_clients.append(cm)
        wait_ready(client)
        return client

    yield make
    for cm in with_clients:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def image() -> bytes:
    return encode(sample_image(80, 50))


def as_(owner: str | None) -> dict[str, str]:
    return {} if owner is None else {"x-test-owner": owner}


def post(client: TestClient, images: list[bytes], owner: str | None = None, **params: Any) -> Any:
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {"model": "tiny", **{k: str(v) for k, v in params.items()}}
    return client.post("/v1/jobs", files=files, data=data, headers=as_(owner))


def submit(
    client: TestClient, images: list[bytes], owner: str | None = None, **params: Any
) -> dict[str, Any]:
    r = post(client, images, owner, **params)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def wait_for(client: TestClient, job_id: str, owner: str | None, *states: str) -> dict[str, Any]:
    return wait_for_job(client, job_id, *states, headers=as_(owner), timeout_s=WAIT_S)


def assert_problem(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert set(body) >= PROBLEM_KEYS and body["status"] == status and body["detail"]
    if code is not None:
        assert body["type"].endswith(code), body
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return body


def jobs_kept(client: TestClient) -> int:
    service = client.app.state.services.jobs  # type: ignore[attr-defined]
    assert isinstance(service, LocalJobService)
    kept, _ = service.store.usage()
    return kept


@contextmanager
def held_lane(client: TestClient) -> Iterator[None]:
    """The job lane's model replica locked: its job blocks (running), later ones stay queued."""
    lock = client.app.state.services.jobs.pool.lookup("tiny")[1].lock  # type: ignore[attr-defined]
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------
# owners
# ------------------------------------------------------------------------------------------------
def test_a_job_answers_only_its_owner(make_client: Factory, image: bytes) -> None:
    client = make_client()
    job = submit(client, [image], "alice", format="overlay")
    wait_for(client, job["id"], "alice", "succeeded")
    mine = f"/v1/jobs/{job['id']}"
    assert client.get(mine, headers=as_("alice")).status_code == 200
    assert client.get(f"{mine}/result", params={"format": "overlay"}, headers=as_("alice")).status_code == 200
    unknown = "0123456789abcdef" * 2
    for owner in ("bob", None):
        for method, suffix, params in (
            ("GET", "", {}),
            ("DELETE", "", {}),
            ("GET", "/result", {}),
            ("GET", "/result", {"format": "overlay"}),
        ):
            theirs = assert_problem(
                client.request(method, f"{mine}{suffix}", params=params, headers=as_(owner)),
                404,
                "job-not-found",
            )
            nobody = assert_problem(
                client.request(method, f"/v1/jobs/{unknown}{suffix}", params=params, headers=as_(owner)), 404
            )
            # no existence leak: the same answer as an id that never existed
            assert theirs["detail"] == nobody["detail"].replace(unknown, job["id"])
            assert theirs["title"] == nobody["title"]
    assert client.get(mine, headers=as_("alice")).json()["status"] == "succeeded"  # bob cancelled nothing


def test_an_api_key_may_have_so_many_active_jobs(make_client: Factory, image: bytes) -> None:
    client = make_client(max_jobs_per_key=2)
    with held_lane(client):
        running = submit(client, [image], "alice", method="gradcam")
        queued = submit(client, [image], "alice", method="gradcam")
        kept = jobs_kept(client)
        body = assert_problem(post(client, [image], "alice", method="gradcam"), 429, "rate-limited")
        assert "2 jobs" in body["detail"]
        assert jobs_kept(client) == kept  # nothing was queued
        submit(client, [image], "bob", method="gradcam")  # another key is not held up
        submit(client, [image], None, method="gradcam")  # without keys there is no per-key bound
        submit(client, [image], None, method="gradcam")
        assert client.delete(f"/v1/jobs/{queued['id']}", headers=as_("alice")).json()["status"] == "cancelled"
        again = submit(client, [image], "alice", method="gradcam")
    for job in (running, again):
        assert wait_for(client, job["id"], "alice", "succeeded", "failed")["status"] == "succeeded"
    submit(client, [image], "alice", method="gradcam")  # finished jobs do not count


# ------------------------------------------------------------------------------------------------
# caps at submission
# ------------------------------------------------------------------------------------------------
def test_too_many_passes_is_refused_before_anything_runs(make_client: Factory, image: bytes) -> None:
    client = make_client(job_max_passes=1000)
    # integrated gradients: (steps + 2) passes per image and target: 2 × 514 = 1028
    body = assert_problem(
        post(client, [image, image], method="integrated_gradients", steps=512), 422, "too-heavy"
    )
    assert "1028" in body["detail"] and "1000" in body["detail"]
    # Score-CAM is counted on the model: one pass per channel of layer4 (512), plus one
    body = assert_problem(post(client, [image, image], method="scorecam"), 422, "too-heavy")
    assert "1026" in body["detail"] and "1000" in body["detail"]
    assert jobs_kept(client) == 0
    submit(client, [image], method="scorecam")  # 513 passes


def test_a_result_larger_than_a_job_may_store_is_refused(make_client: Factory, image: bytes) -> None:
    # each (image, target) of the 64×64 model is a 16 KiB map; per-channel attributions triple it
    client = make_client(job_max_result_bytes=60_000)
    body = assert_problem(post(client, [image], method="gradcam", top_k=4), 422, "too-heavy")
    assert "60000" in body["detail"] and "bytes" in body["detail"]
    limit = int(body["detail"].split("about ")[1].split(" ")[0])
    assert 4 * 16384 < limit < 60000 * 1.3
    body = assert_problem(post(client, [image], method="saliency", reduction="none"), 422, "too-heavy")
    assert "per-channel" in body["detail"]
    assert jobs_kept(client) == 0
    job = submit(client, [image], method="gradcam", top_k=3)
    assert wait_for(client, job["id"], None, "succeeded", "failed")["status"] == "succeeded"


def test_a_result_larger_than_the_store_keeps_fails_the_job_clearly(
    make_client: Factory, image: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop when the estimate falls short: the job fails with result-too-large (422),
    and nothing larger than the limit reaches the store."""
    import service.runtime.jobs.service as service

    monkeypatch.setattr(service, "encoded_size", lambda *_a, **_k: 0)
    client = make_client(job_max_result_bytes=20_000)
    job = submit(client, [image], method="gradcam", top_k=2)
    failed = wait_for(client, job["id"], None, "failed", "succeeded")
    assert failed["status"] == "failed", failed
    error = failed["error"]
    assert error["type"].endswith("result-too-large") and error["status"] == 422
    assert "20000" in error["detail"]
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result"), 409)


# ------------------------------------------------------------------------------------------------
# a bounded store
# ------------------------------------------------------------------------------------------------
def test_the_store_keeps_so_many_jobs_of_any_state(make_client: Factory, image: bytes) -> None:
    client = make_client(job_store_max_jobs=2)
    for _ in range(2):
        job = submit(client, [image], method="gradcam")
        wait_for(client, job["id"], None, "succeeded")
    body = assert_problem(post(client, [image], method="gradcam"), 503, "overloaded")
    assert "store is full" in body["detail"]


def test_the_store_is_bounded_in_bytes_and_drops_inputs_after_success(
    make_client: Factory, tiny_config: Path
) -> None:
    """A noisy 500×500 PNG is about 750 KB: one fits the 1 MiB store, two do not. A job keeps its
    upload after success only when submitted for overlays."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (500, 500, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise, "RGB"))
    assert 600_000 < len(big) < 1024**2 - 100_000
    client = make_client(job_store_max_bytes=1024**2)
    plain = submit(client, [big], method="gradcam")
    wait_for(client, plain["id"], None, "succeeded")
    drawn = submit(client, [big], method="gradcam", format="overlay")  # the first upload was dropped
    wait_for(client, drawn["id"], None, "succeeded")
    body = assert_problem(post(client, [big], method="gradcam"), 503, "overloaded")  # kept for overlays
    assert "bytes" in body["detail"]
    r = client.get(f"/v1/jobs/{drawn['id']}/result", params={"format": "overlay"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    body = assert_problem(client.get(f"/v1/jobs/{plain['id']}/result", params={"format": "overlay"}), 422)
    assert "format=overlay" in body["detail"]
