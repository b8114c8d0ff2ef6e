"""HTTP overhead and throughput of ``POST /v1/models/{model}/explain`` on the default model.

Run it as ``benchmarks/http.py`` (this is its implementation). It starts the real server
(``saliency serve``, uvicorn) on 127.0.0.1 at a free port and, in this process, loads the same
model to call the engine directly on the same image. Reported:

- latency (median, p95) of Grad-CAM over HTTP with ``format=png`` and ``format=json`` versus, in
  process: the engine alone (``engine.explain`` on the preprocessed tensor) and the route's
  pipeline without HTTP (decode → preprocess → explain → render, the same functions). In-process
  work runs on one worker thread, as the service runs model work; rounds are interleaved so slow
  phases of a shared machine hit every contender alike;
- throughput (requests/s) at concurrency 1 and 8.

Targets: HTTP end-to-end ≤ 1.3× in-process at concurrency 1; throughput at concurrency 8 ≥ at 1.

    .venv/bin/python benchmarks/http.py [--rounds 30] [--requests 48] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import skimage.data
import torch
from PIL import Image

from service.api.pipeline import Prepared
from service.api.responses import render_explanation
from service.config import Settings
from service.explainers import ExplainParams, Targets, explain
from service.imaging.decode import decode_image
from service.imaging.options import RenderParams
from service.models.registry import DEFAULT_MODEL, ModelRegistry

ROUTE = f"/v1/models/{DEFAULT_MODEL}/explain"
FORMATS = ("png", "json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(device: str, threads: int | None) -> Iterator[str]:
    """``saliency serve`` with the default model; yields its base URL once ``/readyz`` is 200."""
    port = free_port()
    env = {**os.environ, "SALIENCY_DEVICE": device, "SALIENCY_WARMUP": "true"}
    env.pop("SALIENCY_MODELS_CONFIG", None)
    if threads:
        env["SALIENCY_TORCH_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready in 600 s")
            time.sleep(0.25)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30, help="latency samples per contender")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "PNG")
    image_bytes = buf.getvalue()
    settings = Settings(device=args.device, models_config=None)
    model = ModelRegistry.from_settings(settings).get(DEFAULT_MODEL)
    params = ExplainParams(seed=0, batch_size=settings.default_batch_size)
    targets, render = Targets.top(1), RenderParams()

    def decode() -> Image.Image:
        return decode_image(
            image_bytes,
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_image_pixels,
            min_size=settings.min_image_size,
        )

    x, _ = model.preprocess(decode())

    def engine_only() -> None:
        explain(model.handle, x[None], "gradcam", params)

    def pipeline(fmt: str) -> Callable[[], None]:
        def call() -> None:
            image = decode()
            xi, geometry = model.preprocess(image)
            expl = explain(model.handle, xi[None], "gradcam", params)
            render_explanation(
                fmt, model, expl, [Prepared(image, xi, geometry)], targets, render, elapsed_ms=0.0
            )

        return call

    lane = ThreadPoolExecutor(max_workers=1)  # like the service's device worker thread

    def on_lane(fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: lane.submit(fn).result()

    files = {"image": ("chelsea.png", image_bytes, "image/png")}
    with server(args.device, args.threads) as base, httpx.Client(base_url=base, timeout=120) as client:

        def http(fmt: str) -> Callable[[], None]:
            def call() -> None:
                client.post(ROUTE, files=files, data={"method": "gradcam", "format": fmt}).raise_for_status()

            return call

        contenders: dict[str, Callable[[], None]] = {"engine in-process": on_lane(engine_only)}
        for fmt in FORMATS:
            contenders[f"in-process pipeline {fmt}"] = on_lane(pipeline(fmt))
            contenders[f"HTTP {fmt}"] = http(fmt)
        for fn in contenders.values():  # warm caches, connections, the prepared copies
            for _ in range(3):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                samples[name].append(timed(fn))

        def throughput(concurrency: int) -> float:
            def worker(n: int) -> None:
                with httpx.Client(base_url=base, timeout=120) as c:
                    for _ in range(n):
                        c.post(ROUTE, files=files, data={"method": "gradcam"}).raise_for_status()

            per = [max(1, args.requests // concurrency)] * concurrency
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(worker, per))
            return sum(per) / (time.perf_counter() - start)

        throughput(2)  # warm-up
        t1 = throughput(1)
        tn = throughput(args.concurrency)
    lane.shutdown()

    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, chelsea 451×300 PNG, {args.rounds} rounds"
    )
    print(f"{'contender':26s} {'median ms':>10s} {'p95 ms':>10s} {'× engine':>9s}")
    engine = summary(samples["engine in-process"])[0]
    for name, values in samples.items():
        med, p95 = summary(values)
        print(f"{name:26s} {med:10.1f} {p95:10.1f} {med / engine:9.2f}")
    median = {name: summary(values)[0] for name, values in samples.items()}
    ratios = {fmt: median[f"HTTP {fmt}"] / median[f"in-process pipeline {fmt}"] for fmt in FORMATS}
    print(
        "HTTP / in-process pipeline: "
        + ", ".join(f"{fmt} {r:.2f}×" for fmt, r in ratios.items())
        + "; HTTP / engine alone: "
        + ", ".join(f"{fmt} {median[f'HTTP {fmt}'] / engine:.2f}×" for fmt in FORMATS)
    )
    print(
        f"throughput: concurrency 1 {t1:.2f} req/s, concurrency {args.concurrency} {tn:.2f} req/s ({tn / t1:.2f}×)"
    )
    print(
        f"targets: HTTP ≤ 1.30× in-process: {'met' if max(ratios.values()) <= 1.3 else 'NOT met'}; "
        f"throughput at {args.concurrency} ≥ at 1: {'met' if tn >= t1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
