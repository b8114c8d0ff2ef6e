"""Targets (default, explicit, top-k), resolution original vs model (EXIF included), reduction."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from api_helpers import LABELS, decode_png, encode, sample_image, upload
from fastapi.testclient import TestClient
from PIL import Image

from service.imaging.geometry import make_geometry, to_original

EXPLAIN = "/v1/models/tiny/explain"


def predictions(client: TestClient, data: bytes, k: int = 10) -> list[dict[str, object]]:
    r = client.post("/v1/models/tiny/predict", files=upload(data), data={"top_k": str(k)})
    assert r.status_code == 200, r.text
    preds: list[dict[str, object]] = r.json()["predictions"]
    return preds


def test_predict_default_top5_sorted_probabilities(client: TestClient, png_bytes: bytes) -> None:
    r = client.post("/v1/models/tiny/predict", files=upload(png_bytes))
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny" and body["elapsed_ms"] > 0
    preds = body["predictions"]
    assert len(preds) == 5
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert all(p["label"] == LABELS[p["index"]] for p in preds)
    full = predictions(client, png_bytes)
    assert sum(p["probability"] for p in full) == pytest.approx(1.0, abs=1e-4)  # type: ignore[misc]
    assert [p["index"] for p in full[:5]] == [p["index"] for p in preds]


def test_target_default_is_top1_and_explicit_target_is_used(client: TestClient, png_bytes: bytes) -> None:
    top = predictions(client, png_bytes)
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"format": "json"})
    item = r.json()["explanations"][0]
    assert item["target"]["index"] == top[0]["index"]
    assert item["target"]["score"] == pytest.approx(top[0]["probability"], abs=1e-5)
    last = top[-1]
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"target": str(last["index"])})
    assert r.status_code == 200
    assert int(r.headers["X-Target-Index"]) == last["index"]
    assert r.headers["X-Target-Label"] == last["label"]
    assert float(r.headers["X-Target-Score"]) == pytest.approx(last["probability"], abs=1e-5)  # type: ignore[arg-type]
    j = client.post(
        EXPLAIN, files=upload(png_bytes), data={"target": str(last["index"]), "format": "json"}
    ).json()
    assert j["parameters"]["target"] == last["index"]
    assert j["explanations"][0]["target"]["index"] == last["index"]
    # a different class gives a different map
    a = client.post(EXPLAIN, files=upload(png_bytes), data={"format": "npy"}).content
    b = client.post(
        EXPLAIN, files=upload(png_bytes), data={"format": "npy", "target": str(last["index"])}
    ).content
    assert not np.allclose(np.load(io.BytesIO(a)), np.load(io.BytesIO(b)))


def test_top_k_explains_the_k_best_in_order(client: TestClient, png_bytes: bytes) -> None:
    top = predictions(client, png_bytes)
    j = client.post(EXPLAIN, files=upload(png_bytes), data={"top_k": "3", "format": "json"}).json()
    assert [e["target"]["index"] for e in j["explanations"]] == [p["index"] for p in top[:3]]
    assert j["parameters"]["top_k"] == 3
    arr = np.load(
        io.BytesIO(
            client.post(EXPLAIN, files=upload(png_bytes), data={"top_k": "3", "format": "npy"}).content
        )
    )
    assert arr.shape == (3, 50, 80) and arr.dtype == np.float32
    # each slice is that target's own map
    for k, p in enumerate(top[:3]):
        one = client.post(EXPLAIN, files=upload(png_bytes), data={"target": str(p["index"]), "format": "npy"})
        np.testing.assert_allclose(np.load(io.BytesIO(one.content))[0], arr[k], rtol=1e-4, atol=1e-6)
    # PNG shows the first (best) target
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"top_k": "3"})
    assert int(r.headers["X-Target-Index"]) == top[0]["index"]


def test_resolution_model_vs_original(client: TestClient, png_bytes: bytes) -> None:
    model_map = client.post(
        EXPLAIN, files=upload(png_bytes), data={"resolution": "model", "format": "npy", "method": "saliency"}
    )
    orig_map = client.post(EXPLAIN, files=upload(png_bytes), data={"format": "npy", "method": "saliency"})
    m = np.load(io.BytesIO(model_map.content))[0]
    o = np.load(io.BytesIO(orig_map.content))[0]
    assert m.shape == (64, 64) and o.shape == (50, 80)
    np.testing.assert_allclose(o, to_original(m, make_geometry(80, 50, (3, 64, 64), "stretch")), atol=1e-6)
    png = decode_png(client.post(EXPLAIN, files=upload(png_bytes), data={"resolution": "model"}).content)
    assert png.size == (64, 64)
    over = decode_png(
        client.post(
            EXPLAIN, files=upload(png_bytes), data={"resolution": "model", "format": "overlay"}
        ).content
    )
    assert over.size == (64, 64)


def test_exif_rotated_upload_maps_onto_the_displayed_image(client: TestClient) -> None:
    stored = sample_image(80, 50, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: shown as 50 wide × 80 high
    jpeg = encode(stored, "JPEG", quality=95, exif=exif)
    j = client.post(EXPLAIN, files=upload(jpeg, "r.jpg", "image/jpeg"), data={"format": "json"}).json()
    assert j["explanations"][0]["shape"] == [80, 50]
    png = decode_png(client.post(EXPLAIN, files=upload(jpeg, "r.jpg", "image/jpeg")).content)
    assert png.size == (50, 80)
    overlay = decode_png(
        client.post(
            EXPLAIN, files=upload(jpeg, "r.jpg", "image/jpeg"), data={"format": "overlay", "alpha": "0"}
        ).content
    )
    # alpha 0 shows the upload as displayed: the stored image rotated (JPEG noise aside)
    upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(np.asarray(overlay, dtype=np.float64) - upright).mean() < 6.0
    # the same picture stored upright gives the same prediction as the rotated upload
    upright_png = encode(stored.transpose(Image.Transpose.ROTATE_270))
    r1 = client.post("/v1/models/tiny/predict", files=upload(upright_png)).json()["predictions"][0]["index"]
    r2 = client.post("/v1/models/tiny/predict", files=upload(jpeg, "r.jpg", "image/jpeg")).json()
    assert r2["predictions"][0]["index"] == r1


def test_center_crop_border_is_zero_not_stretched(client: TestClient, png_bytes: bytes) -> None:
    # 80×50 into 64×64 with center_crop: scale 1.28, the model sees the centre 50×50 (x 15..65)
    r = client.post(
        "/v1/models/tiny_crop/explain", files=upload(png_bytes), data={"format": "npy", "method": "saliency"}
    )
    assert r.status_code == 200, r.text
    o = np.load(io.BytesIO(r.content))[0]
    assert o.shape == (50, 80)
    assert np.all(o[:, :15] == 0) and np.all(o[:, 65:] == 0)
    assert np.count_nonzero(o[:, 15:65]) > 0.9 * 50 * 50
    m = client.post(
        "/v1/models/tiny_crop/explain",
        files=upload(png_bytes),
        data={"format": "npy", "method": "saliency", "resolution": "model"},
    )
    mm = np.load(io.BytesIO(m.content))[0]
    np.testing.assert_allclose(
        o, to_original(mm, make_geometry(80, 50, (3, 64, 64), "center_crop")), atol=1e-6
    )


def test_reduction_none_keeps_channels(client: TestClient, png_bytes: bytes) -> None:
    data = {"method": "input_x_gradient", "reduction": "none", "format": "json", "normalize": "none"}
    j = client.post(EXPLAIN, files=upload(png_bytes), data=data)
    assert j.status_code == 200, j.text
    item = j.json()["explanations"][0]
    assert item["shape"] == [3, 50, 80]
    per_channel = np.asarray(item["heatmap"])
    assert per_channel.shape == (3, 50, 80)
    npy = client.post(EXPLAIN, files=upload(png_bytes), data={**data, "format": "npy"})
    arr = np.load(io.BytesIO(npy.content))
    assert arr.shape == (1, 3, 50, 80)
    np.testing.assert_allclose(per_channel, arr[0], atol=1e-4 * float(np.abs(arr).max()))
    # the model-resolution attribution is (3, 64, 64)
    j2 = client.post(EXPLAIN, files=upload(png_bytes), data={**data, "resolution": "model"}).json()
    assert j2["explanations"][0]["shape"] == [3, 64, 64]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"method": "gradcam", "reduction": "none", "format": "json"}, "reduction"),  # CAM: no channels
        ({"method": "saliency", "reduction": "none", "format": "png"}, "reduction"),  # images: no channels
    ],
)
def test_reduction_none_where_it_cannot_apply(
    client: TestClient, png_bytes: bytes, data: dict[str, str], field: str
) -> None:
    r = client.post(EXPLAIN, files=upload(png_bytes), data=data)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert any(e["field"] == field for e in r.json()["errors"])


def test_both_polarities_default_to_diverging_colormap(client: TestClient, png_bytes: bytes) -> None:
    def echo(**data: str) -> dict[str, Any]:
        r = client.post(EXPLAIN, files=upload(png_bytes), data={"steps": "4", "format": "json", **data})
        assert r.status_code == 200, r.text
        params: dict[str, Any] = r.json()["parameters"]
        return params

    assert echo(method="input_x_gradient")["colormap"] == "diverging"  # its default polarity: both
    assert echo(method="integrated_gradients")["colormap"] == "inferno"  # positive: sequential
    assert echo(method="integrated_gradients", polarity="both")["colormap"] == "diverging"
    assert echo(method="integrated_gradients", polarity="both", colormap="viridis")["colormap"] == "viridis"
    assert echo(method="guided_backprop", polarity="both")["colormap"] == "rgb"  # rgb stays rgb
    # diverging, unclipped: a zero map value is the table's white middle
    j = client.post(
        EXPLAIN,
        files=upload(png_bytes),
        data={"method": "integrated_gradients", "steps": "4", "format": "json"},
    )
    both = {"polarity": "both", "clip_lower": "0", "clip_upper": "100"}
    heat = decode_png(
        client.post(
            EXPLAIN, files=upload(png_bytes), data={"method": "integrated_gradients", "steps": "4", **both}
        ).content
    )
    values = np.asarray(j.json()["explanations"][0]["heatmap"])
    pix = np.asarray(heat, dtype=int)
    near_zero = np.abs(values) < 0.004
    if near_zero.any():
        assert (pix[near_zero] > 235).all()
