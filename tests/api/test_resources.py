"""``/v1/models`` and ``/v1/methods``: what is loaded and what can explain it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import resnet18_info

from service.explainers import all_methods


def test_models_list_model_info(app: FastAPI, client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = r.json()["models"]
    assert [m["name"] for m in models] == ["tiny", "tiny_crop"]
    tiny = models[0]
    assert tiny == resnet18_info(
        "tiny", methods=app.state.services.registry.get("tiny").methods(), ready=True
    )
    # a plain CNN supports them all but the transformer-native ones
    assert set(tiny["methods"]) == {m.name for m in all_methods() if m.family != "attention"}
    assert client.get("/v1/models/tiny_crop").json() == models[1]


def test_methods_come_from_the_engine_registry(client: TestClient) -> None:
    r = client.get("/v1/methods")
    assert r.status_code == 200
    listed = r.json()["methods"]
    registry = all_methods()
    assert [m["name"] for m in listed] == [m.name for m in registry]
    for item, method in zip(listed, registry, strict=True):
        assert item["family"] == method.family in {"cam", "gradient", "path", "perturbation", "attention"}
        assert item["description"] == method.description
        assert item["paper"] == method.paper and item["paper"].startswith("https://")
        assert item["parameters"] == method.parameters_schema()
        assert item["parameters"]["type"] == "object"
    by_name = {m["name"]: m for m in listed}
    ig = by_name["integrated_gradients"]["parameters"]["properties"]
    assert ig["steps"]["maximum"] == 512 and ig["steps"]["default"] == 32
    assert "layer" in by_name["gradcam"]["parameters"]["properties"]
    # each method's rendering defaults: every per-method rendering parameter, resolved
    for item in listed:
        rendering = item["rendering"]
        assert set(rendering) == {
            "colormap",
            "alpha",
            "polarity",
            "clip_lower",
            "clip_upper",
            "style",
            "smooth",
        }
        assert all(v is not None for v in rendering.values())
    assert by_name["gradcam"]["rendering"] == {
        "colormap": "jet", "alpha": 0.5, "polarity": "positive", "clip_lower": 0.0, "clip_upper": 100.0,
        "style": "heatmap", "smooth": 0.0,
    }  # fmt: skip
    assert by_name["guided_backprop"]["rendering"]["colormap"] == "rgb"
    assert by_name["input_x_gradient"]["rendering"]["colormap"] == "diverging"
    assert by_name["integrated_gradients"]["rendering"]["polarity"] == "positive"
    assert by_name["integrated_gradients"]["rendering"]["clip_upper"] < 100
