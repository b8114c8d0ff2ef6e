"""Every registered method × every output format, through HTTP, checked against the engine."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from api_helpers import LABELS, decode_png, sample_image, upload
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.explainers import ExplainParams, Explanation, Targets, explain, get_method, method_names
from service.imaging.render import normalize

# small but non-trivial settings so that every method stays cheap on the 64×64 ResNet
FAST = {"steps": "4", "samples": "3", "masks": "8", "seed": "7"}
# Score-CAM costs one forward pass per channel: explain the 64-channel layer1, not layer4's 512
LAYER = {"scorecam": "layer1"}
METHODS = [n for n in method_names() if get_method(n).family != "attention"]  # the test model is a CNN
H, W = 50, 80  # the sample image


def fast(method: str) -> dict[str, str]:
    data = {"method": method, **FAST}
    if method in LAYER:
        data["layer"] = LAYER[method]
    return data


@pytest.fixture(scope="module")
def top1(client: TestClient, png_bytes: bytes) -> dict[str, Any]:
    r = client.post("/v1/models/tiny/predict", files=upload(png_bytes), data={"top_k": "1"})
    assert r.status_code == 200, r.text
    pred: dict[str, Any] = r.json()["predictions"][0]
    return pred


def engine_explanation(app: FastAPI, method: str, image_png: bytes, target: int) -> Explanation:
    """The engine's answer for the same image and parameters, called in-process."""
    model = app.state.services.registry.get("tiny")
    x, _ = model.preprocess(decode_png(image_png).convert("RGB"))
    # as a request: what it leaves unset takes the method's default (occlusion's mean baseline)
    params = ExplainParams.request(steps=4, samples=3, masks=8, seed=7, layer=LAYER.get(method))
    return explain(model.handle, x[None], method, params, targets=Targets.given([[target]]))


@pytest.mark.parametrize("method", METHODS)
def test_png_heatmap_has_upload_size_and_target_headers(
    client: TestClient, png_bytes: bytes, top1: dict[str, Any], method: str
) -> None:
    r = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={**fast(method)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    image = decode_png(r.content)
    assert image.size == (W, H)
    assert int(r.headers["X-Target-Index"]) == top1["index"]
    assert r.headers["X-Target-Label"] == top1["label"]
    assert float(r.headers["X-Target-Score"]) == pytest.approx(top1["probability"], abs=1e-5)
    assert float(r.headers["X-Elapsed-Ms"]) > 0


@pytest.mark.parametrize("method", METHODS)
def test_overlay_blends_heatmap_over_the_upload(client: TestClient, png_bytes: bytes, method: str) -> None:
    data = {**fast(method), "style": "heatmap", "alpha": "0.5"}
    heat = decode_png(client.post("/v1/models/tiny/explain", files=upload(png_bytes), data=data).content)
    r = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={**data, "format": "overlay"})
    assert r.status_code == 200, r.text
    over = np.asarray(decode_png(r.content), dtype=np.float64)
    # heatmap style: overlay = (1 - alpha)·image + alpha·heatmap (±1 for rounding)
    expected = 0.5 * np.asarray(decode_png(png_bytes), dtype=np.float64) + 0.5 * np.asarray(
        heat, dtype=np.float64
    )
    assert over.shape == (H, W, 3)
    assert np.abs(over - expected).max() <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_json_matches_the_engine(app: FastAPI, client: TestClient, png_bytes: bytes, method: str) -> None:
    data = {**fast(method), "format": "json", "resolution": "model", "normalize": "none"}
    r = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["method"] == method
    [item] = body["explanations"]
    assert item["shape"] == [64, 64]
    target = item["target"]["index"]
    assert item["target"]["label"] == LABELS[target]
    got = np.asarray(item["heatmap"])
    expl = engine_explanation(app, method, png_bytes, target)
    want = expl.maps[0, 0].numpy()
    peak = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, atol=1e-4 * peak, rtol=0)
    assert item["min"] == pytest.approx(float(want.min()), abs=1e-6 * peak)
    assert item["max"] == pytest.approx(float(want.max()), abs=1e-6 * peak)
    if expl.completeness_delta is None:
        assert item["completeness_delta"] is None
    else:
        assert item["completeness_delta"] == pytest.approx(
            float(expl.completeness_delta[0, 0]), rel=1e-4, abs=1e-6
        )


@pytest.mark.parametrize("method", METHODS)
def test_json_minmax_range_and_parameters(client: TestClient, png_bytes: bytes, method: str) -> None:
    r = client.post(
        "/v1/models/tiny/explain", files=upload(png_bytes), data={**fast(method), "format": "json"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    [item] = body["explanations"]
    heat = np.asarray(item["heatmap"])
    assert heat.shape == (H, W) and item["shape"] == [H, W]
    signed = get_method(method).signed
    if item["max"] > item["min"]:
        if signed:
            assert np.abs(heat).max() == pytest.approx(1.0, abs=1e-4)
        else:
            assert heat.min() == pytest.approx(0.0, abs=1e-4)
            assert heat.max() == pytest.approx(1.0, abs=1e-4)
    params = body["parameters"]
    assert set(params) == {
        "method", "target", "top_k", "layer", "steps", "samples", "noise_level", "baseline", "rule",
        "head_fusion", "discard_ratio", "legrad_layers", "window", "stride", "masks", "mask_cells", "mask_p",
        "segments", "max_sigma", "fraction", "max_dist", "seed", "batch_size", "precision", "resolution", "colormap",
        "alpha", "polarity", "clip_lower", "clip_upper", "style", "keep", "smooth", "reduction",
        "normalize", "format",
    }  # fmt: skip
    assert params["method"] == method
    assert params["steps"] == 4 and params["samples"] == 3 and params["seed"] == 7
    # rendering as it would be applied: the method's defaults, every one resolved
    rendering = get_method(method).rendering
    for name in ("polarity", "clip_lower", "clip_upper", "style", "smooth"):
        assert params[name] == rendering[name]
    assert params["colormap"] == (
        "diverging"
        if rendering["polarity"] == "both" and rendering["colormap"] != "rgb"
        else rendering["colormap"]
    )
    assert params["alpha"] == rendering.get("alpha", {"heatmap": 0.5}.get(str(rendering["style"]), 1.0))
    assert params["keep"] == 0.2
    assert params["format"] == "json" and params["resolution"] == "original"
    if get_method(method).needs_layer:
        assert params["layer"] == LAYER.get(method, "layer4")
    else:
        assert params["layer"] is None


@pytest.mark.parametrize("method", METHODS)
def test_npy_is_the_raw_float32_map(client: TestClient, png_bytes: bytes, method: str) -> None:
    data = {**fast(method)}
    r = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={**data, "format": "npy"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (1, H, W)
    raw = client.post(
        "/v1/models/tiny/explain",
        files=upload(png_bytes),
        data={**data, "format": "json", "normalize": "none"},
    ).json()["explanations"][0]
    peak = float(np.abs(arr).max()) or 1.0
    np.testing.assert_allclose(np.asarray(raw["heatmap"]), arr[0], atol=1e-4 * peak, rtol=0)
    # minmax normalisation of the raw array is what json shows by default
    signed = get_method(method).signed
    default = client.post(
        "/v1/models/tiny/explain", files=upload(png_bytes), data={**data, "format": "json"}
    ).json()["explanations"][0]
    np.testing.assert_allclose(np.asarray(default["heatmap"]), normalize(arr[0], "minmax", signed), atol=1e-4)


def test_heatmap_png_is_the_colormap_of_the_map(client: TestClient, png_bytes: bytes) -> None:
    """Grey colormap: the PNG's pixel values are the min-max normalised map × 255."""
    data = {"method": "gradcam", "colormap": "gray"}
    png = decode_png(client.post("/v1/models/tiny/explain", files=upload(png_bytes), data=data).content)
    j = client.post(
        "/v1/models/tiny/explain", files=upload(png_bytes), data={**data, "format": "json"}
    ).json()
    grey = np.asarray(png, dtype=np.float64)[..., 0]
    expected = np.asarray(j["explanations"][0]["heatmap"]) * 255.0
    assert np.abs(grey - expected).max() <= 1.5


def test_alpha_zero_and_one(client: TestClient, png_bytes: bytes) -> None:
    base = {"method": "gradcam", "format": "overlay"}
    zero = decode_png(
        client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={**base, "alpha": "0"}).content
    )
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(decode_png(png_bytes)))
    one = decode_png(
        client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={**base, "alpha": "1"}).content
    )
    heat = decode_png(
        client.post("/v1/models/tiny/explain", files=upload(png_bytes), data={"method": "gradcam"}).content
    )
    assert np.abs(np.asarray(one, dtype=int) - np.asarray(heat, dtype=int)).max() <= 1


def test_same_seed_same_result_different_seed_differs(client: TestClient, png_bytes: bytes) -> None:
    def run(seed: str) -> np.ndarray:
        data = {"method": "smoothgrad", "samples": "4", "seed": seed, "format": "npy"}
        r = client.post("/v1/models/tiny/explain", files=upload(png_bytes), data=data)
        return np.load(io.BytesIO(r.content))

    a, b, c = run("11"), run("11"), run("12")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_batch_size_is_not_a_result_knob(client: TestClient, png_bytes: bytes) -> None:
    def run(batch: str) -> np.ndarray:
        data = {"method": "integrated_gradients", "steps": "8", "batch_size": batch, "format": "npy"}
        return np.load(
            io.BytesIO(client.post("/v1/models/tiny/explain", files=upload(png_bytes), data=data).content)
        )

    np.testing.assert_allclose(run("1"), run("32"), rtol=1e-4, atol=1e-6)


def test_json_body_with_base64_equals_multipart(client: TestClient, png_bytes: bytes) -> None:
    import base64

    form = client.post(
        "/v1/models/tiny/explain",
        files=upload(png_bytes),
        data={"method": "saliency", "format": "json", "target": "4"},
    ).json()
    body = {
        "image": base64.b64encode(png_bytes).decode(),
        "method": "saliency",
        "format": "json",
        "target": 4,
    }
    j = client.post("/v1/models/tiny/explain", json=body)
    assert j.status_code == 200, j.text
    assert j.json()["explanations"] == form["explanations"]
    # a data URI prefix is accepted too
    body["image"] = "data:image/png;base64," + body["image"]
    assert client.post("/v1/models/tiny/explain", json=body).json()["explanations"] == form["explanations"]


def test_query_string_parameters_are_read(client: TestClient, png_bytes: bytes) -> None:
    r = client.post("/v1/models/tiny/explain?format=json&target=2", files=upload(png_bytes))
    assert r.status_code == 200
    assert r.json()["explanations"][0]["target"]["index"] == 2


def test_concurrent_requests_on_one_model_stay_correct(client: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from api_helpers import encode

    images = [encode(sample_image(seed=s)) for s in range(6)]

    def run(data: bytes) -> np.ndarray:
        r = client.post(
            "/v1/models/tiny/explain", files=upload(data), data={"method": "gradcam", "format": "npy"}
        )
        assert r.status_code == 200
        return np.load(io.BytesIO(r.content))

    sequential = [run(d) for d in images]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(run, images * 2))
    for i, arr in enumerate(concurrent):
        np.testing.assert_allclose(arr, sequential[i % len(images)], rtol=1e-5, atol=1e-6)


def test_model_is_not_modified_by_requests(app: FastAPI, client: TestClient, png_bytes: bytes) -> None:
    model = app.state.services.registry.get("tiny")
    before = {k: v.clone() for k, v in model.handle.module.state_dict().items()}
    for method in ("guided_backprop", "deconvnet", "gradcam"):
        assert (
            client.post(
                "/v1/models/tiny/explain", files=upload(png_bytes), data={"method": method}
            ).status_code
            == 200
        )
    after = model.handle.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.handle.module.parameters())
