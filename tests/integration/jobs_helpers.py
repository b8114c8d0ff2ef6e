"""Helpers of the job integration tests: a Redis server, a tiny model config, real processes.

Redis: ``SALIENCY_TEST_REDIS_URL`` (``.ci/run`` starts one); without it, a ``redis-server`` on the
PATH is started for the session. ``SALIENCY_REQUIRE_REDIS=1`` makes a missing Redis a failure.
Every process started here is stopped by its own id; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

WAIT_S = 180.0


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


def drop_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{namespace}:*"):
            client.delete(key)
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------
# the model and the images
# ------------------------------------------------------------------------------------------------
def write_tiny_config(folder: Path) -> Path:
    """``tiny``: a random ResNet-18 (10 classes, 3×32×32) with its weights in a file, so every
    process (API, workers, this test) has the same model."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "tiny.pt")
    path = folder / "models.toml"
    path.write_text(
        '[[models]]\nname = "tiny"\nsource = "torchvision"\narchitecture = "resnet18"\n'
        'weights = "tiny.pt"\nnum_classes = 10\ninput_size = [3, 32, 32]\n'
    )
    return path


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
def service_env(**settings: Any) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SALIENCY_") or k.startswith("SALIENCY_TEST")
    }
    env.update({f"SALIENCY_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A ``python -m service …`` process with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "service", *args], env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self.popen.send_signal(sig)
        try:
            self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(30)
        self._out.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_api(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(["serve", "--port", str(port)], env, log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.alive, f"the API exited:\n{proc.tail()}"
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    until(ready, "the API to be ready", every=0.2)
    return proc, base


def start_worker(env: dict[str, str], log: Path, name: str) -> Proc:
    return Proc(["worker", f"--hostname={name}@%h"], env, log)
