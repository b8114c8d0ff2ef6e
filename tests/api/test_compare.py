"""``POST /v1/models/{model}/compare``: one labelled grid (a row per target, a column per method,
a legend, a caption), or the explain JSON of every method."""

from __future__ import annotations

import io

import numpy as np
import pytest
from api_helpers import decode_png, upload
from fastapi.testclient import TestClient
from PIL import Image

from service.api.options import DEFAULT_COMPARE
from service.explainers import get_method
from service.imaging.grid import LABEL_PX, MIN_WIDTH, PAD, tile_size
from service.imaging.options import RenderParams

COMPARE = "/v1/models/tiny/compare"
TW, TH = tile_size(80, 50)  # the sample upload is 80×50: panels keep its aspect ratio
TITLE_H = LABEL_PX + 10


def grid_width(columns: int) -> int:
    return max(MIN_WIDTH, PAD + columns * (TW + PAD))


def panel_box(row: int, column: int) -> tuple[int, int]:
    """Top-left corner of a panel: column titles, then per row a label band and the panels."""
    return PAD + column * (TW + PAD), PAD + TITLE_H + row * (TITLE_H + TH + PAD) + TITLE_H


def ink_rows(strip: np.ndarray) -> np.ndarray:
    return np.nonzero((strip.sum(axis=-1) < 200).any(axis=1))[0]


def test_default_set_is_one_labelled_grid(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(COMPARE, files=upload(png_bytes), data={"steps": "4"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    grid = decode_png(r.content)
    assert grid.width == grid_width(1 + len(DEFAULT_COMPARE))
    assert r.headers["X-Target-Index"].isdigit()
    # the first panel is the upload itself, at its aspect ratio
    x, y = panel_box(0, 0)
    panel = np.asarray(grid, dtype=np.float64)[y : y + TH, x : x + TW]
    upload_tile = decode_png(png_bytes).resize((TW, TH), Image.Resampling.BILINEAR)
    assert np.abs(panel - np.asarray(upload_tile, dtype=np.float64)).mean() < 2.0


def test_grid_panels_are_the_explain_overlays(client: TestClient, png_bytes: bytes) -> None:
    r = client.post(COMPARE, files=upload(png_bytes), data={"methods": "gradcam,saliency", "seed": "1"})
    assert r.status_code == 200
    grid = np.asarray(decode_png(r.content), dtype=np.float64)
    assert grid.shape[1] == grid_width(3)
    # gradcam's panel is the overlay the explain route draws, at the panel's size
    over = decode_png(
        client.post(
            "/v1/models/tiny/explain",
            files=upload(png_bytes),
            data={"method": "gradcam", "format": "overlay"},
        ).content
    )
    x, y = panel_box(0, 1)
    panel = grid[y : y + TH, x : x + TW]
    expected = np.asarray(over.resize((TW, TH), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(panel - expected).mean() < 3.0


def test_top_k_gives_one_labelled_row_per_target(client: TestClient, png_bytes: bytes) -> None:
    data = {"methods": "gradcam,layercam", "top_k": "2"}
    two = decode_png(client.post(COMPARE, files=upload(png_bytes), data=data).content)
    one = decode_png(client.post(COMPARE, files=upload(png_bytes), data={**data, "top_k": "1"}).content)
    assert two.width == one.width == grid_width(3)
    assert two.height - one.height == TITLE_H + TH + PAD  # exactly one more row
    grid = np.asarray(two, dtype=np.int64)
    predictions = client.post("/v1/models/tiny/predict", files=upload(png_bytes), data={"top_k": "2"}).json()
    for row in range(2):
        _, y = panel_box(row, 0)
        band = grid[y - TITLE_H : y, PAD : grid.shape[1] - PAD]
        rows = ink_rows(band)
        assert rows.size and rows.max() - rows.min() >= 9  # a label in each band, ~10 px glyphs
        assert (band.sum(axis=-1) < 200).sum() > 200  # class name and probability: a line of text
    # row k shows target k: the first row's panel is the explain overlay of the top class, the
    # second row's that of the runner-up
    for row, pred in enumerate(predictions["predictions"]):
        over = decode_png(
            client.post(
                "/v1/models/tiny/explain",
                files=upload(png_bytes),
                data={"method": "gradcam", "format": "overlay", "target": str(pred["index"])},
            ).content
        )
        x, y = panel_box(row, 1)
        expected = np.asarray(over.resize((TW, TH), Image.Resampling.BILINEAR), dtype=np.float64)
        assert np.abs(grid[y : y + TH, x : x + TW] - expected).mean() < 3.0


def test_legend_and_caption_under_the_grid(client: TestClient, png_bytes: bytes) -> None:
    """One colour bar per scale: gradcam and layercam share jet; saliency adds inferno."""
    shared = decode_png(
        client.post(COMPARE, files=upload(png_bytes), data={"methods": "gradcam,layercam"}).content
    )
    mixed = decode_png(
        client.post(COMPARE, files=upload(png_bytes), data={"methods": "gradcam,saliency"}).content
    )
    assert mixed.height > shared.height  # a second legend entry
    grid = np.asarray(shared, dtype=np.int64)
    _, y = panel_box(0, 0)
    bar_y = y + TH + PAD
    bar = grid[bar_y + 4, PAD + 2 : PAD + 178]
    jet_left, jet_right = bar[0], bar[-1]
    assert jet_left[2] > 100 and jet_left[0] < 50  # jet: blue at the low end
    assert jet_right[0] > 100 and jet_right[2] < 50  # red at the high end
    below = grid[bar_y + 20 :]
    assert len(ink_rows(below)) > 30  # the end labels, the meaning line and the caption


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
        # each method's echo carries its own rendering defaults
        resolved = RenderParams().resolve(get_method(res["method"]).rendering).defaults()
        assert {k: res["parameters"][k] for k in resolved} == resolved


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
