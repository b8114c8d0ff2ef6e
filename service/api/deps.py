"""What routes need from the application, injected with FastAPI's ``Depends``.

``create_app`` puts one ``Services`` object on ``app.state.services``. The registry and the job
service appear there once the lifespan has loaded them (off the event loop); until then the
dependencies below raise ``NotReady`` (503) while ``/healthz`` keeps answering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from service.api.auth import KeyLimits
from service.api.middleware import annotate
from service.config import Settings
from service.errors import NotReady
from service.metrics import Metrics
from service.models.registry import LoadedModel, ModelRegistry
from service.runtime.sync.executor import Executor


@dataclass
class Services:
    """The application's long-lived objects; ``registry`` and ``jobs`` are ``None`` while loading."""

    settings: Settings
    metrics: Metrics
    executor: Executor
    key_limits: KeyLimits
    registry: ModelRegistry | None = None
    jobs: Any = None  # service.runtime.jobs.JobService once started
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.registry is not None and bool(self.registry.ready)

    def require_registry(self) -> ModelRegistry:
        if self.registry is None:
            if self.load_error is not None:
                raise NotReady(f"the models could not be loaded: {self.load_error}")
            raise NotReady("the models are still loading; retry shortly")
        return self.registry


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_registry(services: Annotated[Services, Depends(get_services)]) -> ModelRegistry:
    return services.require_registry()


ModelName = Annotated[
    str, Path(description="model name (GET /v1/models lists them)", examples=["efficientnet_lite0"])
]


def get_model(
    request: Request, model: ModelName, registry: Annotated[ModelRegistry, Depends(get_registry)]
) -> LoadedModel:
    """The path parameter ``{model}`` resolved; unknown names raise ``UnknownModel`` (404)."""
    loaded = registry.get(model)
    annotate(request.scope, model=loaded.name)
    return loaded


def get_owner(request: Request) -> str | None:
    """Who is asking: the id of the request's API key (``service.api.auth``: a digest, never the
    key), or ``None`` when the service runs without keys. Jobs belong to it; limits count by it."""
    owner: str | None = request.scope.get("state", {}).get("principal")
    return owner


ServicesDep = Annotated[Services, Depends(get_services)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ModelDep = Annotated[LoadedModel, Depends(get_model)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
