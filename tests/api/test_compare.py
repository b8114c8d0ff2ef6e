"""``POST /v1/models/{model}/compare``: one labelled grid, or the explain JSON of every method."""

from __future__ import annotations

import io

import numpy as np
import pytest
from api_helpers import decode_png, upload
from fastapi.testclient import TestClient

from service.api.options import DEFAULT_COMPARE
from service.imaging.render import TILE, grid_columns

COMPARE = "/v1/models/tiny/compare"


def grid_size(panels: int, width: int = 80, height: int = 50) -> tuple[int, int]:
    """compare_grid's layout: tiles scaled to TILE on the long side, 8 px padding, labels above."""
    scale = TILE / max(width, height)
    tw, th = round(width * scale), round(height * scale)
    cols = grid_columns(panels)
    rows = -(-panels // cols)
    label_h = 18 + 10
    return cols * (tw + 8) + 8, rows * (th + label_h + 8) + 8


def test_default_set_is_one_labelled_grid(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(COMPARE, files=upload(png_bytes), data={"steps": "4"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    grid = decode_png(r.content)
    assert grid.size == grid_size(1 + len(DEFAULT_COMPARE))
    assert r.headers["X-Target-Index"].isdigit()


def test_grid_panels_are_the_explain_overlays(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(COMPARE, files=upload(png_bytes), data={"methods": "gradcam,saliency", "seed": "1"})
    assert r.status_code == 200
    grid = np.asarray(decode_png(r.content), dtype=np.float64)
    assert grid.shape[1::-1] == grid_size(3)
    # the third panel (saliency) is the overlay the explain route draws, scaled to the tile
    from PIL import Image

    over = decode_png(
        client.post(
            "/v1/models/tiny/explain",
            files=upload(png_bytes),
            data={"method": "saliency", "format": "overlay"},
        ).content
    )
    tw, th = 320, 200  # 80×50 scaled to TILE on its long side
    cols = grid_columns(3)
    x0, y0 = 8 + (2 % cols) * (tw + 8), 8 + (2 // cols) * (th + 28 + 8) + 28
    panel = grid[y0 : y0 + th, x0 : x0 + tw]
    expected = np.asarray(over.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(panel - expected).mean() < 2.0


def test_json_is_the_explain_json_of_each_method(client: TestClient, png_bytes: bytes) -> None:
    data = {"methods": "gradcam, integrated_gradients", "steps": "4", "format": "json", "target": "3"}
    r = client.post(COMPARE, files=upload(png_bytes), data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["methods"] == ["gradcam", "integrated_gradients"]
    assert [res["method"] for res in body["results"]] == body["methods"]
    for res in body["results"]:
        [item] = res["explanations"]
        assert item["target"]["index"] == 3 and item["shape"] == [50, 80]
        single = client.post(
            "/v1/models/tiny/explain",
            files=upload(png_bytes),
            data={"method": res["method"], "steps": "4", "target": "3", "format": "npy"},
        )
        arr = np.load(io.BytesIO(single.content))[0]
        assert item["max"] == pytest.approx(float(arr.max()), rel=1e-4, abs=1e-7)


def test_compare_refuses_formats_it_cannot_give(client: TestClient, png_bytes: bytes) -> None:
    for fmt in ("overlay", "npy"):
        r = client.post(COMPARE, files=upload(png_bytes), data={"format": fmt, "methods": "gradcam"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "format"
    r = client.post(
        COMPARE, files=upload(png_bytes), data={"methods": "gradcam"}, headers={"accept": "application/x-npy"}
    )
    assert r.status_code == 406


def test_compare_cost_counts_every_method(client: TestClient, png_bytes: bytes) -> None:
    data = {"methods": "integrated_gradients,smooth_ig", "steps": "512", "samples": "8"}
    r = client.post(COMPARE, files=upload(png_bytes), data=data)
    assert r.status_code == 422 and "/v1/jobs" in r.json()["detail"]
