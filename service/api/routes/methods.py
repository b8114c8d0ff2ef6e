"""``/v1/methods``: the attribution methods, straight from the engine's registry."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.schemas import MethodInfo, MethodList
from service.explainers import all_methods
from service.imaging.options import RenderParams

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("", response_model=MethodList, summary="List the attribution methods and their parameters")
def list_methods() -> MethodList:
    return MethodList(
        methods=[
            MethodInfo(
                name=m.name,
                family=m.family,
                description=m.description,
                paper=m.paper,
                parameters=m.parameters_schema(),
                rendering=RenderParams().resolve(m.rendering).defaults(),
                sanity_check=m.sanity_check,
            )
            for m in all_methods()
        ]
    )
