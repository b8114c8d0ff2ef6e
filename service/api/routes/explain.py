"""``POST /v1/models/{model}/predict | explain | compare``: the synchronous image routes.

Each route: parse (``params``), decode and preprocess (``pipeline``, off the loop), run on the
executor, render (``responses``, off the loop). The request body is read by ``parse_request``
(multipart or JSON); ``openapi_extra`` documents it.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api import budget, pipeline
from service.api.auth import sync_slot
from service.api.deps import ModelDep, ServicesDep
from service.api.openapi import compare_responses, explain_responses, image_request_body, predict_responses
from service.api.options import CompareOptions, ExplainOptions, PredictOptions
from service.api.pipeline import Prepared
from service.api.request import choose_format, parse_request
from service.api.responses import (
    check_renderable,
    explain_body,
    explain_entries,
    explain_head,
    json_response,
    json_stream,
    panel,
    panel_image,
    render_explanation,
    streamed,
    target_headers,
)
from service.explainers import Explanation, Targets, get_method
from service.imaging.grid import Row, compare_grid, keys
from service.imaging.options import RenderParams
from service.models.registry import LoadedModel

# every synchronous image route holds one of the caller's concurrent slots (``auth.sync_slot``)
router = APIRouter(prefix="/v1/models/{model}", tags=["explain"], dependencies=[Depends(sync_slot)])

EXPLAIN_FORMATS = ("png", "overlay", "json", "npy")
COMPARE_FORMATS = ("png", "json")


@router.post(
    "/predict",
    summary="Classify an image: the top-k classes and their probabilities",
    openapi_extra=image_request_body(PredictOptions),
    responses=predict_responses(),
    response_class=Response,
)
async def predict(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    settings = services.settings
    clock = pipeline.Clock(settings.request_timeout_s)
    parsed = await parse_request(request, PredictOptions, settings)
    choose_format(None, parsed.accept, ("json",))
    top_k = Targets.top(parsed.options.top_k).check(model.num_classes).top_k
    items = await pipeline.prepare_images(settings, model, parsed.images, clock)
    probs = (await pipeline.predict(services, model, items, clock))[0]
    predictions = pipeline.top_classes(model, probs, top_k)
    elapsed = round(clock.elapsed_ms, 1)
    return json_response({"model": model.name, "predictions": predictions, "elapsed_ms": elapsed})


@router.post(
    "/explain",
    summary="Explain an image: a heatmap of where the model looked",
    description="The image as a multipart file (`image`) or base64 in a JSON body, plus the "
    "parameters as form fields or JSON keys. The answer is a PNG heatmap (default), an overlay "
    "(`format=overlay`), JSON (`format=json` or `Accept: application/json`) or a NumPy `.npy` file. "
    "Work above the synchronous budget gets 422 pointing to `POST /v1/jobs`.",
    openapi_extra=image_request_body(ExplainOptions),
    responses=explain_responses(),
    response_class=Response,
)
async def explain(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    clock = pipeline.Clock(services.settings.request_timeout_s)
    parsed = await parse_request(request, ExplainOptions, services.settings)
    done = await pipeline.explain_request(services, model, parsed, EXPLAIN_FORMATS, clock)
    return await pipeline.within(
        clock,
        partial(
            render_explanation,
            elapsed_ms=clock.elapsed_ms,
            stream=done.size > budget.STREAM_BYTES,
            extras=done.extras,
        ),
        done.fmt,
        model,
        done.expl,
        done.items,
        done.targets,
        done.render,
    )


@router.post(
    "/compare",
    summary="Compare methods side by side: one labelled grid of overlays",
    description="Runs each method of `methods` (comma-separated) on the image. PNG: the input and "
    "one overlay per method, each labelled. JSON: the explain JSON of every method.",
    openapi_extra=image_request_body(CompareOptions),
    responses=compare_responses(),
    response_class=Response,
)
async def compare(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    settings = services.settings
    clock = pipeline.Clock(settings.request_timeout_s)
    parsed = await parse_request(request, CompareOptions, settings)
    options = parsed.options
    render = options.render()
    fmt = choose_format(render.format, parsed.accept, COMPARE_FORMATS)
    methods = options.method_list(await pipeline.available_methods(model))
    renders = [render.resolve(get_method(m).rendering) for m in methods]
    work = await pipeline.plan(services, model, options, methods, len(parsed.images))
    items = await pipeline.prepare_images(settings, model, parsed.images, clock)
    shape = budget.answer(
        "grid" if fmt == "png" else fmt,
        render.resolve(get_method(methods[0]).rendering),
        [it.geometry for it in items],
        targets=work.targets.per_image,
        channels=pipeline.channels(items),
        methods=len(methods),
    )
    size = budget.check(settings, shape)
    results = await pipeline.explain(services, model, items, work, clock)
    return await pipeline.within(
        clock,
        _render_compare,
        fmt,
        model,
        results,
        items,
        work.targets,
        renders,
        clock.elapsed_ms,
        size > budget.STREAM_BYTES,
    )


def _render_compare(
    fmt: str,
    model: LoadedModel,
    results: list[Explanation],
    items: list[Prepared],
    targets: Targets,
    renders: list[RenderParams],
    elapsed_ms: float,
    stream: bool = False,
) -> Response:
    if fmt == "json":
        geometries = [it.geometry for it in items]
        for expl, render in zip(results, renders, strict=True):
            check_renderable(expl, render)
        head = {
            "model": model.name,
            "methods": [expl.method for expl in results],
            "elapsed_ms": round(elapsed_ms, 1),
        }
        timing = {"X-Elapsed-Ms": f"{elapsed_ms:.1f}"}
        if stream:  # each method's body is itself written an entry at a time
            bodies = (
                json_stream(
                    explain_head(model, expl, targets, render, fmt=fmt, elapsed_ms=elapsed_ms),
                    "explanations",
                    explain_entries(model, expl, geometries, render),
                )
                for expl, render in zip(results, renders, strict=True)
            )
            return streamed(json_stream(head, "results", bodies), "application/json", timing)
        whole = [
            explain_body(model, expl, geometries, targets, render, fmt=fmt, elapsed_ms=elapsed_ms)
            for expl, render in zip(results, renders, strict=True)
        ]
        return json_response({**head, "results": whole}, timing)
    png = compare_png(model, results, items[0], renders)
    return Response(png, media_type="image/png", headers=target_headers(model, results[0], 0, elapsed_ms))


def compare_png(
    model: LoadedModel, results: list[Explanation], item: Prepared, renders: list[RenderParams]
) -> bytes:
    """The grid of the first image: one row per target, one column per method after the input,
    the legend of the scales used and a caption."""
    first = results[0]
    tile = panel_image(item)
    rows = []
    for k in range(first.maps.shape[1]):
        index = int(first.targets[0, k])
        label = f"{k + 1}. {model.label(index)} (class {index}), p = {float(first.scores[0, k]):.3f}"
        panels = [panel(expl, item, k, r, tile=tile) for expl, r in zip(results, renders, strict=True)]
        rows.append(Row(label, [tile, *panels]))
    legend = keys([(expl.method, r) for expl, r in zip(results, renders, strict=True)])
    caption = (
        f"model {model.name} · image {item.image.width}x{item.image.height} px · "
        f"{len(rows)} target{'s' if len(rows) > 1 else ''} · panels at the upload's aspect ratio"
    )
    return compare_grid(["input", *(expl.method for expl in results)], rows, legend, caption)
