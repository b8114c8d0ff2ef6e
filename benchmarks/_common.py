"""Helpers shared by the benchmark scripts: models, devices, timing and tables.

Timings are wall-clock medians of interleaved repeats (every contender runs once per round, so slow
phases of a shared machine hit them alike). On CUDA every timed call is bracketed by
``torch.cuda.synchronize()``, so queued kernels are counted where they run.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # may only be set once per process
        torch.set_num_interop_threads(max(1, min(n, 2)))


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised classifier: a torchvision model name, else a timm one."""
    import torchvision

    model: nn.Module
    if name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return model.eval()


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``dtype == "bf16"`` (CUDA, or a CPU with bf16 units); a
    no-op for fp32."""
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender: ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(warmup + repeats):
        for name, fn in contenders.items():
            t = time_once(fn, device)
            if r >= warmup:
                times[name].append(t)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("{:<" + str(w) + "}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*header), sep, *(line.format(*map(str, r)) for r in rows)])
