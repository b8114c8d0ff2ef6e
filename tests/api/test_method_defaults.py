"""Per-method parameter defaults and limits, end to end: ``GET /v1/methods`` lists each method's
own, a request that leaves a parameter unset gets its method's (echoed in ``parameters``), one that
sets it keeps its value, and a method's own bound is a 422 naming the field."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

EXPLAIN = "/v1/models/tiny/explain"


def schemas(client: TestClient) -> dict[str, dict[str, Any]]:
    methods = client.get("/v1/methods").json()["methods"]
    return {m["name"]: m["parameters"]["properties"] for m in methods}


def test_methods_list_their_own_defaults_and_bounds(client: TestClient) -> None:
    s = schemas(client)
    assert s["occlusion"]["baseline"]["default"] == "mean"
    assert s["integrated_gradients"]["baseline"]["default"] == "black"
    assert s["integrated_gradients"]["steps"]["default"] == 32
    assert s["blur_ig"]["steps"]["default"] == 100
    assert s["guided_ig"]["steps"]["default"] == 200
    assert s["xrai"]["steps"]["default"] == 100
    for m in ("kernel_shap", "lime"):
        assert s[m]["samples"]["default"] == 1000 and s[m]["samples"]["maximum"] == 4096
        assert s[m]["baseline"]["default"] == "mean"
    for m in ("smoothgrad", "vargrad", "smoothgrad_sq", "gradient_shap", "smooth_ig"):
        assert s[m]["samples"]["default"] == 16 and s[m]["samples"]["maximum"] == 256


def _echo(client: TestClient, png: bytes, **data: str) -> dict[str, Any]:
    r = client.post(EXPLAIN, files={"image": ("x.png", png, "image/png")}, data={"format": "json", **data})
    assert r.status_code == 200, r.text
    parameters: dict[str, Any] = r.json()["parameters"]
    return parameters


def test_unset_parameters_take_the_methods_default_and_set_ones_stay(
    client: TestClient, png_bytes: bytes
) -> None:
    assert _echo(client, png_bytes, method="occlusion", window="8", stride="8")["baseline"] == "mean"
    given = _echo(client, png_bytes, method="occlusion", window="8", stride="8", baseline="white")
    assert given["baseline"] == "white"
    assert _echo(client, png_bytes, method="integrated_gradients", steps="4")["baseline"] == "black"
    lime = _echo(client, png_bytes, method="lime", samples="20", segments="4", seed="1")
    assert (lime["samples"], lime["baseline"], lime["segments"]) == (20, "mean", 4)


def test_compare_resolves_each_method_on_its_own(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(
        "/v1/models/tiny/compare",
        files={"image": ("x.png", png_bytes, "image/png")},
        data={
            "methods": "occlusion,integrated_gradients",
            "window": "8",
            "stride": "8",
            "steps": "4",
            "format": "json",
        },
    )
    assert r.status_code == 200, r.text
    echoed = {e["method"]: e["parameters"]["baseline"] for e in r.json()["results"]}
    assert echoed == {"occlusion": "mean", "integrated_gradients": "black"}


def test_a_methods_own_bound_is_a_422_naming_the_field(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(
        EXPLAIN,
        files={"image": ("x.png", png_bytes, "image/png")},
        data={"method": "smoothgrad", "samples": "300"},
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "samples"
    assert "smoothgrad" in r.json()["detail"]
