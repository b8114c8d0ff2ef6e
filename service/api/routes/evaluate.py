"""``POST /v1/models/{model}/evaluate``: how far to trust a map.

Parse (``EvaluateOptions``), plan (methods, targets, layer, the passes of the explanations, the
curves and the sanity check against the synchronous budget), decode, resolve the one target,
explain with each method on the executor, then evaluate on the same device lane
(``Executor.evaluate``), and answer JSON or the plot (``format=png``), rendered off the loop.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api import budget, pipeline
from service.api.auth import sync_slot
from service.api.deps import ModelDep, ServicesDep
from service.api.openapi import evaluate_responses, image_request_body
from service.api.options import EvaluateOptions, evaluate_params
from service.api.request import choose_format, parse_request
from service.api.responses import json_response
from service.errors import InvalidParameter
from service.evaluation import EvaluateParams, Evaluation, check_methods, report, sanity_blocks
from service.explainers import Targets
from service.imaging.plot import curves_png
from service.models.registry import LoadedModel

router = APIRouter(prefix="/v1/models/{model}", tags=["explain"], dependencies=[Depends(sync_slot)])

EVALUATE_FORMATS = ("json", "png")


@router.post(
    "/evaluate",
    summary="Evaluate maps: deletion/insertion curves against a random map, pointing game, sanity check",
    description="Explains the image with each method of `methods` for one target (`target`, else "
    "the top-1 class), then measures how faithful each map is: `metrics` from deletion, insertion "
    "(curves of the target's probability as the map's highest pixels are removed or put back, and "
    "their AUCs, next to a seeded random map's), pointing (does the map's peak lie in `box`?) and "
    "sanity (rank correlation with the map of a copy of the model randomised layer by layer). "
    "JSON by default; `format=png` plots the curves. Work above the synchronous budget gets 422 "
    "pointing to `POST /v1/jobs` (`task=evaluate`).",
    openapi_extra=image_request_body(EvaluateOptions),
    responses=evaluate_responses(),
    response_class=Response,
)
async def evaluate(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    settings = services.settings
    clock = pipeline.Clock(settings.request_timeout_s)
    parsed = await parse_request(request, EvaluateOptions, settings)
    options = parsed.options
    params = evaluate_params(options)
    fmt = choose_format(options.render().format, parsed.accept, EVALUATE_FORMATS)
    if fmt == "png" and not params.curves:
        raise InvalidParameter(
            "format=png plots the deletion or insertion curves: ask for one", field="format"
        )
    if options.top_k != 1:
        raise InvalidParameter("evaluate explains one target: give target, or top_k=1", field="top_k")
    methods = options.method_list()
    check_methods(params, methods)
    work = await pipeline.plan(services, model, options, methods, 1, params)
    seed = work.params.seed if work.params.seed is not None else secrets.randbits(62)
    engine = work.params.with_(seed=seed)  # one seed: the methods' noise and the random map
    blocks = await run_in_threadpool(sanity_blocks, model.handle) if "sanity" in params.metric_list else 0
    budget.check_bytes(
        settings, budget.evaluation_bytes(fmt, len(methods), params, blocks), f"{fmt} evaluation"
    )
    [item] = await pipeline.prepare_images(settings, model, parsed.images, clock)
    params.check_box(item.image.width, item.image.height)
    targets = work.targets
    if not targets.explicit:  # the top-1 class, once, so that every method explains the same one
        probs = await pipeline.predict(services, model, [item], clock)
        targets = Targets.given([[int(probs[0].argmax())]])
    plan = pipeline.Plan(engine, targets, methods)
    explanations = await pipeline.explain(services, model, [item], plan, clock)
    ev = await services.executor.evaluate(
        model.handle,
        pipeline.batch([item]),
        explanations,
        params,
        seed=seed,
        batch_size=engine.batch_size,
        geometry=item.geometry,
        timeout=clock.remaining(),
    )
    head = {
        "model": model.name,
        "target": {"index": ev.target, "label": model.label(ev.target), "score": round(ev.score, 6)},
        "parameters": {"methods": methods, **params.requested(), **targets.echo(), **engine.requested()},
    }
    return await pipeline.within(clock, _render, fmt, model, ev, params, head, clock.elapsed_ms)


def _render(
    fmt: str,
    model: LoadedModel,
    ev: Evaluation,
    params: EvaluateParams,
    head: dict[str, Any],
    elapsed_ms: float,
) -> Response:
    timing = {"X-Elapsed-Ms": f"{elapsed_ms:.1f}"}
    if fmt == "png":
        label = head["target"]["label"]
        png = curves_png(
            [(r.method, r.curves, r.aucs) for r in ev.results],
            ev.random,
            ev.random_aucs,
            title=f"{model.name} · class {ev.target} ({label}), p = {ev.score:.3f} · "
            f"{params.curve_steps} steps, {params.substitute} substitute",
        )
        return Response(png, media_type="image/png", headers=timing)
    body = {**head, "elapsed_ms": round(elapsed_ms, 1), "results": report.results(ev, params)}
    return json_response(body, timing)
