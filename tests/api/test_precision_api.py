"""``precision`` over HTTP: what ran is echoed; bf16 without bf16 units, or for a method whose bf16
fidelity was not measured, is a 422 problem naming the parameter (``service.explainers.precision``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from api_helpers import upload
from fastapi.testclient import TestClient

from service.explainers import precision as prec

EXPLAIN = "/v1/models/tiny/explain"


def problem(r: Any) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["type"].endswith("precision-unavailable") and body["errors"][0]["field"] == "precision"
    return body


def test_bf16_is_a_422_where_the_device_has_no_bf16_units(
    client: TestClient, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prec, "bf16_supported", lambda device: False)
    body = problem(
        client.post(EXPLAIN, files=upload(png_bytes), data={"precision": "bf16", "format": "json"})
    )
    assert "matrix units" in body["detail"]
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"precision": "auto", "format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["precision"] == "fp32"
    jobs = client.post(
        "/v1/jobs",
        files=[("images", ("a.png", png_bytes, "image/png"))],
        data={"model": "tiny", "precision": "bf16", "method": "gradcam"},
    )
    problem(jobs)


def test_bf16_for_an_unmeasured_method_is_a_422(client: TestClient, png_bytes: bytes) -> None:
    body = problem(
        client.post(EXPLAIN, files=upload(png_bytes), data={"precision": "bf16", "method": "occlusion"})
    )
    assert "not offered in bf16" in body["detail"] and "gradcam" in body["detail"]


@pytest.mark.skipif(not prec.cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
def test_the_echo_says_what_ran(client: TestClient, png_bytes: bytes) -> None:
    auto = "bf16" if prec.bf16_pays(torch.device("cpu")) else "fp32"  # an AVX512-BF16-only CPU: fp32
    for asked, ran in (("bf16", "bf16"), ("auto", auto), ("fp32", "fp32")):
        r = client.post(EXPLAIN, files=upload(png_bytes), data={"precision": asked, "format": "json"})
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["precision"] == ran
    r = client.post(
        EXPLAIN, files=upload(png_bytes), data={"method": "occlusion", "precision": "auto", "format": "json"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["precision"] == "fp32"  # not offered in bf16
