"""The builtin default model end to end over HTTP: efficientnet_lite0 with its shipped weights.

Reference figures (measured, see the registry's issue): skimage's ``chelsea`` → 285 "Egyptian cat"
(p≈0.79), ``coffee`` → 967 "espresso" (p≈0.90). The cup box below was read off the 600×400
coffee photo: the cup's rim spans x≈172–408 and its body reaches y≈290; the table shows in the
top-right and bottom-left corners, outside the saucer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import skimage.data
from api_helpers import decode_png, encode, upload, wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.explainers import get_method, method_names
from service.imaging.geometry import make_geometry
from service.imaging.grid import MIN_WIDTH, PAD, tile_size
from service.imaging.scale import shown
from service.imaging.styles import draw

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


# ------------------------------------------------------------------------------------------------
# every method's default overlay is visible (issue 11: as its paper shows it)
# ------------------------------------------------------------------------------------------------
# A pixel counts as changed when the overlay differs from the overlay of an all-zero map drawn the
# same way (same style, colours, opacity) by more than 32 levels in some channel: what the map
# itself adds. The old rendering (a min-max or max-|m| scale without clipping, the diverging map
# for signed methods, blended at 0.5) changes under 1 % of the coffee photo's pixels for
# Guided Grad-CAM, IG, Smooth IG and Guided Backprop; every default now changes at least 2 %.
VISIBLE_SHARE = 0.02
CHANGED = 32
CHEAP = {
    "steps": "8",
    "samples": "4",
    "masks": "16",
    "window": "56",
    "stride": "56",
    "seed": "0",
}  # rendering does not depend on them


def changed_pixels(overlay: np.ndarray, rendering: dict[str, Any], image: Image.Image) -> np.ndarray:
    """Where ``overlay`` differs from the same rendering of an all-zero map."""
    zeros = np.zeros((224, 224), dtype=np.float32)
    channels = np.zeros((3, 224, 224), dtype=np.float32) if rendering["colormap"] == "rgb" else None
    s = shown(
        zeros,
        polarity=rendering["polarity"],
        lower=rendering["clip_lower"],
        upper=rendering["clip_upper"],
        sigma=rendering["smooth"],
        channels=channels,
    )
    geometry = make_geometry(image.width, image.height, (3, 224, 224), "stretch")
    null = draw(
        image,
        s,
        style=rendering["style"],
        colormap=rendering["colormap"],
        alpha=rendering["alpha"],
        keep=0.2,
        geometry=geometry,
    )
    diff = np.abs(overlay.astype(np.int64) - np.asarray(null, dtype=np.int64)).max(axis=-1)
    changed: np.ndarray = diff > CHANGED
    return changed


@pytest.fixture(scope="module")
def renderings(default_client: TestClient) -> dict[str, dict[str, Any]]:
    return {m["name"]: m["rendering"] for m in default_client.get("/v1/methods").json()["methods"]}


@pytest.mark.parametrize("method", method_names())
def test_every_default_overlay_is_visible(
    default_client: TestClient, renderings: dict[str, dict[str, Any]], method: str
) -> None:
    if method not in default_client.get(MODEL).json()["methods"]:
        pytest.skip(f"{method} does not apply to the default model")
    image = Image.fromarray(skimage.data.coffee())
    r = default_client.post(
        f"{MODEL}/explain",
        files=upload(photo("coffee")),
        data={"method": method, "format": "overlay", **CHEAP},
    )
    assert r.status_code == 200, r.text
    overlay = np.asarray(decode_png(r.content))
    changed = changed_pixels(overlay, renderings[method], image)
    assert changed.mean() >= VISIBLE_SHARE, (method, changed.mean())
    if get_method(method).family == "cam":
        # the change sits on the cup: the centroid of the changed pixels
        ys, xs = np.nonzero(changed)
        y, x = ys.mean(), xs.mean()
        assert CUP[0].start <= y < CUP[0].stop and CUP[1].start <= x < CUP[1].stop, (method, x, y)


@pytest.mark.parametrize("method", ["guided_gradcam", "integrated_gradients", "smooth_ig", "guided_backprop"])
def test_the_old_rendering_fails_the_visibility_threshold(default_client: TestClient, method: str) -> None:
    """The threshold means something: these panels were invisible, and measure so."""
    old = {"style": "heatmap", "alpha": "0.5", "polarity": "both", "clip_lower": "0", "clip_upper": "100"}
    data = {"method": method, "format": "overlay", "colormap": "diverging", **old, **CHEAP}
    r = default_client.post(f"{MODEL}/explain", files=upload(photo("coffee")), data=data)
    assert r.status_code == 200, r.text
    rendering = {k: float(v) if k.startswith(("clip", "alpha")) else v for k, v in old.items()}
    rendering.update(colormap="diverging", smooth=0.0)
    changed = changed_pixels(
        np.asarray(decode_png(r.content)), rendering, Image.fromarray(skimage.data.coffee())
    )
    assert changed.mean() < VISIBLE_SHARE / 2, (method, changed.mean())


def test_compare_grid_of_two_targets(default_client: TestClient) -> None:
    data = {"methods": "gradcam,integrated_gradients", "top_k": "2", **CHEAP}
    r = default_client.post(f"{MODEL}/compare", files=upload(photo("coffee")), data=data)
    assert r.status_code == 200, r.text
    grid = decode_png(r.content)
    tw, _ = tile_size(600, 400)
    assert grid.width == max(MIN_WIDTH, PAD + 3 * (tw + PAD))
    json = default_client.post(
        f"{MODEL}/compare", files=upload(photo("coffee")), data={**data, "format": "json"}
    )
    [gradcam, ig] = json.json()["results"]
    assert [e["target"]["index"] for e in gradcam["explanations"]] == [967, 968]  # espresso, cup
    assert ig["parameters"]["style"] == "pixels" and gradcam["parameters"]["style"] == "heatmap"
