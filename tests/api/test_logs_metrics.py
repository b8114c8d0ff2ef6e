"""Operations: one JSON (or text) log line per request, uvicorn's access log folded in, and the
compute and job-duration histograms of ``/metrics``."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from api_helpers import make_settings, upload, wait_for_job, wait_ready
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.__main__ import uvicorn_options
from service.app import create_app
from service.logs import ACCESS_LOGGER, THIRD_PARTY, configure_logging

KEY = "test-key-0123456789abcdef-never-logged"
HEADERS = {"X-API-Key": KEY}
WAIT_S = 60.0


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``configure_logging`` rewires the root logger: put pytest's handlers back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    others = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in THIRD_PARTY}
    access_disabled = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, propagate) in others.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.getLogger("uvicorn.access").disabled = access_disabled


@pytest.fixture(scope="module")
def app(tiny_config: Path) -> FastAPI:
    return create_app(make_settings(tiny_config, api_keys=KEY))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def request_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in lines if d["logger"] == ACCESS_LOGGER]


def test_json_request_line_fields_and_no_secrets(
    client: TestClient, png_bytes: bytes, restore_logging: None
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    r = client.post(
        "/v1/models/tiny/explain",
        files=upload(png_bytes),
        data={"method": "saliency"},
        headers={**HEADERS, "X-Request-ID": "req-abc.123"},
    )
    assert r.status_code == 200
    bad = client.post("/v1/models/tiny/explain", files=upload(png_bytes), headers={"X-API-Key": "wrong-key"})
    assert bad.status_code == 401
    missing = client.get("/v1/models/nope", headers=HEADERS)
    assert missing.status_code == 404
    text = out.getvalue()
    lines = json_lines(text)  # every line is one JSON object
    requests = request_lines(lines)
    assert len(requests) == 3
    ok, unauthorised, not_found = requests
    assert ok["request_id"] == "req-abc.123" == r.headers["X-Request-ID"]
    assert ok["route"] == "/v1/models/{model}/explain"
    assert (ok["model"], ok["method"], ok["status"], ok["http_method"]) == ("tiny", "saliency", 200, "POST")
    assert isinstance(ok["duration_ms"], float) and ok["duration_ms"] > 0
    assert re.fullmatch(r"key-[0-9a-f]{16}", ok["principal"])
    assert ok["level"] == "INFO" and re.match(r"\d{4}-\d\d-\d\dT", ok["time"])
    # refused before the route: no model or method, no principal; the answer's id is logged
    assert unauthorised["status"] == 401 and unauthorised["principal"] is None
    assert unauthorised["request_id"] == bad.headers["X-Request-ID"] and unauthorised["model"] is None
    # an unknown model is not noted: only the registry's names reach the log
    assert not_found["status"] == 404 and not_found["model"] is None
    assert not_found["route"] == "/v1/models/{model}"
    # no key (valid or not), no image bytes in any form
    assert KEY not in text and "wrong-key" not in text
    assert base64.b64encode(png_bytes[:48]).decode()[:40] not in text
    assert "PNG" not in text and max(len(line) for line in text.splitlines()) < 1000


def test_job_submission_line_names_the_model(
    client: TestClient, png_bytes: bytes, restore_logging: None
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    r = client.post(
        "/v1/jobs",
        files=[("images", ("a.png", png_bytes, "image/png"))],
        data={"model": "tiny", "method": "gradcam"},
        headers=HEADERS,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for_job(client, job_id, "succeeded", headers=HEADERS, timeout_s=WAIT_S)
    lines = json_lines(out.getvalue())
    submitted = next(d for d in request_lines(lines) if d["route"] == "/v1/jobs")
    assert (submitted["model"], submitted["method"], submitted["status"]) == ("tiny", "gradcam", 202)
    # the runner's outcome line carries the job's fields
    done = next(d for d in lines if d.get("job_id") == job_id)
    assert (done["state"], done["task"], done["model"], done["method"], done["images"]) == (
        "succeeded",
        "explain",
        "tiny",
        "gradcam",
        1,
    )
    assert done["duration_ms"] > 0


def test_text_format_has_the_fields_after_the_message(
    client: TestClient, png_bytes: bytes, restore_logging: None
) -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    r = client.post(
        "/v1/models/tiny/predict", files=upload(png_bytes), headers={**HEADERS, "X-Request-ID": "text-1"}
    )
    assert r.status_code == 200
    [line] = [ln for ln in out.getvalue().splitlines() if ACCESS_LOGGER in ln]
    assert " INFO saliency.access: POST /v1/models/{model}/predict 200 " in line
    assert "request_id=text-1" in line and "route=/v1/models/{model}/predict" in line
    assert "model=tiny" in line and "method=" not in line.replace("http_method=", "")
    assert "status=200" in line and re.search(r"duration_ms=\d+\.\d", line)
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_uvicorn_access_log_is_folded_into_one_json_line(tiny_config: Path, restore_logging: None) -> None:
    """The real server with ``saliency serve``'s uvicorn options: one JSON line per request,
    uvicorn's own records (start-up) as JSON too, no plain access line."""
    settings = make_settings(tiny_config)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, **uvicorn_options(settings))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            ids = [http.get("/healthz").headers["X-Request-ID"] for _ in range(3)]
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
    lines = json_lines(out.getvalue())  # raises on any plain line
    health = [d for d in request_lines(lines) if d["route"] == "/healthz"]
    assert [d["request_id"] for d in health] == ids
    assert any(d["logger"].startswith("uvicorn") for d in lines)  # uvicorn's start-up, as JSON
    assert not any(d["logger"] == "uvicorn.access" for d in lines)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name{labels}`` (labels in any order), 0 when absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def test_compute_and_job_duration_metrics(client: TestClient, png_bytes: bytes) -> None:
    before = client.get("/metrics", headers=HEADERS).text
    assert "# TYPE saliency_compute_seconds histogram" in before
    assert "# TYPE saliency_job_duration_seconds histogram" in before
    r = client.post(
        "/v1/models/tiny/explain", files=upload(png_bytes), data={"method": "gradcam"}, headers=HEADERS
    )
    assert r.status_code == 200
    r = client.post(
        "/v1/jobs",
        files=[("images", ("a.png", png_bytes, "image/png"))] * 2,
        data={"model": "tiny", "method": "saliency"},
        headers=HEADERS,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for_job(client, job_id, "succeeded", headers=HEADERS, timeout_s=WAIT_S)
    after = client.get("/metrics", headers=HEADERS).text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # the synchronous explain: one engine call, its seconds counted
    assert grew("saliency_compute_seconds_count", model="tiny", method="gradcam") == 1
    assert grew("saliency_compute_seconds_sum", model="tiny", method="gradcam") > 0
    # the job: its engine calls by model and method, and one duration by task and outcome
    assert grew("saliency_compute_seconds_count", model="tiny", method="saliency") >= 1
    assert grew("saliency_job_duration_seconds_count", task="explain", state="succeeded") == 1
    assert grew("saliency_job_duration_seconds_sum", task="explain", state="succeeded") > 0
    job_seconds = grew("saliency_job_duration_seconds_sum", task="explain", state="succeeded")
    compute_seconds = grew("saliency_compute_seconds_sum", model="tiny", method="saliency")
    assert 0 < compute_seconds <= job_seconds  # the engine's time is part of the job's
    # closed label sets: nothing but registry models and registered methods
    models = set(re.findall(r'saliency_compute_seconds_count\{[^}]*model="([^"]*)"', after))
    assert models <= {"tiny", "tiny_crop"}


def test_celery_worker_logs_through_the_same_configuration(tiny_config: Path, restore_logging: None) -> None:
    """Celery's own logging set-up (what ``worker_main`` runs) leaves the JSON handler in place."""
    from celery.signals import setup_logging
    from celery.utils.log import get_task_logger

    from service.runtime.jobs.celery_app import _keep_logging, make_celery, worker_logging

    settings = make_settings(tiny_config, log_format="json", jobs_backend="celery")
    out = io.StringIO()
    try:
        worker_logging(settings, stream=out)
        handlers = list(logging.getLogger().handlers)
        make_celery(settings).log.setup(loglevel="INFO", redirect_stdouts=False)
        assert logging.getLogger().handlers == handlers  # Celery added or replaced nothing
        logging.getLogger("celery.worker").info("worker line")
        get_task_logger("saliency.run_job").info("task line", extra={"job_id": "j1"})
    finally:
        setup_logging.disconnect(_keep_logging)
    lines = json_lines(out.getvalue())
    assert [d["message"] for d in lines] == ["worker line", "task line"]
    assert lines[1]["job_id"] == "j1" and lines[0]["logger"] == "celery.worker"
