"""Helpers shared by the test folders: tiny random models, a module that records its batch sizes,
a Redis server, bounded polling and free ports.

Redis: ``SALIENCY_TEST_REDIS_URL`` (``.ci/run`` starts one); without it, a ``redis-server`` on the
PATH is started on a free port. ``SALIENCY_REQUIRE_REDIS=1`` makes a missing Redis a failure,
never a skip. Every process started here is stopped by its own id; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from service.explainers import ModelHandle
from service.explainers.base import RunContext

WAIT_S = 180.0


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def random_resnet18() -> nn.Module:
    """A random-init torchvision ResNet-18 (10 classes, seed 0) in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def random_mnasnet() -> nn.Module:
    """A random-init torchvision MNASNet 0.5 (10 classes, seed 1) in eval mode."""
    torch.manual_seed(1)
    return torchvision.models.mnasnet0_5(num_classes=10).eval()


def small_cnn(classes: int = 5) -> nn.Module:
    """Two ReLU convolutions, pooling to 2×2 and a linear head (seed 0), in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    ).eval()  # fmt: skip


@contextlib.contextmanager
def every_ig_step_in_full() -> Iterator[None]:
    """Integrated Gradients with the affine entry off (``RunContext.entry``): every step through
    the whole model, the arithmetic of a reference implementation."""
    with mock.patch.object(RunContext, "entry", lambda _ctx: None):
        yield


def with_reference(model: nn.Module, name: str) -> tuple[ModelHandle, nn.Module]:
    """A handle of ``model`` (prepared copies cached across tests) and an untouched reference copy."""
    return ModelHandle(module=model, name=name), copy.deepcopy(model)


def resnet18_info(name: str, *, methods: list[str], ready: bool) -> dict[str, Any]:
    """The model info (``GET /v1/models``) of a 10-class torchvision ResNet-18 at 3×64×64 on the CPU."""
    return {
        "name": name,
        "source": "torchvision",
        "architecture": "resnet18",
        "num_classes": 10,
        "input_size": [3, 64, 64],
        "device": "cpu",
        "target_layer": "layer4",
        "methods": methods,
        "ready": ready,
        "error": None,
    }


SEEN: list[int] = []  # module-level so that the engine's private deep copy records here too


class Recorder(nn.Module):
    """A tiny CNN (3 → 4 channels, 5 classes) that appends the batch size of each forward to ``SEEN``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        SEEN.append(x.shape[0])
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


# ------------------------------------------------------------------------------------------------
# ports and polling
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------
def _missing(why: str) -> None:
    if os.environ.get("SALIENCY_REQUIRE_REDIS") == "1":
        pytest.fail(f"SALIENCY_REQUIRE_REDIS=1 but {why}")
    pytest.skip(why)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """The URL of a live Redis server (the CI's, or one started here)."""
    import redis

    url = os.environ.get("SALIENCY_TEST_REDIS_URL")
    proc = None
    folder = None
    if not url:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("no Redis: set SALIENCY_TEST_REDIS_URL or install redis-server")
        port = free_port()
        folder = tempfile.mkdtemp()
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        until(lambda: _pings(client), f"Redis at {url}", timeout=20)
    except AssertionError:
        _missing(f"Redis at {url} does not answer")
    finally:
        client.close()
    try:
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def small_torchvision_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's ``VisionTransformer`` at 64×64: 16-pixel patches (a 4×4 grid and a class
    token), 2 blocks of 2 heads, width 32; its head re-drawn at random (torchvision starts it at
    zero, which would pass no gradient back)."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=num_classes,
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model
