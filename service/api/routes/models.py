"""``/v1/models``: what is loaded, and how to feed it."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import ModelDep, ModelName, RegistryDep
from service.api.openapi import problem_responses
from service.api.schemas import LayerInfo, LayerList, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List the loaded models", responses=problem_responses(503))
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[ModelInfo.model_validate(info) for info in registry.infos()])


@router.get(
    "/{model}",
    response_model=ModelInfo,
    summary="Describe one model (one that failed to load: `ready` false and its `error`)",
    responses=problem_responses(404, 503),
)
def get_model(model: ModelName, registry: RegistryDep) -> ModelInfo:
    return ModelInfo.model_validate(registry.info(model))


@router.get(
    "/{model}/layers",
    response_model=LayerList,
    summary="The layers CAM methods can use on this model, with their layouts",
    description="Every layer a CAM method can use, in execution order: its layout (`nchw`, `nhwc` or "
    "`tokens`), its [C, h, w] map shape and the prefix tokens dropped before the patch grid; the "
    "default one is marked. A `layer` parameter outside this list gets 422.",
    responses=problem_responses(404, 503),
)
async def list_layers(model: ModelDep) -> LayerList:
    layers = await run_in_threadpool(model.layers)  # measured at load; the first call may wait for it
    return LayerList(layers=[LayerInfo.model_validate(layer) for layer in layers])
