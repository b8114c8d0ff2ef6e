"""The FastAPI application: routers, error mapping, the edge middleware and the lifespan.

``create_app`` builds everything but loads no model: the lifespan starts loading the registry in
a worker thread and returns at once, so the server answers ``/healthz`` (and ``/readyz`` with
503) while weights load and the warm-up runs; ``/readyz`` turns 200 when every model is ready.
Building the app is cheap, which is what ``saliency openapi`` relies on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.types import Scope

import service
from service.api import docs, problems
from service.api.deps import Services
from service.api.middleware import EdgeMiddleware
from service.api.request import body_limit
from service.api.routes import explain, jobs, methods, models, ops
from service.config import Settings, get_settings
from service.errors import SaliencyError
from service.metrics import Metrics
from service.models.registry import ModelRegistry
from service.runtime.jobs.service import create_job_service
from service.runtime.sync.executor import Executor

log = logging.getLogger(__name__)

TITLE = "saliency-service"
DESCRIPTION = """\
Explains what an image classifier looked at: upload an image, get a heatmap.

Try it here: open **POST /v1/models/{model}/explain**, choose a file for `image` and press
*Execute* — the default answer is a PNG heatmap (`format=overlay` draws it over the photo,
`format=json` gives the numbers). `GET /v1/models` lists the models, `GET /v1/methods` the
attribution methods and their parameters. Heavy work (many images, steps or samples) goes to
`POST /v1/jobs`. Errors are `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The service. ``registry``: already loaded models (tests); otherwise loaded from ``settings``
    in the lifespan."""
    settings = settings or get_settings()
    metrics = Metrics()
    executor = Executor.from_settings(settings, metrics)
    services = Services(settings=settings, metrics=metrics, executor=executor)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        loading = asyncio.create_task(_load(services, registry), name="load-models")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            if services.jobs is not None:
                await services.jobs.stop()
            executor.shutdown()

    app = FastAPI(
        title=TITLE,
        version=service.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.services = services
    problems.install(app)

    def limit(scope: Scope) -> int:
        return body_limit(settings)

    app.add_middleware(EdgeMiddleware, max_body_bytes=limit, metrics=metrics)
    for router in (models.router, methods.router, explain.router, jobs.router, ops.router):
        app.include_router(router)
    docs.install(app, title=TITLE)
    return app


async def _load(services: Services, registry: ModelRegistry | None) -> None:
    """Load (unless given), start the job service, warm up; failures are kept for ``/readyz``."""
    settings = services.settings
    try:
        if registry is None:
            registry = await asyncio.to_thread(ModelRegistry.from_settings, settings)
        services.registry = registry
        jobs_service = create_job_service(settings, registry, services.executor, services.metrics)
        await jobs_service.start()
        services.jobs = jobs_service
        if settings.warmup:
            await asyncio.to_thread(registry.warmup)
        else:
            registry.mark_ready()
        log.info("ready: %s", ", ".join(registry.names()))
    except asyncio.CancelledError:
        raise
    except SaliencyError as exc:
        log.error("loading the models failed: %s", exc.message)
        services.load_error = exc.message
    except Exception as exc:
        log.exception("loading the models failed")
        services.load_error = f"{type(exc).__name__} (see the server log)"
