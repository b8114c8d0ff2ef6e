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
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

import service
from service.api import docs, problems
from service.api.auth import KEY_HEADER, AuthMiddleware, KeyLimits, KeyRing, is_loopback, open_paths
from service.api.deps import Services
from service.api.middleware import EdgeMiddleware
from service.api.openapi import install_security
from service.api.request import body_limit
from service.api.responses import TARGET_HEADERS
from service.api.routes import compat, evaluate, explain, jobs, methods, models, ops
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
    keys = KeyRing.from_settings(settings)
    if keys is None and not is_loopback(settings.host):
        log.warning(
            "listening on %s without API keys: anyone who reaches the port can run work; "
            "set SALIENCY_API_KEYS or SALIENCY_API_KEYS_FILE",
            settings.host,
        )
    services = Services(
        settings=settings,
        metrics=metrics,
        executor=executor,
        key_limits=KeyLimits(settings.max_sync_per_key),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads = torch.get_num_threads()  # the process's, given back at shutdown (an embedding app)
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
            torch.set_num_threads(threads)

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

    # outermost last: the edge (request id, body limit, metrics) sees every answer, CORS preflights
    # pass before the key check, and the key check runs before any route
    app.add_middleware(AuthMiddleware, keys=keys, open=open_paths(settings))
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", KEY_HEADER, "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", *TARGET_HEADERS],
            max_age=600,
        )
    app.add_middleware(EdgeMiddleware, max_body_bytes=limit, metrics=metrics)
    for router in (
        models.router,
        methods.router,
        explain.router,
        evaluate.router,
        jobs.router,
        compat.router,
        ops.router,
    ):
        app.include_router(router)
    docs.install(app, title=TITLE)
    install_security(app, required=keys is not None, open_paths=open_paths(settings))
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
