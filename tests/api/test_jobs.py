"""``/v1/jobs`` through HTTP on the local worker pool (the default backend).

The tiny random ResNet-18 of ``conftest`` (10 classes, 64×64). Tests that need a job to sit in
``queued`` or ``running`` hold the lock of the job lane's model replica: the lane's job then
blocks inside the engine (``running``, no progress) and the jobs behind it stay ``queued`` — no
sleeping, no timing. Every wait is bounded.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_helpers import encode, make_settings, sample_image, wait_for, wait_for_job
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.runtime.jobs.service import LocalJobService

WAIT_S = 120.0
SIZES = [(80, 50), (48, 72), (64, 64)]


@pytest.fixture(scope="module")
def app(tiny_config: Path) -> FastAPI:
    """This module's app; conftest's ``client`` fixture serves it."""
    settings = make_settings(
        tiny_config, warmup=False, job_queue_size=3, job_max_images=4, job_retention_s=600
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [encode(sample_image(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


def jobs_service(app: FastAPI) -> LocalJobService:
    service = app.state.services.jobs
    assert isinstance(service, LocalJobService)
    return service


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def submit(client: TestClient, images: list[bytes], **params: Any) -> dict[str, Any]:
    data = {"model": "tiny", **{k: str(v) for k, v in params.items()}}
    r = client.post("/v1/jobs", files=files(images), data=data)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


class HeldLane:
    """Holds the job lane's replica lock: the lane's current job blocks inside the engine."""

    def __init__(self, app: FastAPI) -> None:
        pool = jobs_service(app).pool
        self.lock = pool.lookup("tiny")[1].lock
        self.sync_handle = app.state.services.registry.get("tiny").handle
        self.replica = pool.lookup("tiny")[1]

    def __enter__(self) -> HeldLane:
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


# ------------------------------------------------------------------------------------------------
def test_result_json_one_entry_per_image_and_target_in_upload_order(
    client: TestClient, images: list[bytes]
) -> None:
    job = submit(client, images, method="gradcam", top_k=2)
    assert job["status"] in ("queued", "running") and job["images"] == 3
    done = wait_for_job(client, job["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["result_url"] == f"/v1/jobs/{job['id']}/result"
    assert "retry-after" not in client.get(f"/v1/jobs/{job['id']}").headers

    r = client.get(done["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == "tiny" and body["method"] == "gradcam"
    assert [e["image_index"] for e in body["explanations"]] == [0, 0, 1, 1, 2, 2]
    # each image's entries equal a synchronous explain of that image alone, same parameters
    for i, data in enumerate(images):
        sync = client.post(
            "/v1/models/tiny/explain",
            files={"image": ("x.png", data, "image/png")},
            data={"method": "gradcam", "top_k": "2", "format": "json"},
        )
        assert sync.status_code == 200, sync.text
        entries = [e for e in body["explanations"] if e["image_index"] == i]
        for got, want in zip(entries, sync.json()["explanations"], strict=True):
            assert got["target"]["index"] == want["target"]["index"]
            assert got["target"]["label"] == want["target"]["label"]
            assert got["target"]["score"] == pytest.approx(want["target"]["score"], abs=1e-5)
            assert got["shape"] == want["shape"] == [SIZES[i][1], SIZES[i][0]]
            np.testing.assert_allclose(np.array(got["heatmap"]), np.array(want["heatmap"]), atol=2e-4)


def test_png_overlay_and_npy_per_image_index(client: TestClient, images: list[bytes]) -> None:
    """Overlays need the uploads, which only a job submitted with format=overlay keeps."""
    job = submit(client, images, method="gradcam")
    drawn = submit(client, images, method="gradcam", format="overlay")
    wait_for_job(client, job["id"], "succeeded")
    wait_for_job(client, drawn["id"], "succeeded")
    url = f"/v1/jobs/{job['id']}/result"
    for i, (w, h) in enumerate(SIZES):
        for fmt, at in (("png", url), ("overlay", f"/v1/jobs/{drawn['id']}/result")):
            r = client.get(at, params={"format": fmt, "index": i})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(r.content)).size == (w, h)
            assert 0 <= int(r.headers["x-target-index"]) < 10
        r = client.get(url, params={"format": "npy", "index": i, "resolution": "model"})
        assert r.status_code == 200
        assert np.load(io.BytesIO(r.content)).shape == (1, 64, 64)
    body = problem(client.get(url, params={"format": "overlay", "index": 0}), 422)
    assert "format=overlay" in body["detail"] and body["errors"][0]["field"] == "format"
    assert client.get(f"/v1/jobs/{drawn['id']}/result").headers["content-type"] == "image/png"
    # the heatmap PNG of image 1 differs from that of image 0: index selects the image
    a = client.get(url, params={"format": "png", "index": 0, "resolution": "model"}).content
    b = client.get(url, params={"format": "png", "index": 1, "resolution": "model"}).content
    assert a != b
    body = problem(client.get(url, params={"format": "png", "index": 3}), 422)
    assert body["errors"][0]["field"] == "index"
    problem(client.get(url, params={"format": "gif"}), 422)
    # Accept picks npy when no format is given
    r = client.get(url, params={"index": 2}, headers={"accept": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"


def test_result_rendering_overrides_are_checked_against_their_declaration(
    client: TestClient, images: list[bytes]
) -> None:
    job = submit(client, images[:1], method="gradcam", colormap="viridis")
    wait_for_job(client, job["id"], "succeeded")
    url = f"/v1/jobs/{job['id']}/result"
    bad = (
        ("colormap", "bogus"), ("alpha", "2"), ("resolution", "huge"), ("normalize", "x"), ("polarity", "x"),
        ("clip_upper", "150"), ("clip_lower", "-1"), ("style", "x"), ("keep", "2"), ("smooth", "-1"),
    )  # fmt: skip
    for field, value in bad:
        body = problem(client.get(url, params={"format": "png", field: value}), 422)
        assert body["errors"][0]["field"] == field, body
    # the job's method resolves the defaults; a range emptied by an override is refused
    body = problem(client.get(url, params={"format": "png", "clip_lower": "100"}), 422)
    assert body["errors"][0]["field"] == "clip_lower"
    # a valid override wins over the submission's value; the rest stay as submitted
    body = client.get(url, params={"normalize": "none", "resolution": "model"}).json()
    assert body["parameters"]["colormap"] == "viridis" and body["parameters"]["normalize"] == "none"
    assert body["parameters"]["resolution"] == "model" and body["explanations"][0]["shape"] == [64, 64]


def test_rgb_results_need_the_per_channel_attribution(client: TestClient, images: list[bytes]) -> None:
    """Guided Backprop is shown in rgb by default, so its job keeps the per-channel attribution;
    an IG job (shown as a map) does not, and refuses an rgb picture afterwards."""
    gbp = submit(client, images[:1], method="guided_backprop")
    ig = submit(client, images[:1], method="integrated_gradients", steps=4)
    for job in (gbp, ig):
        wait_for_job(client, job["id"], "succeeded")
    r = client.get(f"/v1/jobs/{gbp['id']}/result", params={"format": "png", "resolution": "model"})
    assert r.status_code == 200, r.text
    rgb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=int)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - rgb[..., 1]).max() > 0  # colours, not a table
    assert client.get(f"/v1/jobs/{gbp['id']}/result").json()["parameters"]["colormap"] == "rgb"
    url = f"/v1/jobs/{ig['id']}/result"
    assert client.get(url, params={"format": "png"}).status_code == 200
    body = problem(client.get(url, params={"format": "png", "colormap": "rgb"}), 422)
    assert body["errors"][0]["field"] == "colormap"


def test_progress_moves_per_chunk(app: FastAPI, client: TestClient, images: list[bytes]) -> None:
    store = jobs_service(app).store
    seen: list[float] = []
    first = threading.Event()
    go_on = threading.Event()
    original = store.progress

    def spy(job_id: str, lease: str, value: float | None) -> bool:
        if value is not None:
            seen.append(value)
            first.set()
            go_on.wait(WAIT_S)
        return original(job_id, lease, value)

    store.progress = spy  # type: ignore[method-assign]
    try:
        # IG: steps + 2 = 10 passes per image (the endpoints, then 8 steps), 2 per chunk → 5 chunks
        # per image, 10 in all
        job = submit(client, images[:2], method="integrated_gradients", steps=8, batch_size=2)
        assert first.wait(WAIT_S)
        seen_before = list(seen)
        mid = client.get(f"/v1/jobs/{job['id']}")
        assert mid.json()["status"] == "running" and mid.headers["retry-after"] == "1"
        go_on.set()
        wait_for_job(client, job["id"], "succeeded")
    finally:
        go_on.set()
        store.progress = original  # type: ignore[method-assign]
    assert seen_before == [pytest.approx(0.1)]
    assert seen == pytest.approx([k / 10 for k in range(1, 11)])


def test_queued_and_running_jobs_cancel_and_full_queue_is_503(
    app: FastAPI, client: TestClient, images: list[bytes]
) -> None:
    with HeldLane(app) as held:
        running = submit(client, images[:1], method="integrated_gradients", steps=30, batch_size=4)
        wait_for(lambda: client.get(f"/v1/jobs/{running['id']}").json()["status"] == "running", "running")
        queued = [submit(client, images[:1], method="gradcam") for _ in range(3)]
        for job in queued:
            r = client.get(f"/v1/jobs/{job['id']}")
            assert r.json()["status"] == "queued" and r.headers["retry-after"] == "2"
            problem(client.get(f"/v1/jobs/{job['id']}/result"), 409)
        full = client.post("/v1/jobs", files=files(images[:1]), data={"model": "tiny"})
        body = problem(full, 503)
        assert int(full.headers["retry-after"]) >= 1 and "queued" in body["detail"]

        # a synchronous request does not wait for the job: it runs on the other replica
        assert held.replica is not held.sync_handle and held.replica.module is held.sync_handle.module
        sync = client.post(
            "/v1/models/tiny/explain",
            files={"image": ("x.png", images[0], "image/png")},
            data={"format": "json"},
        )
        assert sync.status_code == 200

        r = client.delete(f"/v1/jobs/{queued[0]['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = client.delete(f"/v1/jobs/{running['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # the running job stops at its next chunk; the lane moves on; the cancelled queued job never starts
    for job in queued[1:]:
        assert wait_for_job(client, job["id"], "succeeded")["status"] == "succeeded"
    never = client.get(f"/v1/jobs/{queued[0]['id']}").json()
    assert never["status"] == "cancelled" and never["started_at"] is None
    stopped = client.get(f"/v1/jobs/{running['id']}").json()
    assert stopped["status"] == "cancelled" and stopped["progress"] < 1.0 and stopped["finished_at"]
    problem(client.get(f"/v1/jobs/{running['id']}/result"), 409)
    # cancelling a finished job changes nothing
    r = client.delete(f"/v1/jobs/{queued[1]['id']}")
    assert r.status_code == 200 and r.json()["status"] == "succeeded"


def test_unknown_and_expired_ids(app: FastAPI, client: TestClient, images: list[bytes]) -> None:
    for job_id in ("0" * 32, "not-a-job", "ABCDEF" * 5 + "AB"):
        problem(client.get(f"/v1/jobs/{job_id}"), 404)
        problem(client.get(f"/v1/jobs/{job_id}/result"), 404)
        problem(client.delete(f"/v1/jobs/{job_id}"), 404)
    job = submit(client, images[:1])
    wait_for_job(client, job["id"], "succeeded")
    store = jobs_service(app).store
    real_clock = store.clock
    store.clock = lambda: real_clock() + 601.0  # type: ignore[method-assign]
    try:
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result"):
            body = problem(client.get(path), 410)
            assert body["type"].endswith("job-expired")
    finally:
        store.clock = real_clock  # type: ignore[method-assign]


def test_submission_is_validated_before_queueing(client: TestClient, images: list[bytes]) -> None:
    too_many = client.post("/v1/jobs", files=files(images + images[:2]), data={"model": "tiny"})
    body = problem(too_many, 422)
    assert any(e["field"] == "images" and "at most 4" in e["message"] for e in body["errors"])
    bad = client.post("/v1/jobs", files=files([images[0], b"not an image at all"]), data={"model": "tiny"})
    body = problem(bad, 415)
    assert body["detail"].startswith("images[1]:")
    problem(client.post("/v1/jobs", files=files(images[:1]), data={"model": "nope"}), 404)
    problem(client.post("/v1/jobs", files=files(images[:1]), data={"model": "tiny", "method": "nope"}), 422)
    problem(client.post("/v1/jobs", files=files(images[:1]), data={"model": "tiny", "target": "10"}), 422)
    problem(client.post("/v1/jobs", files=files(images[:1]), data={"model": "tiny", "layer": "nope"}), 422)
    body = problem(client.post("/v1/jobs", data={"model": "tiny"}), 422)
    assert any(e["field"] == "images" for e in body["errors"])


def test_json_body_with_base64_images(client: TestClient, images: list[bytes]) -> None:
    import base64

    payload = {
        "model": "tiny",
        "method": "saliency",
        "images": [base64.b64encode(d).decode() for d in images[:2]],
    }
    r = client.post("/v1/jobs", json=payload)
    assert r.status_code == 202, r.text
    wait_for_job(client, r.json()["id"], "succeeded")
    body = client.get(f"/v1/jobs/{r.json()['id']}/result", params={"resolution": "model"}).json()
    assert [e["image_index"] for e in body["explanations"]] == [0, 1]
    assert body["explanations"][0]["shape"] == [64, 64]


def test_reduction_none_is_kept_only_when_asked_for(client: TestClient, images: list[bytes]) -> None:
    kept = submit(client, images[:1], method="saliency", reduction="none")
    plain = submit(client, images[:1], method="saliency")
    wait_for_job(client, kept["id"], "succeeded")
    wait_for_job(client, plain["id"], "succeeded")
    r = client.get(f"/v1/jobs/{kept['id']}/result", params={"resolution": "model"})
    assert r.json()["explanations"][0]["shape"] == [3, 64, 64]
    body = problem(client.get(f"/v1/jobs/{plain['id']}/result", params={"reduction": "none"}), 422)
    assert "reduction=none" in body["detail"]


def test_a_failed_job_stores_a_problem_without_internals(
    client: TestClient, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.runtime.jobs.runner as runner

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret /opt/internal/path exploded")

    monkeypatch.setattr(runner, "explain", broken)
    job = submit(client, images[:1])
    failed = wait_for_job(client, job["id"], "failed", "succeeded")
    assert failed["status"] == "failed" and failed["result_url"] is None
    error = failed["error"]
    assert set(error) == {"type", "title", "status", "detail"}
    assert error["status"] == 500 and error["type"].endswith("internal-error")
    assert job["id"] in error["detail"] and "secret" not in error["detail"]
    problem(client.get(f"/v1/jobs/{job['id']}/result"), 409)
