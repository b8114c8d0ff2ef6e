"""HTTP overhead and throughput of ``POST /v1/models/{model}/explain`` on the default model.

Starts the real server (``saliency serve``, uvicorn) on 127.0.0.1 at a free port, and in this
process loads the same model to call the engine directly on the same image. Reports:

- latency (median, p95) of Grad-CAM over HTTP with ``format=png`` and ``format=json`` versus
  ``engine.explain`` in-process (and in-process decode → explain → PNG, to show where time goes);
  rounds are interleaved so slow phases of a shared machine hit every contender alike;
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
from PIL import Image

from service.config import Settings
from service.explainers import ExplainParams, explain
from service.imaging.decode import decode_image
from service.imaging.render import heatmap_png
from service.models.registry import DEFAULT_MODEL, ModelRegistry

ROUTE = f"/v1/models/{DEFAULT_MODEL}/explain"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(device: str, threads: int | None) -> Iterator[str]:
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

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "PNG")
    image_bytes = buf.getvalue()

    settings = Settings(device=args.device, models_config=None)
    model = ModelRegistry.from_settings(settings).get(DEFAULT_MODEL)
    image = decode_image(
        image_bytes, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels, min_size=8
    )
    x, _ = model.preprocess(image)
    params = ExplainParams(seed=0, batch_size=settings.default_batch_size)

    def engine_only() -> None:
        explain(model.handle, x[None], "gradcam", params)

    def in_process_png() -> None:
        img = decode_image(
            image_bytes, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels, min_size=8
        )
        xi, _ = model.preprocess(img)
        expl = explain(model.handle, xi[None], "gradcam", params)
        from service.imaging.geometry import make_geometry, to_original

        geometry = make_geometry(img.width, img.height, model.input_size, model.resize)
        heatmap_png(to_original(expl.maps[0, 0], geometry))

    files = {"image": ("chelsea.png", image_bytes, "image/png")}

    with server(args.device, args.threads) as base, httpx.Client(base_url=base, timeout=120) as client:

        def http(fmt: str) -> Callable[[], None]:
            def call() -> None:
                r = client.post(ROUTE, files=files, data={"method": "gradcam", "format": fmt})
                r.raise_for_status()

            return call

        contenders: dict[str, Callable[[], None]] = {
            "engine in-process": engine_only,
            "in-process decode+explain+png": in_process_png,
            "HTTP png": http("png"),
            "HTTP json": http("json"),
        }
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

            per = [args.requests // concurrency] * concurrency
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(worker, per))
            return sum(per) / (time.perf_counter() - start)

        throughput(2)  # warm-up
        t1 = throughput(1)
        tn = throughput(args.concurrency)

    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, image 451×300 PNG, {args.rounds} rounds"
    )
    print(f"{'contender':34s} {'median ms':>10s} {'p95 ms':>10s} {'× engine':>9s}")
    engine_median = summary(samples["engine in-process"])[0]
    for name, values in samples.items():
        med, p95 = summary(values)
        print(f"{name:34s} {med:10.1f} {p95:10.1f} {med / engine_median:9.2f}")
    print(
        f"throughput concurrency 1: {t1:.2f} req/s; concurrency {args.concurrency}: {tn:.2f} req/s ({tn / t1:.2f}×)"
    )
    png_ratio = summary(samples["HTTP png"])[0] / engine_median
    json_ratio = summary(samples["HTTP json"])[0] / engine_median
    print(
        f"targets: HTTP png {png_ratio:.2f}× and json {json_ratio:.2f}× in-process (≤ 1.30: "
        f"{'met' if max(png_ratio, json_ratio) <= 1.3 else 'NOT met'}); throughput at "
        f"{args.concurrency} ≥ at 1: {'met' if tn >= t1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
