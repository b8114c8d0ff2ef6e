"""``GET /v1/models/{model}/layers``, layers outside it refused, and a model that fails to load
listed as unavailable while the others serve."""

from __future__ import annotations

from pathlib import Path

from api_helpers import encode, make_settings, sample_image, upload, wait_for, write_tiny_config
from fastapi.testclient import TestClient

from service.app import create_app

EXPLAIN = "/v1/models/tiny/explain"


def test_layers_lists_the_usable_layers_with_their_layouts(client: TestClient) -> None:
    r = client.get("/v1/models/tiny/layers")
    assert r.status_code == 200
    layers = r.json()["layers"]
    names = [layer["name"] for layer in layers]
    assert names.index("layer3") < names.index("layer4")  # execution order
    assert [layer["name"] for layer in layers if layer["default"]] == ["layer4"]
    layer4 = next(layer for layer in layers if layer["name"] == "layer4")
    assert layer4 == {
        "name": "layer4",
        "type": "Sequential",
        "layout": "nchw",
        "shape": [512, 2, 2],
        "prefix_tokens": 0,
        "default": True,
    }
    # the head is no CAM layer: adaptive pooling and the classifier are not listed
    assert "avgpool" not in names and "fc" not in names
    assert client.get("/v1/models/nope/layers").status_code == 404


def test_a_layer_outside_the_list_is_a_422_naming_the_usable_ones(
    client: TestClient, png_bytes: bytes
) -> None:
    for layer in ("fc", "avgpool", "no.such.layer"):
        r = client.post(EXPLAIN, files=upload(png_bytes), data={"method": "gradcam", "layer": layer})
        assert r.status_code == 422, r.text
        body = r.json()
        assert r.headers["content-type"].startswith("application/problem+json")
        assert body["errors"][0]["field"] == "layer" and "layer4" in body["detail"]
    r = client.post(EXPLAIN, files=upload(png_bytes), data={"method": "gradcam", "layer": "layer3"})
    assert r.status_code == 200


def test_a_model_that_fails_to_load_does_not_take_the_others_down(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path)
    # a ViT configured for an input size it does not take: its probe fails at load
    config.write_text(
        config.read_text()
        + '\n[[models]]\nname = "broken_vit"\nsource = "timm"\narchitecture = "vit_tiny_patch16_224"\n'
        "num_classes = 10\ninput_size = [3, 32, 32]\n"
    )
    app = create_app(make_settings(config))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").json().get("state") == "failed", "the load to finish")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "broken_vit" in ready.json()["detail"]
        assert ready.json()["models"] == {"tiny": True, "tiny_crop": True, "broken_vit": False}
        models = client.get("/v1/models")
        assert models.status_code == 200
        listed = {m["name"]: m for m in models.json()["models"]}
        assert listed["tiny"]["ready"] and listed["tiny"]["error"] is None
        broken = listed["broken_vit"]
        assert broken["ready"] is False and broken["methods"] == []
        assert broken["error"]["status"] == 503 and "32" in broken["error"]["detail"]
        assert client.get("/v1/models/broken_vit").json() == broken
        # the good models serve; the broken one answers 503 problem+json naming the cause
        png = encode(sample_image())
        assert client.post(EXPLAIN, files=upload(png)).status_code == 200
        r = client.post("/v1/models/broken_vit/explain", files=upload(png))
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
        assert "broken_vit" in r.json()["detail"]
        assert client.get("/v1/models/broken_vit/layers").status_code == 503
