"""Routes for clients of other model servers: KServe v1 and TorchServe (shared/API.md,
"Compatibility routes").

- KServe v1: ``POST /v1/models/{model}:predict`` and ``:explain`` with ``{"instances": [...],
  "parameters": {...}}`` (``request.parse_kserve``) → ``{"predictions": [...]}`` (each instance's
  top classes) / ``{"explanations": [...]}`` (the explain JSON's entries).
- TorchServe: ``POST`` (or ``PUT``, which ``curl -T`` sends) ``/predictions/{model}`` and
  ``/explanations/{model}`` with the image as the body or the multipart field ``data``
  (``request.parse_torchserve``) → ``{label: probability}`` of the top 5 / a JSON list of one
  nested-list attribution per image.

Thin: the same parsing of options, the same pipeline (plan, synchronous and response budgets,
decoding limits, deadline), the same per-key slot as the native routes; only the body shapes
differ. Several images per request (at most ``max_sync_images``, holding ``max_image_pixels``
together) run as one batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api import budget, pipeline
from service.api.auth import sync_slot
from service.api.deps import ModelDep, Services, ServicesDep
from service.api.openapi import (
    kserve_explain_doc,
    kserve_predict_doc,
    torchserve_explain_doc,
    torchserve_predict_doc,
)
from service.api.options import ExplainOptions, PredictOptions
from service.api.request import OptionsT, ParsedRequest, choose_format, parse_kserve, parse_torchserve
from service.api.responses import dumps, json_response, kserve_explanations, torchserve_attributions
from service.config import Settings
from service.errors import InvalidParameter
from service.explainers import Targets
from service.models.registry import LoadedModel

router = APIRouter(tags=["compatibility"], dependencies=[Depends(sync_slot)])

Parser = Callable[[Request, type[OptionsT], Settings], Awaitable[ParsedRequest[OptionsT]]]


async def _predict(
    request: Request, model: LoadedModel, services: Services, parse: Parser[PredictOptions]
) -> tuple[list[list[dict[str, Any]]], pipeline.Clock]:
    """Each image's top classes (``top_k``, default 5)."""
    clock = pipeline.Clock(services.settings.request_timeout_s)
    parsed = await parse(request, PredictOptions, services.settings)
    choose_format(None, parsed.accept, ("json",))
    top_k = Targets.top(parsed.options.top_k).check(model.num_classes).top_k
    items = await pipeline.prepare_images(services.settings, model, parsed.images, clock)
    probs = await pipeline.predict(services, model, items, clock)
    return [pipeline.top_classes(model, row, top_k) for row in probs], clock


async def _explain(
    request: Request, model: LoadedModel, services: Services, parse: Parser[ExplainOptions], *, score: bool
) -> tuple[pipeline.Explained, pipeline.Clock]:
    """The explanation as JSON; ``score``: whether the answer has a place for the AUCs."""
    clock = pipeline.Clock(services.settings.request_timeout_s)
    parsed = await parse(request, ExplainOptions, services.settings)
    if parsed.options.score and not score:
        raise InvalidParameter(
            "score=true adds AUCs to explain entries; this answer has no place for them "
            "(POST /v1/models/{model}:explain or /v1/models/{model}/explain has)",
            field="score",
        )
    return await pipeline.explain_request(services, model, parsed, ("json",), clock), clock


# ------------------------------------------------------------------------------------------------
# KServe v1
# ------------------------------------------------------------------------------------------------
@router.post(
    "/v1/models/{model}:predict",
    summary="KServe v1 predict: each instance's top classes",
    openapi_extra=kserve_predict_doc()["extra"],
    responses=kserve_predict_doc()["responses"],
    response_class=Response,
)
async def kserve_predict(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    predictions, _ = await _predict(request, model, services, parse_kserve)
    return json_response({"predictions": predictions})


@router.post(
    "/v1/models/{model}:explain",
    summary="KServe v1 explain: the explain JSON's entries, one per instance",
    openapi_extra=kserve_explain_doc()["extra"],
    responses=kserve_explain_doc()["responses"],
    response_class=Response,
)
async def kserve_explain(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    done, clock = await _explain(request, model, services, parse_kserve, score=True)
    stream = done.size > budget.STREAM_BYTES
    return await pipeline.within(clock, _kserve_body, model, done, stream)


def _kserve_body(model: LoadedModel, done: pipeline.Explained, stream: bool) -> Response:
    return kserve_explanations(model, done, stream=stream)


# ------------------------------------------------------------------------------------------------
# TorchServe
# ------------------------------------------------------------------------------------------------
async def torchserve_predict(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    predictions, _ = await _predict(request, model, services, parse_torchserve)
    answers = [{p["label"]: p["probability"] for p in row} for row in predictions]
    return Response(dumps(answers[0] if len(answers) == 1 else answers), media_type="application/json")


async def torchserve_explain(request: Request, model: ModelDep, services: ServicesDep) -> Response:
    done, clock = await _explain(request, model, services, parse_torchserve, score=False)
    stream = done.size > budget.STREAM_BYTES
    return await pipeline.within(clock, _torchserve_body, model, done, stream)


def _torchserve_body(model: LoadedModel, done: pipeline.Explained, stream: bool) -> Response:
    return torchserve_attributions(model, done, stream=stream)


_TORCHSERVE_ROUTES = (
    ("/predictions/{model}", torchserve_predict, "predict", torchserve_predict_doc,
     "predictions ({verb}): the top 5 classes as {{label: probability}}"),
    ("/explanations/{model}", torchserve_explain, "explain", torchserve_explain_doc,
     "explanations ({verb}): one nested-list attribution per image"),
)  # fmt: skip
for _verb in ("POST", "PUT"):  # curl -T sends PUT; TorchServe answers both
    for _path, _endpoint, _kind, _doc_of, _summary in _TORCHSERVE_ROUTES:
        _doc = _doc_of()
        router.add_api_route(
            _path,
            _endpoint,
            methods=[_verb],
            name=f"torchserve_{_kind}_{_verb.lower()}",
            summary="TorchServe " + _summary.format(verb=_verb),
            openapi_extra=_doc["extra"],
            responses=_doc["responses"],
            response_class=Response,
        )
