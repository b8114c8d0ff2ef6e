"""Operations: liveness, readiness and Prometheus metrics (outside ``/v1``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from service.api import problems
from service.api.deps import ServicesDep
from service.api.schemas import Health, NotReadyProblem

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: 200 while the process lives")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: 503 until every model is loaded and warmed up",
    responses={
        503: {
            "model": NotReadyProblem,
            "description": "still loading, or loading failed: a problem whose `state` says which",
            "content": {"application/problem+json": {}},
        }
    },
)
async def readyz(request: Request, services: ServicesDep) -> Response:
    registry = services.registry
    models = {info["name"]: bool(info["ready"]) for info in registry.infos()} if registry is not None else {}
    failures = registry.failures() if registry is not None else {}
    if services.ready:
        return JSONResponse(Health(status="ok", models=models).model_dump())
    if services.load_error is not None:
        state, detail = "failed", services.load_error
    elif failures:
        state = "failed"
        detail = "; ".join(f"model {name!r} is unavailable: {why}" for name, why in failures.items())
    else:
        state, detail = "loading", "models are loading or warming up"
    return problems.problem(
        503,
        detail=detail,
        instance=request.url.path,
        title="Not ready",
        type_=problems.TYPE_PREFIX + "not-ready",
        headers={"Retry-After": str(problems.NOT_READY_RETRY_AFTER_S)},
        extensions={"state": state, "models": models},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
