"""Dynamic batching on and off: throughput and p50/p95 latency at concurrency 1, 8 and 32.

In process, through ``Executor.explain`` (the path every synchronous explain request takes):
``concurrency`` clients each send explain requests back to back, one image each, until
``--requests`` have completed (and at most ``--max-seconds`` per run). The model is a randomly
initialised torchvision ResNet-18 (1000 classes) at ``--size``; nothing is downloaded.

    .venv/bin/python benchmarks/batching.py                 # gradcam, 128 px, 96 requests per run
    .venv/bin/python benchmarks/batching.py --method saliency --size 224 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
import torchvision

from service.explainers import ExplainParams, ModelHandle, explain
from service.metrics import Metrics
from service.runtime.sync.executor import Executor


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


async def run(
    executor: Executor, handle: ModelHandle, images: torch.Tensor, args: argparse.Namespace, concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    params = ExplainParams(seed=0)
    deadline = time.perf_counter() + args.max_seconds
    issued = 0

    async def client(worker: int) -> None:
        nonlocal issued
        while issued < args.requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            x = images[i % images.shape[0]].unsqueeze(0)
            start = time.perf_counter()
            await executor.explain(handle, x, args.method, params, timeout=600)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*[client(w) for w in range(concurrency)])
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per run")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="batch_max_delay_ms")
    parser.add_argument("--max-batch", type=int, default=16, help="batch_max_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval().to(args.device)
    handle = ModelHandle(module=net, target_layer="layer4", name="resnet18")
    images = torch.randn(16, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    explain(handle, images[:2].to(args.device), args.method, ExplainParams(seed=0))  # warm up
    levels = [int(c) for c in args.concurrency.split(",")]

    print(
        f"{args.method} on resnet18 {args.size}×{args.size} ({args.device}, {torch.get_num_threads()} threads), "
        f"{args.requests} requests per run, batch ≤ {args.max_batch} images, delay ≤ {args.delay_ms:g} ms"
    )
    print(
        f"{'batching':>8} {'conc':>5} {'done':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10}"
    )
    for concurrency in levels:
        for batching in (False, True):
            metrics = Metrics()
            executor = Executor(
                batching=batching,
                batch_max_delay_ms=args.delay_ms,
                batch_max_size=args.max_batch,
                queue_size=max(64, concurrency),
                metrics=metrics,
            )
            try:
                wall, lat = asyncio.run(run(executor, handle, images.to(args.device), args, concurrency))
            finally:
                executor.shutdown()
            calls = metrics.registry.get_sample_value("saliency_batch_size_count", {"model": "resnet18"}) or 1
            imgs = metrics.registry.get_sample_value("saliency_batch_size_sum", {"model": "resnet18"}) or 0
            print(
                f"{'on' if batching else 'off':>8} {concurrency:>5} {len(lat):>5} {len(lat) / wall:>8.1f} "
                f"{statistics.median(lat) * 1000:>8.1f} {percentile(lat, 0.95) * 1000:>8.1f} {imgs / calls:>10.2f}"
            )


if __name__ == "__main__":
    main()
