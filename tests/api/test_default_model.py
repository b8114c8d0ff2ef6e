"""The builtin default model end to end over HTTP: efficientnet_lite0 with its shipped weights.

Reference figures (measured, see the registry's issue): skimage's ``chelsea`` → 285 "Egyptian cat"
(p≈0.79), ``coffee`` → 967 "espresso" (p≈0.90). The cup box below was read off the 600×400
coffee photo: the cup's rim spans x≈172–408 and its body reaches y≈290; the table shows in the
top-right and bottom-left corners, outside the saucer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import skimage.data
from api_helpers import encode, upload, wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings

pytestmark = pytest.mark.slow

MODEL = "/v1/models/efficientnet_lite0"
CUP = (slice(15, 290), slice(170, 410))  # rows (y), columns (x) of the coffee photo
TABLE = [(slice(0, 100), slice(480, 600)), (slice(300, 400), slice(0, 80))]


@pytest.fixture(scope="module")
def default_client() -> Iterator[TestClient]:
    app = create_app(Settings(models_config=None, device="cpu", warmup=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout_s=300)
        yield client


def photo(name: str) -> bytes:
    return encode(Image.fromarray(getattr(skimage.data, name)()), "PNG")


def test_model_info(default_client: TestClient) -> None:
    info = default_client.get(MODEL).json()
    assert info["source"] == "builtin" and info["num_classes"] == 1000
    assert info["input_size"] == [3, 224, 224] and info["target_layer"]


def test_chelsea_is_an_egyptian_cat(default_client: TestClient) -> None:
    r = default_client.post(f"{MODEL}/predict", files=upload(photo("chelsea")))
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]
    assert top["index"] == 285 and top["label"] == "Egyptian cat"
    assert top["probability"] == pytest.approx(0.79, abs=0.05)


def test_gradcam_on_coffee_peaks_on_the_cup_not_the_table(default_client: TestClient) -> None:
    r = default_client.post(f"{MODEL}/explain", files=upload(photo("coffee")), data={"format": "json"})
    assert r.status_code == 200, r.text
    [item] = r.json()["explanations"]
    assert item["target"]["index"] == 967 and item["target"]["label"] == "espresso"
    heat = np.asarray(item["heatmap"])
    assert heat.shape == (400, 600)
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert CUP[0].start <= y < CUP[0].stop and CUP[1].start <= x < CUP[1].stop, (x, y)
    for rows, cols in TABLE:
        assert heat[rows, cols].max() < 0.5 * heat.max()
    assert heat[CUP].mean() > 2 * np.mean([heat[r, c].mean() for r, c in TABLE])
