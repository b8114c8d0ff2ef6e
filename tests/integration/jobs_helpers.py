"""Helpers of the job integration tests: a tiny model config, real processes, Redis clean-up.

The Redis server itself, ``until`` and ``free_port`` are in ``tests/helpers.py``. Every process
started here is stopped by its own id; every wait is bounded.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import torchvision
from helpers import WAIT_S, free_port, until
from PIL import Image


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------
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
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port)], env, log)
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


class RedisServer:
    """A ``redis-server`` of a test's own on a fixed port, with the append-only file on, so it can be
    stopped and started again with its data (a restart, as a deploy or a crash-loop does)."""

    def __init__(self, folder: Path) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            import pytest

            pytest.skip("no redis-server on the PATH")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        flags = f"--bind 127.0.0.1 --port {self.port} --appendonly yes --appendfsync always"
        with (self.folder / "redis.log").open("ab") as log:
            self.popen = subprocess.Popen(
                [self.binary, *flags.split(), "--save", "", "--dir", str(self.folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        until(self._pings, f"Redis on port {self.port}", timeout=20)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(30)
        self.popen = None

    def _pings(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()


# ------------------------------------------------------------------------------------------------
# a job through an API client (TestClient or httpx.Client)
# ------------------------------------------------------------------------------------------------
def submit(client: Any, images: list[bytes], **params: str) -> dict[str, Any]:
    r = client.post("/v1/jobs", files=files(images), data={"model": "tiny", **params})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def status(client: Any, job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def wait_status(client: Any, job_id: str, *states: str, timeout: float = WAIT_S) -> dict[str, Any]:
    job: dict[str, Any] = until(
        lambda: (j := status(client, job_id))["status"] in states and j,
        f"job {job_id} to be {states}",
        timeout,
    )
    return job


def submit_id(client: Any, images: list[bytes], **params: str) -> str:
    """``submit``, the new job's id."""
    job_id: str = submit(client, images, **params)["id"]
    return job_id
