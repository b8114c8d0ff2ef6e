"""Liveness, readiness through loading and warm-up, metrics, and a responsive event loop."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from api_helpers import make_settings, upload, wait_ready
from api_helpers import wait_for as helpers_wait_for
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.registry import ModelRegistry

WAIT_S = 60.0


def wait_for(condition: Any, what: str) -> None:
    helpers_wait_for(condition, what, WAIT_S)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Model loading blocks until the test sets the event."""
    release = threading.Event()
    original = ModelRegistry.from_settings.__func__  # type: ignore[attr-defined]

    def slow(cls: type[ModelRegistry], settings: Any) -> ModelRegistry:
        assert release.wait(WAIT_S)
        registry: ModelRegistry = original(cls, settings)
        return registry

    monkeypatch.setattr(ModelRegistry, "from_settings", classmethod(slow))
    yield release
    release.set()


def test_healthz_answers_while_models_load_and_readyz_waits(tiny_config: Path, gate: threading.Event) -> None:
    app = create_app(make_settings(tiny_config))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["state"] == "loading" and r.headers["Retry-After"]
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith(":not-ready") and r.json()["models"] == {}
        r = client.get("/v1/models")
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("not-ready") and r.headers["Retry-After"]
        gate.set()
        wait_ready(client)
        assert client.get("/readyz").json() == {
            "status": "ok",
            "detail": None,
            "models": {"tiny": True, "tiny_crop": True},
        }
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["tiny", "tiny_crop"]


def test_readyz_waits_for_the_warmup(tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release, started = threading.Event(), threading.Event()
    original = ModelRegistry.warmup

    def held_warmup(self: ModelRegistry) -> None:
        started.set()
        assert release.wait(WAIT_S)
        original(self)

    monkeypatch.setattr(ModelRegistry, "warmup", held_warmup)
    app = create_app(make_settings(tiny_config, warmup=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert started.wait(WAIT_S)
        assert client.get("/readyz").status_code == 503
        models = client.get("/v1/models").json()["models"]
        assert [m["ready"] for m in models] == [False, False]
        release.set()
        wait_ready(client)
        assert all(m["ready"] for m in client.get("/v1/models").json()["models"])


def test_failed_loading_is_reported_not_fatal(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "missing.toml"))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").json().get("state") == "failed", "the load failure")
        r = client.get("/readyz")
        assert r.status_code == 503 and "missing.toml" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
        r = client.get("/v1/models")
        assert r.status_code == 503 and "missing.toml" in r.json()["detail"]


def test_healthz_answers_while_an_explanation_computes(client: TestClient, png_bytes: bytes) -> None:
    """The explanation is held inside the engine (its replica's lock is taken here); meanwhile the
    event loop serves /healthz; released, the explanation completes normally."""
    services = client.app.state.services  # type: ignore[attr-defined]
    model = services.registry.get("tiny")
    model.methods()  # probed once (under the lock) and cached: done before the lock is held here
    lock = model.handle.lock
    lock.acquire()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(client.post, "/v1/models/tiny/explain", files=upload(png_bytes))
            wait_for(
                lambda: services.executor.waiting(model.handle) >= 1, "the request to reach the executor"
            )
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
                assert client.get("/v1/models/tiny").status_code == 200
            assert not pending.done()
            lock.release()
            r = pending.result(timeout=WAIT_S)
    finally:
        if lock._is_owned():  # type: ignore[attr-defined]
            lock.release()
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_metrics_exposition(client: TestClient, png_bytes: bytes) -> None:
    assert client.post("/v1/models/tiny/explain", files=upload(png_bytes)).status_code == 200
    client.get("/v1/does-not-exist")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    line = re.search(
        r'saliency_http_request_duration_seconds_count\{method="POST",route="/v1/models/\{model\}/explain",status="200"\} (\d+)',
        text,
    )
    assert line and int(line.group(1)) >= 1
    assert 'route="unmatched",status="404"' in text  # raw paths never become labels
    assert re.search(r'saliency_explanations_total\{method="gradcam",model="tiny"\} \d', text)
