"""Helpers shared by the API tests: the tiny test models' config, images, readiness."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings

NUM_CLASSES = 10
LABELS = [f"class {chr(ord('a') + i)}" for i in range(NUM_CLASSES)]


def write_tiny_config(folder: Path) -> Path:
    """A models TOML with ``tiny`` and ``tiny_crop`` (random ResNet-18, 10 classes, 64×64)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    torch.save(net.state_dict(), folder / "resnet18-tiny.pt")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    common = """source = "torchvision"
architecture = "resnet18"
weights = "resnet18-tiny.pt"
num_classes = 10
labels = "labels.txt"
input_size = [3, 64, 64]
"""
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nname = "tiny"\n{common}\n[[models]]\nname = "tiny_crop"\n{common}resize = "center_crop"\n'
    )
    return path


def wait_ready(client: TestClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s: {client.get('/readyz').json()}")


def make_settings(config: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"models_config": config, "device": "cpu", "warmup": False}
    values.update(overrides)
    return Settings(**values)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def sample_image(width: int = 80, height: int = 50, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB picture (gradients plus a bright disc), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < (0.2 * min(width, height)) ** 2).astype(np.float32)
    r = 255 * xx / max(1, width - 1)
    g = 255 * yy / max(1, height - 1)
    b = 255 * disc
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def upload(data: bytes, name: str = "image.png", mime: str = "image/png") -> dict[str, Any]:
    return {"image": (name, data, mime)}


def decode_png(data: bytes) -> Image.Image:
    """A PNG response as RGB (heatmaps may come palette-encoded)."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image.convert("RGB")


def wait_for(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_job(
    client: TestClient,
    job_id: str,
    *states: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{job_id}`` until the job's status is one of ``states``; the job as
    last read. Fails, showing it, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not {'/'.join(states)} within {timeout_s:g} s: {job}")
        time.sleep(0.02)
