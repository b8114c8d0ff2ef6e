"""The compatibility routes (shared/API.md): KServe v1 ``:predict`` / ``:explain`` and
TorchServe ``/predictions`` / ``/explanations``, called with the request shapes those servers'
clients send, answering the same numbers as the native routes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from api_helpers import encode, make_settings, sample_image, upload, wait_ready
from fastapi.testclient import TestClient
from test_bad_inputs import assert_problem

from service.app import create_app

KSERVE = "/v1/models/tiny"
PARAMS = {"method": "saliency", "seed": 3}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [encode(sample_image(80, 50, seed=0)), encode(sample_image(64, 72, seed=1))]


def native_explain(client: TestClient, data: bytes, **params: Any) -> dict[str, Any]:
    form = {k: str(v) for k, v in {**PARAMS, **params, "format": "json"}.items()}
    r = client.post(f"{KSERVE}/explain", files=upload(data), data=form)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def native_predict(client: TestClient, data: bytes, top_k: int = 5) -> list[dict[str, Any]]:
    r = client.post(f"{KSERVE}/predict", files=upload(data), data={"top_k": str(top_k)})
    assert r.status_code == 200, r.text
    predictions: list[dict[str, Any]] = r.json()["predictions"]
    return predictions


# ------------------------------------------------------------------------------------------------
# KServe v1
# ------------------------------------------------------------------------------------------------
def kserve_instances(images: list[bytes]) -> Iterator[tuple[str, list[Any]]]:
    """The instance shapes KServe and TensorFlow Serving clients send an image in."""
    yield "image.b64", [{"image": {"b64": b64(d)}} for d in images]  # KServe's samples
    yield "data", [{"data": b64(d)} for d in images]  # TorchServe's KServe envelope (img2bytearray.py)
    yield "image_bytes.b64", [{"image_bytes": {"b64": b64(d)}} for d in images]  # TF Serving style
    yield "b64", [{"b64": b64(d)} for d in images]
    yield "string", [b64(d) for d in images]


def test_kserve_predict_matches_the_native_route(client: TestClient, images: list[bytes]) -> None:
    expected = [native_predict(client, d) for d in images]
    for shape, instances in kserve_instances(images):
        r = client.post(f"{KSERVE}:predict", json={"instances": instances})
        assert r.status_code == 200, (shape, r.text)
        assert r.headers["content-type"] == "application/json"
        got = r.json()["predictions"]
        assert [[p["index"] for p in row] for row in got] == [[p["index"] for p in row] for row in expected]
        for row, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(
                [p["probability"] for p in row], [p["probability"] for p in want], atol=2e-6
            )
    r = client.post(f"{KSERVE}:predict", json={"instances": [b64(images[0])], "parameters": {"top_k": 2}})
    assert len(r.json()["predictions"][0]) == 2


def test_kserve_explain_entries_match_the_native_route(client: TestClient, images: list[bytes]) -> None:
    """Two instances in one request: each entry equals the native explain of that image alone
    (a map never depends on its batch), tagged with its image_index; parameters are applied."""
    expected = [native_explain(client, d)["explanations"][0] for d in images]
    body = {"instances": [{"image": {"b64": b64(d)}} for d in images], "parameters": PARAMS}
    r = client.post(f"{KSERVE}:explain", json=body)
    assert r.status_code == 200, r.text
    entries = r.json()["explanations"]
    assert [e["image_index"] for e in entries] == [0, 1]
    assert [e["shape"] for e in entries] == [[50, 80], [72, 64]]
    for entry, want in zip(entries, expected, strict=True):
        assert entry["target"]["index"] == want["target"]["index"]
        assert entry["target"]["score"] == pytest.approx(want["target"]["score"], abs=2e-6)
        np.testing.assert_allclose(np.array(entry["heatmap"]), np.array(want["heatmap"]), atol=2e-4)
    # curl -d @input.json sends the JSON as a form: it is read as JSON all the same
    raw = orjson.dumps(
        {"instances": [{"data": b64(images[0])}], "parameters": {**PARAMS, "resolution": "model"}}
    )
    r = client.post(
        f"{KSERVE}:explain", content=raw, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200, r.text
    [entry] = r.json()["explanations"]
    assert entry["shape"] == [64, 64]
    want = native_explain(client, images[0], resolution="model")["explanations"][0]
    np.testing.assert_allclose(np.array(entry["heatmap"]), np.array(want["heatmap"]), atol=2e-4)


def test_kserve_explain_top_k_and_score(client: TestClient, images: list[bytes]) -> None:
    body = {"inputs": [b64(images[0])], "parameters": {**PARAMS, "top_k": 2, "score": True, "curve_steps": 4}}
    r = client.post(f"{KSERVE}:explain", json=body)
    assert r.status_code == 422  # curve_steps is the evaluate route's, not explain's
    assert r.json()["errors"][0]["field"] == "parameters.curve_steps"
    del body["parameters"]["curve_steps"]  # type: ignore[attr-defined]
    r = client.post(f"{KSERVE}:explain", json=body)
    assert r.status_code == 200, r.text
    entries = r.json()["explanations"]
    want = native_explain(client, images[0], top_k=2, score="true")["explanations"]
    assert [e["image_index"] for e in entries] == [0, 0]
    assert [e["target"]["index"] for e in entries] == [w["target"]["index"] for w in want]
    for entry, w in zip(entries, want, strict=True):
        assert entry["deletion_auc"] == pytest.approx(w["deletion_auc"], abs=1e-5)
        assert entry["insertion_auc"] == pytest.approx(w["insertion_auc"], abs=1e-5)


def test_kserve_routes_leave_the_model_routes_alone(client: TestClient) -> None:
    assert client.get("/v1/models/tiny").json()["name"] == "tiny"
    assert client.get("/v1/models/tiny/layers").status_code == 200
    assert_problem(client.post("/v1/models/nope:predict", json={"instances": ["aGk="]}), 404)
    assert_problem(client.get(f"{KSERVE}:explain"), 404)  # no model is named "tiny:explain"


# ------------------------------------------------------------------------------------------------
# TorchServe
# ------------------------------------------------------------------------------------------------
def test_torchserve_predictions_in_each_client_shape(client: TestClient, images: list[bytes]) -> None:
    want = {p["label"]: p["probability"] for p in native_predict(client, images[0])}
    assert len(want) == 5
    calls = {
        # curl http://host/predictions/tiny -T kitten.jpg: PUT, no content type
        "curl -T": lambda: client.put("/predictions/tiny", content=images[0]),
        # curl -X POST --data-binary @kitten.jpg: a form content type over raw bytes
        "curl --data-binary": lambda: client.post(
            "/predictions/tiny",
            content=images[0],
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        # requests.post(url, data=open("kitten.jpg", "rb"))
        "requests data=": lambda: client.post(
            "/predictions/tiny", content=images[0], headers={"content-type": "application/octet-stream"}
        ),
        # requests.post(url, files={"data": open("kitten.jpg", "rb")}); curl -F "data=@kitten.jpg"
        "multipart data": lambda: client.post("/predictions/tiny", files={"data": ("kitten.jpg", images[0])}),
    }
    for name, call in calls.items():
        r = call()
        assert r.status_code == 200, (name, r.text)
        got = r.json()
        assert list(got) == list(want), name  # best first
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=2e-6)
    # two files in data: a list, one answer per image
    r = client.post("/predictions/tiny", files=[("data", ("a.png", d)) for d in images])
    assert r.status_code == 200
    assert r.json()[0] == pytest.approx(want, abs=2e-6)
    assert len(r.json()) == 2 and len(r.json()[1]) == 5


def test_torchserve_explanations_are_nested_lists(client: TestClient, images: list[bytes]) -> None:
    want = [np.array(native_explain(client, d)["explanations"][0]["heatmap"]) for d in images]
    r = client.put("/explanations/tiny?method=saliency&seed=3", content=images[0])
    assert r.status_code == 200, r.text
    [attribution] = r.json()
    np.testing.assert_allclose(np.array(attribution), want[0], atol=2e-4)
    r = client.post(
        "/explanations/tiny?seed=3",
        files=[("data", ("a.png", images[0])), ("data", ("b.png", images[1]))],
        data={"method": "saliency"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == 2
    for got, w in zip(body, want, strict=True):
        np.testing.assert_allclose(np.array(got), w, atol=2e-4)
    # reduction=none: [C, H, W], as Captum's attributions in TorchServe's own answer
    r = client.post("/explanations/tiny?method=saliency&reduction=none&resolution=model", content=images[0])
    assert np.array(r.json()).shape == (1, 3, 64, 64)
    # several targets: the list of each target's map
    r = client.post("/explanations/tiny?method=saliency&top_k=3&resolution=model", content=images[0])
    assert np.array(r.json()).shape == (1, 3, 64, 64)


def test_large_compat_answers_stream_and_match(
    client: TestClient, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api import budget

    kserve = {"instances": [b64(d) for d in images], "parameters": PARAMS}
    whole = (
        client.post(f"{KSERVE}:explain", json=kserve),
        client.post("/explanations/tiny", content=images[1]),
    )
    monkeypatch.setattr(budget, "STREAM_BYTES", 1000)
    streamed = (
        client.post(f"{KSERVE}:explain", json=kserve),
        client.post("/explanations/tiny", content=images[1]),
    )
    for a, b in zip(whole, streamed, strict=True):
        assert a.status_code == b.status_code == 200
        assert "content-length" in a.headers and "content-length" not in b.headers
        assert a.json() == b.json()


# ------------------------------------------------------------------------------------------------
# limits
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight(tiny_config: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(tiny_config, max_image_pixels=6000, max_sync_images=3))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_images_of_one_request_share_the_pixel_limit(tight: TestClient, images: list[bytes]) -> None:
    one = images[0]  # 80 × 50 = 4000 pixels: alone it is within the 6000
    assert tight.post(f"{KSERVE}:predict", json={"instances": [b64(one)]}).status_code == 200
    body = assert_problem(tight.post(f"{KSERVE}:predict", json={"instances": [b64(one), b64(one)]}), 413)
    assert "together" in body["detail"]
    assert_problem(tight.post("/predictions/tiny", files=[("data", ("a.png", one))] * 2), 413)
    body = assert_problem(tight.post(f"{KSERVE}:predict", json={"instances": ["aGk="] * 4}), 422)
    assert body["errors"][0]["field"] == "instances" and "at most 3" in body["errors"][0]["message"]
    small = encode(sample_image(20, 20))
    body = assert_problem(tight.post("/explanations/tiny", files=[("data", ("a.png", small))] * 4), 422)
    assert body["errors"][0]["field"] == "data"


def test_compat_explanations_count_against_the_synchronous_budget(
    client: TestClient, images: list[bytes]
) -> None:
    """3 instances × 3 targets × 512 steps = 4608 passes > 4096: refused, pointing to jobs."""
    params = {"method": "integrated_gradients", "steps": 512, "top_k": 3}
    body = {"instances": [b64(images[0])] * 3, "parameters": params}
    problem = assert_problem(client.post(f"{KSERVE}:explain", json=body), 422)
    assert problem["type"].endswith(":too-heavy") and "/v1/jobs" in problem["detail"]
    body["instances"] = body["instances"][:2]  # type: ignore[index]
    query = "&".join(f"{k}={v}" for k, v in params.items())
    r = client.post(f"/explanations/tiny?{query}", files=[("data", ("a.png", images[0]))] * 3)
    assert_problem(r, 422)
