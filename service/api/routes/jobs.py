"""``/v1/jobs``: heavy explanations (many images, steps or samples) as jobs to poll.

``POST`` validates everything a job can be refused for (model, method, parameters, every image)
before it is queued, so a job fails later only for the server's own reasons. Results render like
synchronous explanations (``service.api.responses``): JSON by default, with one entry per image
and target in upload order, each carrying its ``image_index``; PNG, overlay or npy of image
``index``. Rendering options given at submission are the defaults of the result; the query string
of ``GET …/result`` may override them.

A job belongs to the API key that submitted it (``OwnerDep``): every route passes the caller's
id, and another key's job answers 404 like an unknown id. The uploads are kept after success only
for a job submitted with ``format=overlay``: only overlays draw them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from service.api import budget, pipeline
from service.api.deps import OwnerDep, ServicesDep
from service.api.middleware import annotate
from service.api.openapi import image_request_body
from service.api.options import JobOptions, evaluate_params, render_query
from service.api.pipeline import Prepared
from service.api.problems import STATUS, TYPE_PREFIX
from service.api.request import choose_format, parse_request
from service.api.responses import render_explanation
from service.api.schemas import Problem
from service.config import Settings
from service.errors import InvalidParameter, NotReady, SaliencyError
from service.evaluation import check_methods as check_evaluation
from service.explainers import Targets, get_method
from service.imaging.decode import decode_upload
from service.imaging.geometry import Geometry
from service.imaging.options import Format, RenderParams
from service.imaging.styles import RGB
from service.models.registry import LoadedModel
from service.runtime.jobs.result import JobResult
from service.runtime.jobs.service import JobService, retry_after
from service.runtime.jobs.store import JobRecord, error_class

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

RESULT_FORMATS = ("json", "png", "overlay", "npy")
_NO_OVERRIDES: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------
class JobError(BaseModel):
    """Why a job failed: a problem object (RFC 9457), never internals."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(examples=["urn:saliency:problem:worker-lost"])
    title: str
    status: int
    detail: str


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(ge=0.0, le=1.0, description="fraction of the forward/backward passes done")
    created_at: datetime
    # null members default to None: the OpenAPI file drops nulls from its examples, and an
    # example must still validate against its schema (the answers always carry every member)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = Field(None, description="the problem, when the job failed")
    result_url: str | None = Field(None, description="where the result is, once the job succeeded")
    model: str
    method: str
    images: int = Field(description="how many images the job explains")


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _status_of(code: str) -> int:
    for cls in error_class(code).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def job_error(error: dict[str, Any] | None) -> JobError | None:
    if error is None:
        return None
    code = str(error.get("code", "internal-error"))
    return JobError(
        type=TYPE_PREFIX + code,
        title=str(error.get("title", "Job failed")),
        status=_status_of(code),
        detail=str(error.get("detail", "the job failed")),
    )


def job_view(record: JobRecord) -> Job:
    return Job(
        id=record.id,
        status=record.status,
        progress=round(min(1.0, max(0.0, record.progress)), 4),
        created_at=_time(record.created_at) or datetime.now(UTC),
        started_at=_time(record.started_at),
        finished_at=_time(record.finished_at),
        error=job_error(record.error),
        result_url=f"/v1/jobs/{record.id}/result" if record.status == "succeeded" else None,
        model=record.spec.model,
        method=record.spec.method,
        images=record.spec.images,
    )


def _job_response(
    record: JobRecord, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    out = dict(headers or {})
    wait = retry_after(record)
    if wait is not None:
        out["Retry-After"] = str(wait)
    return JSONResponse(job_view(record).model_dump(mode="json"), status_code=status_code, headers=out)


# ------------------------------------------------------------------------------------------------
# dependencies and documentation
# ------------------------------------------------------------------------------------------------
def get_jobs(services: ServicesDep) -> JobService:
    services.require_registry()  # NotReady while the models load
    jobs: JobService | None = services.jobs
    if jobs is None:
        raise NotReady("the job service is starting; retry shortly")
    return jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]

_PROBLEM_DOC = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _problems(**described: str) -> dict[int | str, dict[str, Any]]:
    return {
        int(code[1:]): {"model": Problem, "description": text, "content": _PROBLEM_DOC}
        for code, text in described.items()
    }


_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before polling again", "schema": {"type": "integer"}}
}
_NOT_FOUND = "no job with this id (or not one of this API key's)"
_GONE = "the job finished longer ago than the retention time; its result is gone"

JOB_EXAMPLE: dict[str, Any] = {
    "id": "3f0c9a6e1b7d4c2a9e8f5d4c3b2a1908",
    "status": "running",
    "progress": 0.42,
    "created_at": "2025-01-01T12:00:00Z",
    "started_at": "2025-01-01T12:00:01Z",
    "finished_at": None,
    "error": None,
    "result_url": None,
    "model": "efficientnet_lite0",
    "method": "integrated_gradients",
    "images": 12,
}


# what a client (or a stateful test) can do next with the job's id
JOB_LINKS: dict[str, Any] = {
    name: {
        "operationRef": f"#/paths/~1v1~1jobs~1{{job_id}}{suffix}/{verb}",
        "parameters": {"job_id": "$response.body#/id"},
        "description": description,
    }
    for name, suffix, verb, description in (
        ("GetJob", "", "get", "poll the job's status and progress"),
        ("GetJobResult", "~1result", "get", "fetch its result once it succeeded"),
        ("CancelJob", "", "delete", "cancel it"),
    )
}


# ------------------------------------------------------------------------------------------------
# routes
# ------------------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=202,
    summary="Submit a job: explain one or more images with heavy settings",
    description="The images (`images`, one or more: a repeated multipart file field or a base64 list "
    "in JSON), the `model` and the explain parameters. Answers 202 with the job and its "
    "`Location`; poll it, then fetch `result_url`. A full queue or store answers 503 and an API "
    "key with too many active jobs 429, both with `Retry-After`. Submit with `format=overlay` to "
    "fetch overlays later: only then are the uploads kept after the job succeeded.",
    openapi_extra=image_request_body(
        JobOptions, image_field="images", many=True, example={"model": "efficientnet_lite0"}
    ),
    responses={
        202: {
            "description": "queued",
            "model": Job,
            "headers": {
                "Location": {"description": "the job's URL", "schema": {"type": "string"}},
                **_RETRY_AFTER,
            },
            "content": {
                "application/json": {"example": {**JOB_EXAMPLE, "status": "queued", "progress": 0.0}}
            },
            "links": JOB_LINKS,
        },
        **_problems(
            _404="unknown model",
            _413="an upload or decoded image too large",
            _415="not an image of a supported type",
            _422="invalid parameter, unknown method or layer, target out of range, corrupt image, "
            "more images than a job takes, or more passes or a larger result than a job may have",
            _429="this API key has as many queued or running jobs as it may (see Retry-After)",
            _503="the job queue or store is full (see Retry-After), or the service is starting",
        ),
    },
    response_class=Response,
)
async def submit_job(request: Request, services: ServicesDep, jobs: JobsDep, owner: OwnerDep) -> Response:
    settings = services.settings
    parsed = await parse_request(
        request, JobOptions, settings, image_field="images", many=True, max_images=settings.job_max_images
    )
    options = parsed.options
    if options.model in services.require_registry().names():  # a known name only, for the log line
        annotate(request.scope, model=options.model)
    if options.score:
        raise InvalidParameter(
            "score is for the synchronous explain route; submit task=evaluate", field="score"
        )
    if options.task == "evaluate":
        return await _submit_evaluation(options, parsed.images, services, jobs, owner)
    render = options.render()
    shown = render.resolve(get_method(options.method).rendering)  # refuses a bad combination now
    model = services.require_registry().get(options.model)
    pipeline.check_methods(model, [options.method], await pipeline.available_methods(model))
    if render.format is not None:
        choose_format(render.format, None, RESULT_FORMATS)
    params = options.engine_params(settings)
    targets = options.targets(len(parsed.images), model.num_classes)
    spec, result_bytes = await jobs.plan(
        model,
        options.method,
        params,
        targets,
        images=len(parsed.images),
        keep_attributions=render.reduction == "none" or shown.colormap == RGB,
        keep_inputs=render.format == "overlay",
        options=render.as_dict(),
    )
    await run_in_threadpool(_check_images, settings, model, parsed.images)
    record = await jobs.submit(spec, result_bytes, parsed.images, owner=owner)
    return _job_response(record, 202, {"Location": f"/v1/jobs/{record.id}"})


async def _submit_evaluation(
    options: JobOptions, images: list[bytes], services: Any, jobs: JobService, owner: str | None
) -> Response:
    """``task=evaluate``: the evaluation's parameters, methods and passes checked, then queued."""
    settings = services.settings
    evaluation = evaluate_params(options)
    if "pointing" in evaluation.metric_list:
        raise InvalidParameter(
            "pointing needs a box for each image: use POST /v1/models/{model}/evaluate", field="metrics"
        )
    if options.top_k != 1:
        raise InvalidParameter(
            "task=evaluate explains one target per image: give target, or top_k=1", field="top_k"
        )
    methods = options.method_list()
    check_evaluation(evaluation, methods)
    model = services.require_registry().get(options.model)
    pipeline.check_methods(model, methods, await pipeline.available_methods(model))
    if options.render().format not in (None, "json"):
        raise InvalidParameter("an evaluate job's result is JSON", field="format")
    params = options.engine_params(settings)
    targets = options.targets(len(images), model.num_classes)
    spec, result_bytes = await jobs.plan_evaluation(
        model, methods, params, evaluation, targets, images=len(images)
    )
    await run_in_threadpool(_check_images, settings, model, images)
    record = await jobs.submit(spec, result_bytes, images, owner=owner)
    return _job_response(record, 202, {"Location": f"/v1/jobs/{record.id}"})


@router.get(
    "/{job_id}",
    summary="A job's status and progress",
    response_model=Job,
    responses={
        200: {
            "description": "the job (with Retry-After while it is queued or running)",
            "headers": _RETRY_AFTER,
            "content": {"application/json": {"example": JOB_EXAMPLE}},
        },
        **_problems(_404=_NOT_FOUND, _410=_GONE),
    },
    response_class=Response,
)
async def get_job(job_id: str, jobs: JobsDep, owner: OwnerDep) -> Response:
    return _job_response(await jobs.get(job_id, owner=owner))


@router.delete(
    "/{job_id}",
    summary="Cancel a job: a queued one never starts, a running one stops at its next chunk",
    response_model=Job,
    responses={
        200: {"description": "the job after cancelling (a finished job is unchanged)"},
        **_problems(_404=_NOT_FOUND, _410=_GONE),
    },
    response_class=Response,
)
async def cancel_job(job_id: str, jobs: JobsDep, owner: OwnerDep) -> Response:
    return _job_response(await jobs.cancel(job_id, owner=owner))


@router.get(
    "/{job_id}/result",
    summary="A finished job's explanations: JSON (default), or PNG/overlay/npy of one image",
    description="JSON: the explain JSON with one entry per image and target, in upload order, each "
    "with its `image_index`. `format=png|overlay|npy` with `index=i` for image i. Rendering "
    "options given here override those given at submission.",
    responses={
        200: {
            "description": "the result",
            "content": {
                "application/json": {},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **_problems(
            _404=_NOT_FOUND,
            _406="no acceptable output format",
            _409="the job has not succeeded (yet): see its status",
            _410=_GONE,
            _422="invalid index or rendering option, or an overlay of a job not submitted with "
            "format=overlay",
        ),
    },
    response_class=Response,
)
async def job_result(
    job_id: str,
    request: Request,
    services: ServicesDep,
    jobs: JobsDep,
    owner: OwnerDep,
    format: Annotated[Format | None, Query(description="json (default), png, overlay or npy")] = None,
    index: Annotated[int, Query(ge=0, description="the image shown by png, overlay and npy")] = 0,
    overrides: Annotated[
        dict[str, Any], Depends(render_query(exclude=frozenset({"format"})))
    ] = _NO_OVERRIDES,
) -> Response:
    if (await jobs.get(job_id, owner=owner)).spec.task == "evaluate":
        if (format or overrides.get("format")) not in (None, "json"):
            raise InvalidParameter("an evaluate job's result is JSON", field="format")
        choose_format(None, request.headers.get("accept"), ("json",))
        _, data = await jobs.result_bytes(job_id, owner=owner)
        return Response(data, media_type="application/json")
    record, result = await jobs.result(job_id, owner=owner)
    render = RenderParams.from_values({**record.spec.options, **overrides}).resolve(
        get_method(record.spec.method).rendering
    )
    fmt = choose_format(format or render.format, request.headers.get("accept"), RESULT_FORMATS)
    _check_kept(record, result, render, fmt)
    model = services.require_registry().get(record.spec.model)
    image = None
    if fmt == "overlay":
        if not 0 <= index < record.spec.images:
            raise InvalidParameter(f"index must be in [0, {record.spec.images})", field="index")
        image = await jobs.image(job_id, index, owner=owner)
    expl = result.explanation
    channels = 1 if expl.attributions is None else int(expl.attributions.shape[2])
    shape = budget.answer(
        fmt, render, result.geometries, targets=int(expl.maps.shape[1]), channels=channels, index=index
    )
    stream = budget.check(services.settings, shape) > budget.STREAM_BYTES
    targets = record.spec.target_set()
    return await run_in_threadpool(
        _render, services.settings, fmt, model, result, targets, render, index, image, stream
    )


# ------------------------------------------------------------------------------------------------
# helpers (run in a worker thread)
# ------------------------------------------------------------------------------------------------
def _check_kept(record: JobRecord, result: JobResult, render: RenderParams, fmt: str) -> None:
    """``InvalidParameter`` when the result needs what the job did not keep: its uploads (an
    overlay), per-channel attributions (``reduction=none``; ``colormap=rgb`` in a picture)."""
    if fmt == "overlay" and not record.spec.keep_inputs:
        raise InvalidParameter(
            "this job kept no input images to draw on; submit it with format=overlay to get overlays",
            field="format",
        )
    if result.explanation.attributions is not None or record.spec.keep_attributions:
        return
    for field, wanted, formats in (
        ("reduction", "none", RESULT_FORMATS),
        ("colormap", RGB, ("png", "overlay")),
    ):
        if getattr(render, field) == wanted and fmt in formats:
            raise InvalidParameter(
                f"this job kept no per-channel attributions; submit it with {field}={wanted} to get them",
                field=field,
            )


def _check_images(settings: Settings, model: LoadedModel, images: list[bytes]) -> None:
    """Decode and preprocess every upload now, so a bad one is refused before the job is queued."""
    for i, data in enumerate(images):
        try:
            image = decode_upload(data, settings)
            model.preprocess(image)
        except SaliencyError as exc:
            exc.message = f"images[{i}]: {exc.message}"
            exc.field = f"images.{i}"
            raise


@cache
def _placeholder() -> Image.Image:
    """Stands in for an upload that is not drawn: JSON, npy and PNG heatmaps need only its geometry."""
    return Image.new("RGB", (1, 1))


def _render(
    settings: Settings,
    fmt: str,
    model: LoadedModel,
    result: JobResult,
    targets: Targets,
    render: RenderParams,
    index: int,
    image_bytes: bytes | None,
    stream: bool,
) -> Response:
    empty = torch.empty(0)

    def item(i: int, geometry: Geometry) -> Prepared:
        image = _placeholder()
        if image_bytes is not None and i == index:
            image = decode_upload(image_bytes, settings)
        return Prepared(image=image, x=empty, geometry=geometry)

    items = [item(i, g) for i, g in enumerate(result.geometries)]
    return render_explanation(
        fmt,
        model,
        result.explanation,
        items,
        targets,
        render,
        elapsed_ms=result.elapsed_ms,
        index=index,
        image_indices=True,
        stream=stream,
    )
