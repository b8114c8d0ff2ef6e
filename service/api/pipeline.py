"""The steps of a synchronous image request, between parsing and rendering.

Decoding and preprocessing run in a worker thread, model work on the executor's device thread,
so the event loop never blocks on CPU work and ``/healthz`` answers while a request computes.
"""

from __future__ import annotations

import time

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from service.api.deps import Services
from service.api.params import TargetOptions, engine_params, resolve_targets
from service.api.responses import Prepared
from service.config import Settings
from service.errors import DeadlineExceeded, MethodNotApplicable, TooHeavy
from service.explainers import ExplainParams, Explanation, get_method
from service.imaging.decode import decode_upload
from service.models.registry import LoadedModel


class Clock:
    """Milliseconds since the request started, and what is left of its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.started = time.perf_counter()
        self.timeout_s = timeout_s

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def remaining(self) -> float:
        left = self.timeout_s - (time.perf_counter() - self.started)
        if left <= 0:
            raise DeadlineExceeded(f"the request did not finish within {self.timeout_s:g} s")
        return left


def _prepare_all(settings: Settings, model: LoadedModel, images: list[bytes]) -> list[Prepared]:
    out: list[Prepared] = []
    for data in images:
        image = decode_upload(data, settings)
        x, geometry = model.preprocess(image)
        out.append(Prepared(image=image, x=x, geometry=geometry))
    return out


async def prepare_images(settings: Settings, model: LoadedModel, images: list[bytes]) -> list[Prepared]:
    """Decode (limits, EXIF, RGB) and preprocess each upload, off the event loop."""
    return await run_in_threadpool(_prepare_all, settings, model, images)


def batch(items: list[Prepared]) -> Tensor:
    return torch.stack([it.x for it in items])


async def available_methods(model: LoadedModel) -> list[str]:
    """The model's methods; the first call probes the model, so it runs off the event loop."""
    return await run_in_threadpool(model.methods)


def check_methods(model: LoadedModel, methods: list[str], available: list[str]) -> None:
    for method in methods:
        if method not in available:
            raise MethodNotApplicable(
                f"method {method!r} does not work on model {model.name!r}; it offers {', '.join(available)}",
                field="method",
            )


def check_cost(
    settings: Settings, methods: list[str], params: ExplainParams, images: int, targets: int
) -> None:
    """``TooHeavy`` when images × targets × Σ passes exceeds the synchronous budget."""
    passes = sum(get_method(m).passes(params) for m in methods) * images * targets
    if passes > settings.max_sync_passes:
        raise TooHeavy(
            f"this request needs {passes} forward/backward passes; synchronous requests allow "
            f"{settings.max_sync_passes}. Submit it as a job instead: POST /v1/jobs",
            passes=passes,
            limit=settings.max_sync_passes,
        )


async def explain(
    services: Services,
    model: LoadedModel,
    items: list[Prepared],
    options: TargetOptions,
    methods: list[str],
    clock: Clock,
) -> list[Explanation]:
    """Each method's explanation of the batch, one after the other, within the deadline."""
    settings = services.settings
    params = engine_params(options, settings)
    check_methods(model, methods, await available_methods(model))
    targets, top_k = resolve_targets(options, model.num_classes)
    check_cost(settings, methods, params, len(items), 1 if targets else top_k)
    x = batch(items)
    target_spec = None if targets is None else [targets for _ in items]
    out: list[Explanation] = []
    for m in methods:
        expl = await services.executor.explain(
            model.handle, x, m, params, targets=target_spec, top_k=top_k, timeout=clock.remaining()
        )
        services.metrics.explanations.labels(model=model.name, method=m).inc(len(items))
        out.append(expl)
    return out


async def predict(services: Services, model: LoadedModel, items: list[Prepared], clock: Clock) -> Tensor:
    """Softmax probabilities (N, num_classes)."""
    logits = await services.executor.predict(model.handle, batch(items), timeout=clock.remaining())
    return logits.softmax(dim=1)
