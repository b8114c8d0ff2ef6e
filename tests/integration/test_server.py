"""The real server: ``saliency serve`` (uvicorn) on 127.0.0.1 at a free port, called with httpx.

The model is a random torchvision ResNet-18 (10 classes, 64×64) from a TOML config passed the way
users pass it, through ``SALIENCY_MODELS_CONFIG``.
"""

from __future__ import annotations

import base64
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torchvision
from jobs_helpers import start_api
from PIL import Image


def write_config(folder: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "w.pt")
    (folder / "labels.txt").write_text("\n".join(f"label {i}" for i in range(10)) + "\n")
    path = folder / "models.toml"
    path.write_text(
        '[[models]]\nname = "tiny"\nsource = "torchvision"\narchitecture = "resnet18"\n'
        'weights = "w.pt"\nnum_classes = 10\nlabels = "labels.txt"\ninput_size = [3, 64, 64]\n'
    )
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("server")
    env = {
        **os.environ,
        "SALIENCY_MODELS_CONFIG": str(write_config(folder)),
        "SALIENCY_DEVICE": "cpu",
        "SALIENCY_TORCH_THREADS": "1",
        "SALIENCY_JOBS_BACKEND": "local",
    }
    proc, base = start_api(env, folder / "server.log")  # waits until /readyz answers 200
    try:
        yield base
    finally:
        proc.kill(signal.SIGTERM)


def png(width: int = 90, height: int = 60) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_real_server_explains_over_http(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        assert client.get("/healthz").status_code == 200
        models = client.get("/v1/models").json()["models"]
        assert [m["name"] for m in models] == ["tiny"] and models[0]["ready"]

        image = png()
        pred = client.post("/v1/models/tiny/predict", files={"image": ("a.png", image, "image/png")})
        assert pred.status_code == 200
        top = pred.json()["predictions"][0]

        r = client.post("/v1/models/tiny/explain", files={"image": ("a.png", image, "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (90, 60)
        assert int(r.headers["X-Target-Index"]) == top["index"]

        j = client.post(
            "/v1/models/tiny/explain",
            json={"image": base64.b64encode(image).decode(), "method": "saliency", "format": "json"},
            headers={"X-Request-ID": "integration-1"},
        )
        assert j.status_code == 200 and j.headers["X-Request-ID"] == "integration-1"
        assert j.json()["explanations"][0]["shape"] == [60, 90]

        bad = client.post("/v1/models/tiny/explain", files={"image": ("a.png", b"not an image", "image/png")})
        assert bad.status_code == 415 and bad.headers["content-type"] == "application/problem+json"

        docs = client.get("/docs")
        assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
        assert "saliency_http_request_duration_seconds" in client.get("/metrics").text
