"""The steps of a synchronous image request, between parsing and rendering.

Decoding and preprocessing run in a worker thread, model work on the executor's device thread,
so the event loop never blocks on CPU work and ``/healthz`` answers while a request computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from service.api.deps import Services
from service.api.options import TargetOptions
from service.config import Settings
from service.errors import DeadlineExceeded, MethodNotApplicable, TooHeavy
from service.evaluation import EvaluateParams, sanity_blocks
from service.evaluation import cost as evaluation_cost
from service.explainers import ExplainParams, Explanation, Targets, get_method
from service.explainers.engine import resolve_params
from service.imaging.decode import decode_upload
from service.imaging.geometry import Geometry
from service.models.registry import LoadedModel

T = TypeVar("T")


@dataclass
class Prepared:
    """One decoded upload and the model input made from it."""

    image: Image.Image  # RGB, EXIF orientation applied
    x: Tensor  # (C, H, W) normalised model input
    geometry: Geometry


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


async def prepare_images(
    settings: Settings, model: LoadedModel, images: list[bytes], clock: Clock
) -> list[Prepared]:
    """Decode (limits, EXIF, RGB) and preprocess each upload, off the event loop and within the
    request's deadline."""
    return await within(clock, _prepare_all, settings, model, images)


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
    settings: Settings,
    model: LoadedModel,
    methods: list[str],
    params: ExplainParams,
    images: int,
    targets: Targets,
    evaluation: EvaluateParams | None = None,
    *,
    baseline: bool = True,
) -> None:
    """Each method's parameters resolved on the model (an unusable layer is refused now, before any
    work), then ``TooHeavy`` when images × targets × Σ passes exceeds the synchronous budget.
    With ``evaluation``, its passes count too (``service.evaluation.cost``: curves, the random
    map's when ``baseline``, the sanity check's explanations).
    Blocking (the first call may measure the model's layers): run it off the event loop."""
    costs = []
    for name in methods:
        m = get_method(name)
        costs.append(m.cost(resolve_params(m, model.handle, params), model.handle))
    if evaluation is None:
        passes = sum(costs)
    else:
        blocks = sanity_blocks(model.handle) if "sanity" in evaluation.metric_list else 0
        passes = evaluation_cost(evaluation, costs, blocks, baseline=baseline)
    passes *= images * targets.per_image
    if passes > settings.max_sync_passes:
        raise TooHeavy(
            f"this request needs {passes} forward/backward passes; synchronous requests allow "
            f"{settings.max_sync_passes}. Submit it as a job instead: POST /v1/jobs",
            passes=passes,
            limit=settings.max_sync_passes,
        )


@dataclass(frozen=True)
class Plan:
    """A request's work, checked before any of it runs: parameters, targets and methods."""

    params: ExplainParams
    targets: Targets
    methods: list[str]


async def plan(
    services: Services,
    model: LoadedModel,
    options: TargetOptions,
    methods: list[str],
    images: int,
    evaluation: EvaluateParams | None = None,
    *,
    baseline: bool = True,
) -> Plan:
    """Everything a request can be refused for before its images are even decoded: methods that
    do not apply, targets out of range, an unusable layer, the synchronous budget (with the
    passes of an ``evaluation``, see ``check_cost``)."""
    params = options.engine_params(services.settings)
    check_methods(model, methods, await available_methods(model))
    targets = options.targets(images, model.num_classes)
    await run_in_threadpool(
        partial(check_cost, baseline=baseline),
        services.settings,
        model,
        methods,
        params,
        images,
        targets,
        evaluation,
    )
    return Plan(params, targets, methods)


async def explain(
    services: Services, model: LoadedModel, items: list[Prepared], work: Plan, clock: Clock
) -> list[Explanation]:
    """Each method's explanation of the batch for the plan's targets, one method after the
    other, within the deadline."""
    x = batch(items)
    out: list[Explanation] = []
    for m in work.methods:
        expl = await services.executor.explain(
            model.handle, x, m, work.params, targets=work.targets, timeout=clock.remaining()
        )
        services.metrics.explanations.labels(model=model.name, method=m).inc(len(items))
        out.append(expl)
    return out


async def within(clock: Clock, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, answered ``DeadlineExceeded`` (504) if the request's
    deadline passes first: decoding and rendering count against it like the model's work (the
    thread finishes on its own; its work is bounded by the image and response limits)."""
    try:
        return await asyncio.wait_for(run_in_threadpool(fn, *args), clock.remaining())
    except TimeoutError:
        raise DeadlineExceeded(f"the request did not finish within {clock.timeout_s:g} s") from None


async def predict(services: Services, model: LoadedModel, items: list[Prepared], clock: Clock) -> Tensor:
    """Softmax probabilities (N, num_classes)."""
    logits = await services.executor.predict(model.handle, batch(items), timeout=clock.remaining())
    return logits.softmax(dim=1)
