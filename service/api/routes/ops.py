"""Operations: liveness, readiness and Prometheus metrics (outside ``/v1``)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from service.api.deps import ServicesDep
from service.api.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: 200 while the process lives")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: 503 until every model is loaded and warmed up",
    responses={503: {"model": Health, "description": "still loading, or loading failed"}},
)
async def readyz(services: ServicesDep) -> Response:
    registry = services.registry
    models = {info["name"]: bool(info["ready"]) for info in registry.infos()} if registry is not None else {}
    failures = registry.failures() if registry is not None else {}
    if services.ready:
        return JSONResponse(Health(status="ok", models=models).model_dump())
    if services.load_error is not None:
        health = Health(status="failed", detail=services.load_error, models=models)
    elif failures:
        detail = "; ".join(f"model {name!r} is unavailable: {why}" for name, why in failures.items())
        health = Health(status="failed", detail=detail, models=models)
    else:
        health = Health(status="loading", detail="models are loading or warming up", models=models)
    return JSONResponse(health.model_dump(), status_code=503, headers={"Retry-After": "2"})


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
