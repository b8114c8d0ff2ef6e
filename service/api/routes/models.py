"""``/v1/models``: what is loaded, and how to feed it."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ModelDep, RegistryDep
from service.api.openapi import problem_responses
from service.api.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List the loaded models", responses=problem_responses(503))
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[ModelInfo.model_validate(m.info()) for m in registry])


@router.get(
    "/{model}", response_model=ModelInfo, summary="Describe one model", responses=problem_responses(404, 503)
)
def get_model(model: ModelDep) -> ModelInfo:
    return ModelInfo.model_validate(model.info())
