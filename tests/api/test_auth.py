"""API keys: allowed, refused, the open paths, per-key limits, CORS, the OpenAPI security scheme,
constant-time comparison and keys absent from logs."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from api_helpers import make_settings, upload, wait_ready
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_bad_inputs import assert_problem

from service.api import auth
from service.api.auth import KeyLimits, KeyRing, is_loopback, principal_of
from service.app import create_app
from service.config import Settings
from service.errors import ConfigError, RateLimited

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "bravo-key-0123456789abcdef"
EXPLAIN = "/v1/models/tiny/explain"


@pytest.fixture(scope="module")
def keyed_app(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# the second key comes from a file\n{KEY_B}  # bravo\n\n")
    settings = make_settings(tiny_config, api_keys=KEY_A, api_keys_file=keys_file, max_sync_per_key=2)
    return create_app(settings)


@pytest.fixture(scope="module")
def keyed(keyed_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(keyed_app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("GET", "/v1/models/tiny/layers"),
        ("GET", "/v1/methods"),
        ("POST", EXPLAIN),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef"),
        ("GET", "/docs"),
        ("GET", "/no/such/route"),
        ("POST", "/v1/models/tiny:predict"),
        ("POST", "/v1/models/tiny:explain"),
        ("POST", "/predictions/tiny"),
        ("PUT", "/explanations/tiny"),
    ],
)
def test_protected_routes_need_a_key(keyed: TestClient, method: str, path: str) -> None:
    for headers in (
        {},
        bearer("wrong-key-0123456789abcdef"),
        {"X-API-Key": "nope"},
        {"Authorization": "Basic x"},
    ):
        r = keyed.request(method, path, headers=headers)
        body = assert_problem(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert body["type"].endswith(":unauthorized")
        assert "wrong-key" not in r.text


def test_either_header_and_either_key_is_accepted(keyed: TestClient, png_bytes: bytes) -> None:
    for headers in (bearer(KEY_A), {"X-API-Key": KEY_B}, {"authorization": f"bearer  {KEY_B} "}):
        assert keyed.get("/v1/models", headers=headers).status_code == 200
    r = keyed.post(EXPLAIN, files=upload(png_bytes), data={"format": "json"}, headers=bearer(KEY_A))
    assert r.status_code == 200, r.text
    assert keyed.get("/docs", headers=bearer(KEY_A)).status_code == 200


def test_health_readiness_schema_and_metrics_stay_open(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert keyed.get(path).status_code == 200, path


def test_metrics_can_require_a_key(tiny_config: Path) -> None:
    app = create_app(make_settings(tiny_config, api_keys=KEY_A, metrics_require_key=True, warmup=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert_problem(c.get("/metrics"), 401)
        assert c.get("/metrics", headers=bearer(KEY_A)).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_openapi_declares_the_schemes_for_swagger_authorize(keyed: TestClient, client: TestClient) -> None:
    for c, optional in ((keyed, False), (client, True)):
        schema = c.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        explain = schema["paths"]["/v1/models/{model}/explain"]["post"]
        assert {"bearer": []} in explain["security"] and {"apiKey": []} in explain["security"]
        assert ({} in explain["security"]) is optional
        assert "401" in explain["responses"]
        assert "security" not in schema["paths"]["/healthz"]["get"]


def test_keys_never_reach_logs_or_responses(
    keyed: TestClient, png_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "zulu-key-0123456789abcdef"
    r1 = keyed.post(EXPLAIN, files=upload(png_bytes), data={"format": "json"}, headers=bearer(KEY_A))
    r2 = keyed.post(EXPLAIN, files=upload(png_bytes), headers=bearer(bad))
    r3 = keyed.post(EXPLAIN, files=upload(b"junk"), headers={"X-API-Key": KEY_B})
    assert r1.status_code == 200 and r2.status_code == 401 and r3.status_code == 415
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    for key in (KEY_A, KEY_B, bad):
        assert key not in logged
        for r in (r1, r2, r3):
            assert key not in r.text and key not in str(r.headers)
    metrics = keyed.get("/metrics").text
    for key in (KEY_A, KEY_B, bad):
        assert key not in metrics and principal_of(key) not in metrics


def test_comparison_is_constant_time_over_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.from_settings(Settings(api_keys=f"{KEY_A},{KEY_B}"))
    assert ring is not None and len(ring.digests) == 2
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert ring.identify(KEY_A) == principal_of(KEY_A)
    assert ring.identify(KEY_B) == principal_of(KEY_B)
    assert ring.identify(KEY_A[:-1]) is None
    # every key compared on every call (no early exit at a match), digests of equal length
    assert len(calls) == 6
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_key_configuration_errors(tmp_path: Path) -> None:
    assert KeyRing.from_settings(Settings()) is None
    with pytest.raises(ConfigError, match="shorter"):
        KeyRing.from_settings(Settings(api_keys="short"))
    with pytest.raises(ConfigError, match="none was given"):
        KeyRing.from_settings(Settings(api_keys=" , "))
    with pytest.raises(ConfigError, match="cannot read"):
        KeyRing.from_settings(Settings(api_keys_file=tmp_path / "missing.txt"))


def test_a_non_loopback_listener_without_keys_is_warned_about(
    tiny_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    caplog.set_level(logging.WARNING)
    create_app(make_settings(tiny_config, host="0.0.0.0", warmup=False))
    assert any("without API keys" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    create_app(make_settings(tiny_config, host="0.0.0.0", api_keys=KEY_A, warmup=False))
    assert not any("without API keys" in rec.getMessage() for rec in caplog.records)


def test_per_key_concurrency_limit() -> None:
    limits = KeyLimits(max_sync=2)
    limits.acquire("a")
    limits.acquire("a")
    limits.acquire("b")  # another key has its own slots
    with pytest.raises(RateLimited) as info:
        limits.acquire("a")
    assert info.value.retry_after >= 1
    limits.release("a")
    limits.acquire("a")
    for _ in range(3):
        limits.release("a")
    limits.release("b")
    assert limits.active == {}


def test_concurrent_requests_over_the_key_limit_get_429(keyed: TestClient, png_bytes: bytes) -> None:
    """Six concurrent explains with one key allowed two at a time: some 429 with Retry-After,
    none 5xx; another key is not affected; the slots are all returned."""
    # many passes, so the requests overlap
    data: dict[str, Any] = {"method": "integrated_gradients", "steps": "300", "format": "json"}

    def one(key: str) -> Any:
        return keyed.post(EXPLAIN, files=upload(png_bytes), data=data, headers=bearer(key))

    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(one, KEY_A) for _ in range(6)]
        other = pool.submit(one, KEY_B)
        responses = [f.result() for f in futures]
    statuses = [r.status_code for r in responses]
    assert 429 in statuses, statuses
    assert all(s in (200, 429) for s in statuses), statuses
    assert other.result().status_code == 200, other.result().text
    for r in responses:
        if r.status_code == 429:
            assert_problem(r, 429)
            assert int(r.headers["Retry-After"]) >= 1
    assert keyed.app.state.services.key_limits.active == {}  # type: ignore[attr-defined]


def test_cors_is_closed_by_default_and_opens_from_settings(tiny_config: Path, client: TestClient) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = client.options(EXPLAIN, headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    app = create_app(
        make_settings(tiny_config, cors_origins="https://app.example", api_keys=KEY_A, warmup=False)
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.options(EXPLAIN, headers={**preflight, "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200  # the preflight needs no key
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", **bearer(KEY_A)})
        assert "access-control-allow-origin" not in r.headers
