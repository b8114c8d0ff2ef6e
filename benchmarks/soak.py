"""Load and faults: valid and hostile traffic against a real server, on 127.0.0.1 only.

    python benchmarks/soak.py                  # 120 s, concurrency 16, a small ResNet-18
    python benchmarks/soak.py --duration 30    # the CI version (``make soak-short``)
    python benchmarks/soak.py --model default  # the default EfficientNet-Lite0

Starts ``saliency serve`` (API keys on, the local job pool) on a free port, then for
``--duration`` seconds runs ``--concurrency`` clients, each picking the next request at random
from a fixed mix: every method family synchronously (CAM, gradient, path, noise, perturbation:
Score-CAM), compare, predict, jobs (submit, poll, fetch the result), and the hostile cases of the
bad-input tests (no key, a wrong key, a decompression bomb, corrupt and RLE-compressed files,
nested JSON, a response over the budget, a 1 000 000 × 8 upload, a layer no method can use, an
unknown verb, a bogus job-result parameter, another key's job, work over the synchronous budget).

Prints requests served and p50/p95 latency per family; the 5xx answers (503 and 504 carrying
``Retry-After`` are the only acceptable ones: overload, not failure), any other status a case
did not expect, the server's peak resident memory in each third of the run (flat after warm-up
is the goal), and jobs lost: submitted jobs that did not reach a final state, or whose result
could not be fetched. Exit status 1 when a bad 5xx, an unexpected status or a lost job occurred.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

KEY = "soak-key-alpha-0123456789abcdef"
OTHER_KEY = "soak-key-bravo-0123456789abcdef"
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tiny_config(folder: Path) -> Path:
    """A randomly initialised ResNet-18 with 10 classes at 3×64×64, as a TOML model config."""
    import torch
    import torchvision

    torch.manual_seed(0)
    weights = folder / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    config = folder / "models.toml"
    config.write_text(
        f'[[models]]\nname = "m"\nsource = "torchvision"\narchitecture = "resnet18"\n'
        f'weights = "{weights}"\nnum_classes = 10\ninput_size = [3, 64, 64]\n'
    )
    return config


@contextlib.contextmanager
def server(model: str, folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "SALIENCY_API_KEYS": f"{KEY},{OTHER_KEY}",
        "SALIENCY_MAX_SYNC_PER_KEY": "12",
        "SALIENCY_MAX_JOBS_PER_KEY": "8",
        "SALIENCY_JOBS_BACKEND": "local",
        "SALIENCY_REQUEST_TIMEOUT_S": "30",
        "SALIENCY_MAX_RESPONSE_BYTES": str(64 * 1024 * 1024),
        "SALIENCY_LOG_LEVEL": "warning",
    }
    if model != "default":
        env["SALIENCY_MODELS_CONFIG"] = str(tiny_config(folder))
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", HOST, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: see {folder / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not become ready")
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------------
# payloads
# ------------------------------------------------------------------------------------------------
def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def one_bit_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    image = Image.new("1", (width, height))
    image.paste(1, (0, 0, width, height // 2))
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def png_bomb() -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def rle_bmp() -> bytes:
    rle = b"\x00\x00" * 3999 + b"\x00\x01"
    palette = b"\x00" * 1024
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, 4000, 4000, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle


# ------------------------------------------------------------------------------------------------
# the mix
# ------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    bad_5xx: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    jobs_submitted: int = 0
    jobs_done: int = 0
    jobs_lost: list[str] = field(default_factory=list)


Case = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def build_mix(model: str) -> list[tuple[str, str, float, Case, frozenset[int]]]:
    """(family, case, weight, request, statuses it may answer)."""
    small = png(96, 72, 1)
    ex = f"/v1/models/{model}/explain"
    ok = frozenset({200, 429, 503, 504})  # 429: this key's slots are all busy; 503/504: overload

    def explain(data: dict[str, str], image: bytes = small, key: str = KEY) -> Case:
        async def call(c: httpx.AsyncClient) -> httpx.Response:
            return await c.post(
                ex, files={"image": ("a.png", image, "image/png")}, data=data, headers=auth(key)
            )

        return call

    def raw(path: str, content: bytes, ctype: str, method: str = "POST") -> Case:
        async def call(c: httpx.AsyncClient) -> httpx.Response:
            return await c.request(method, path, content=content, headers={**auth(), "content-type": ctype})

        return call

    def get(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Case:
        async def call(c: httpx.AsyncClient) -> httpx.Response:
            return await c.request(method, path, headers=auth() if headers is None else headers)

        return call

    deep = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    wide = one_bit_png(1_000_000, 8)
    square = one_bit_png(2000, 2000)
    mix: list[tuple[str, str, float, Case, frozenset[int]]] = [
        ("cam", "gradcam", 3, explain({"method": "gradcam"}), ok),
        ("cam", "gradcam++ json", 1, explain({"method": "gradcam_pp", "format": "json"}), ok),
        ("perturbation", "scorecam layer2", 1, explain({"method": "scorecam", "layer": "layer2"}), ok),
        ("gradient", "saliency", 2, explain({"method": "saliency", "format": "overlay"}), ok),
        ("gradient", "guided backprop", 1, explain({"method": "guided_backprop"}), ok),
        ("path", "integrated gradients", 2, explain({"method": "integrated_gradients", "steps": "16"}), ok),
        ("noise", "smoothgrad", 1, explain({"method": "smoothgrad", "samples": "8", "format": "npy"}), ok),
        ("compare", "compare", 1, _compare(model, small), ok),
        ("predict", "predict", 1, _predict(model, small), ok),
        ("hostile", "no key", 1, get("/v1/models", headers={}), frozenset({401})),
        (
            "hostile",
            "wrong key",
            1,
            get("/v1/models", headers=auth("not-a-key-0123456789abcdef")),
            frozenset({401}),
        ),
        ("hostile", "png bomb", 1, explain({}, png_bomb()), frozenset({413})),
        ("hostile", "corrupt", 1, explain({}, small[:200]), frozenset({422})),
        ("hostile", "rle bmp", 1, explain({}, rle_bmp()), frozenset({415})),
        ("hostile", "nested json", 1, raw(ex, deep, "application/json"), frozenset({422})),
        (
            "hostile",
            "response too large",
            1,
            explain(
                {"method": "input_x_gradient", "top_k": "10", "reduction": "none", "format": "json"}, square
            ),
            frozenset({422}),
        ),
        ("hostile", "1000000x8 upload", 1, explain({"method": "gradcam"}, wide), ok),
        ("hostile", "unusable layer", 1, explain({"method": "gradcam", "layer": "fc"}), frozenset({422})),
        (
            "hostile",
            "too heavy",
            1,
            explain({"method": "integrated_gradients", "steps": "5000"}),
            frozenset({422}),
        ),
        ("hostile", "target out of range", 1, explain({"target": "99999"}), frozenset({422})),
        ("hostile", "unknown verb", 1, get("/healthz", method="ZZ123"), frozenset({405})),
        (
            "hostile",
            "bogus result query",
            1,
            get(f"/v1/jobs/{'0' * 32}/result?colormap=bogus"),
            frozenset({404, 422}),
        ),
    ]
    return mix


def _compare(model: str, image: bytes) -> Case:
    async def call(c: httpx.AsyncClient) -> httpx.Response:
        files = {"image": ("a.png", image, "image/png")}
        return await c.post(f"/v1/models/{model}/compare", files=files, headers=auth())

    return call


def _predict(model: str, image: bytes) -> Case:
    async def call(c: httpx.AsyncClient) -> httpx.Response:
        files = {"image": ("a.png", image, "image/png")}
        return await c.post(f"/v1/models/{model}/predict", files=files, headers=auth())

    return call


async def run_job(c: httpx.AsyncClient, model: str, tally: Tally, stop_at: float) -> str:
    """Submit a job (two images, Integrated Gradients), poll it, fetch its result; another key's
    read of it must be a 404. Returns the family's outcome for the latency table."""
    images = [("images", (f"{i}.png", png(64, 48, 10 + i), "image/png")) for i in range(2)]
    data = {"model": model, "method": "integrated_gradients", "steps": "24"}
    r = await c.post("/v1/jobs", files=images, data=data, headers=auth())
    if r.status_code in (429, 503):
        return "refused"
    if r.status_code != 202:
        tally.unexpected.append(f"job submit {r.status_code}: {r.text[:200]}")
        return "error"
    job = r.json()["id"]
    tally.jobs_submitted += 1
    if (await c.get(f"/v1/jobs/{job}", headers=auth(OTHER_KEY))).status_code != 404:
        tally.unexpected.append(f"job {job} visible to another key")
    deadline = max(stop_at, time.monotonic()) + 120
    while time.monotonic() < deadline:
        s = await c.get(f"/v1/jobs/{job}", headers=auth())
        state = s.json().get("status") if s.status_code == 200 else None
        if state == "succeeded":
            result = await c.get(f"/v1/jobs/{job}/result", headers=auth())
            if result.status_code == 200 and len(result.json()["explanations"]) == 2:
                tally.jobs_done += 1
                return "ok"
            break
        if state in ("failed", "cancelled") or s.status_code not in (200,):
            break
        await asyncio.sleep(0.25)
    tally.jobs_lost.append(job)
    return "lost"


async def soak(base: str, model: str, duration: float, concurrency: int, seed: int) -> Tally:
    mix = build_mix(model)
    weights = [m[2] for m in mix]
    tally = Tally()
    stop_at = time.monotonic() + duration
    rng = random.Random(seed)
    # idle connections are dropped by the client well before uvicorn's 5 s keep-alive timeout,
    # so a request never goes out on a connection the server is closing at that moment
    limits = httpx.Limits(max_connections=concurrency * 2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=180, limits=limits) as c:

        async def client() -> None:
            while time.monotonic() < stop_at:
                if rng.random() < 0.06:
                    started = time.perf_counter()
                    outcome = await run_job(c, model, tally, stop_at)
                    tally.latencies["jobs"].append(time.perf_counter() - started)
                    tally.statuses["jobs"][{"ok": 200, "refused": 429}.get(outcome, 0)] += 1
                    continue
                family, case, _, call, expected = rng.choices(mix, weights=weights)[0]
                started = time.perf_counter()
                try:
                    r = await call(c)
                except httpx.TransportError as exc:  # no answer at all: a failure, named in the report
                    tally.unexpected.append(f"{case}: no response ({type(exc).__name__})")
                    continue
                elapsed = time.perf_counter() - started
                tally.statuses[family][r.status_code] += 1
                if r.status_code == 200 or family == "hostile":
                    tally.latencies[family].append(elapsed)
                if r.status_code >= 500 and not (r.status_code in (503, 504) and "retry-after" in r.headers):
                    tally.bad_5xx.append(f"{case}: {r.status_code} {r.text[:200]}")
                elif r.status_code not in expected and not refused_for_load(r):
                    tally.unexpected.append(f"{case}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return tally


def refused_for_load(r: httpx.Response) -> bool:
    """A 429 (the key's slots are all busy) or 503 with ``Retry-After``: a fair answer to any
    request under load, hostile or not (the slot is taken before the request is read)."""
    return r.status_code in (429, 503) and "retry-after" in r.headers


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def report(tally: Tally, rss: list[tuple[float, int]], duration: float) -> bool:
    served = sum(sum(s.values()) for s in tally.statuses.values())
    print(f"\nrequests: {served} in {duration:.0f} s ({served / duration:.1f}/s)")
    print(f"{'family':<14}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}  statuses")
    for family in sorted(tally.statuses):
        lat = tally.latencies.get(family, [])
        codes = ", ".join(f"{k}×{v}" for k, v in sorted(tally.statuses[family].items()))
        n = sum(tally.statuses[family].values())
        print(
            f"{family:<14}{n:>9}{percentile(lat, 50) * 1000:>9.0f}{percentile(lat, 95) * 1000:>9.0f}  {codes}"
        )
    thirds = [[b for t, b in rss if lo <= t / duration < lo + 1 / 3] for lo in (0, 1 / 3, 2 / 3)]
    peaks = [max(t) / 2**20 if t else float("nan") for t in thirds]
    print(f"peak RSS (MiB) start / middle / end: {peaks[0]:.0f} / {peaks[1]:.0f} / {peaks[2]:.0f}")
    print(f"5xx other than 503/504 with Retry-After: {len(tally.bad_5xx)}")
    print(f"unexpected statuses: {len(tally.unexpected)}")
    print(f"jobs: {tally.jobs_submitted} submitted, {tally.jobs_done} fetched, lost {len(tally.jobs_lost)}")
    for line in (tally.bad_5xx + tally.unexpected)[:10]:
        print("  ", line)
    return not tally.bad_5xx and not tally.unexpected and not tally.jobs_lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default 120)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 3600 or not 1 <= args.concurrency <= 64:
        parser.error("duration must be in [1, 3600] s and concurrency in [1, 64]")
    name = "m" if args.model == "tiny" else "efficientnet_lite0"
    with tempfile.TemporaryDirectory() as tmp, server(args.model, Path(tmp)) as (base, proc):
        rss: list[tuple[float, int]] = []
        started = time.monotonic()

        async def sample() -> None:
            while True:
                rss.append((time.monotonic() - started, rss_bytes(proc.pid)))
                await asyncio.sleep(0.5)

        async def both() -> Tally:
            sampler = asyncio.create_task(sample())
            try:
                return await soak(base, name, args.duration, args.concurrency, args.seed)
            finally:
                sampler.cancel()

        tally = asyncio.run(both())
        healthy = httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        elapsed = max(args.duration, time.monotonic() - started)
        good = report(tally, [(t, b) for t, b in rss if t <= elapsed], elapsed)
        print(f"server healthy after: {healthy}")
        return 0 if good and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
