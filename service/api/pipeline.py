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

from service.api import budget
from service.api.deps import Services
from service.api.options import ExplainOptions, TargetOptions
from service.api.request import ParsedRequest, choose_format
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    ImageTooLarge,
    InvalidParameter,
    MethodNotApplicable,
    TooHeavy,
)
from service.evaluation import EvaluateParams, sanity_blocks
from service.evaluation import cost as evaluation_cost
from service.evaluation.curves import auc
from service.explainers import ExplainParams, Explanation, Targets, get_method
from service.explainers.engine import resolve_params
from service.imaging.decode import decode_upload
from service.imaging.geometry import Geometry
from service.imaging.options import RenderParams
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
    """Each upload decoded and preprocessed. The images of one request together hold at most
    ``max_image_pixels`` (one image's limit): a request of several images (KServe instances,
    TorchServe ``data`` parts) costs no more decoded memory than a request of one."""
    out: list[Prepared] = []
    used = 0
    for data in images:
        left = settings.max_image_pixels - used
        try:
            image = decode_upload(data, settings, max_pixels=left)
        except ImageTooLarge:
            if not used:
                raise
            raise ImageTooLarge(
                f"the images of one request may hold {settings.max_image_pixels} pixels together; "
                f"the first {len(out)} already hold {used}: send fewer or smaller images",
                field="image",
            ) from None
        used += image.width * image.height
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


def top_classes(model: LoadedModel, probs: Tensor, k: int) -> list[dict[str, Any]]:
    """One image's ``k`` most probable classes, best first: ``{"index", "label", "probability"}``."""
    values, indices = probs.topk(k)
    return [
        {"index": int(i), "label": model.label(int(i)), "probability": round(float(p), 6)}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def channels(items: list[Prepared]) -> int:
    """The model input's channels (the values per pixel of a ``reduction=none`` map)."""
    return int(items[0].x.shape[0])


@dataclass
class Explained:
    """One method's explanation of a request's images, checked and budgeted, ready to render."""

    fmt: str
    expl: Explanation
    items: list[Prepared]
    targets: Targets
    render: RenderParams  # resolved for the method
    size: int  # the response's estimated bytes (``budget``)
    extras: list[list[dict[str, float]]] | None  # score=true: each entry's AUCs


async def explain_request(
    services: Services,
    model: LoadedModel,
    parsed: ParsedRequest[ExplainOptions],
    offered: tuple[str, ...],
    clock: Clock,
) -> Explained:
    """What ``POST …/explain`` and the compatibility routes share: the output format among
    ``offered``, the plan (methods, targets, synchronous budget), decoding, the response budget,
    the explanation and, with ``score=true``, its AUCs."""
    settings = services.settings
    options = parsed.options
    render = options.render().resolve(get_method(options.method).rendering)
    fmt = choose_format(render.format, parsed.accept, offered)
    if render.reduction == "none" and fmt in ("png", "overlay"):
        raise InvalidParameter("reduction=none needs format=json or npy", field="reduction")
    if options.score and fmt != "json":
        raise InvalidParameter("score=true adds AUCs to the JSON: it needs format=json", field="score")
    scoring = EvaluateParams() if options.score else None
    work = await plan(services, model, options, [options.method], len(parsed.images), scoring, baseline=False)
    items = await prepare_images(settings, model, parsed.images, clock)
    shape = budget.answer(
        fmt, render, [it.geometry for it in items], targets=work.targets.per_image, channels=channels(items)
    )
    size = budget.check(settings, shape)
    [expl] = await explain(services, model, items, work, clock)
    extras = None
    if scoring is not None:
        curves = await services.executor.score(
            model.handle, batch(items), expl, scoring, timeout=clock.remaining()
        )
        extras = [[{f"{kind}_auc": round(auc(c[kind]), 6) for kind in c} for c in row] for row in curves]
    return Explained(fmt, expl, items, work.targets, render, size, extras)
