"""OpenAPI documentation of the image routes, derived from the parameter models and the registry.

Image routes read their body themselves (multipart *or* JSON, see ``service.api.request``), so
FastAPI cannot infer it; ``image_request_body`` describes both content types from the route's
pydantic options model, with the method enum taken from the engine's registry. In the multipart
variant ``image`` is a binary string, which Swagger UI shows as a file picker.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from service.api.options import RequestOptions, field_order
from service.api.responses import resolved_parameters
from service.api.schemas import Problem
from service.evaluation import EvaluateParams
from service.explainers import ExplainParams, Targets, get_method
from service.imaging.options import RenderParams

# the order of a route's fields in its schemas: the route's own, the targets, then the engine's and
# the rendering parameters in declaration order
ORDER = (
    "model",
    "task",
    "method",
    "methods",
    "target",
    "top_k",
    *field_order(EvaluateParams),
    "score",
    *field_order(ExplainParams, RenderParams),
)

# a valid 16×16 PNG (a colour ramp): the JSON example Swagger UI pre-fills
TINY_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAHElEQVR42mNkYGAQIAWxMDAIMJACRjWMahg6GgCWfAIezUhyVgAAAABJRU5ErkJggg=="


def _flatten(prop: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, null]`` → X (keeping title, description, default, enum): simple form fields."""
    options = prop.get("anyOf")
    if not options:
        return prop
    kept = [o for o in options if o.get("type") != "null"]
    if len(kept) != 1:
        return prop
    flat = {k: v for k, v in prop.items() if k != "anyOf"}
    flat.update({k: v for k, v in kept[0].items() if k not in flat})
    if flat.get("default") is None:
        flat.pop("default", None)
    return flat


def options_schema(options_type: type[BaseModel]) -> dict[str, Any]:
    """The options model's JSON Schema with flattened, ordered properties."""
    schema = options_type.model_json_schema()
    props: dict[str, Any] = {name: _flatten(p) for name, p in schema.get("properties", {}).items()}
    ordered = {name: props[name] for name in ORDER if name in props}
    ordered.update({k: v for k, v in props.items() if k not in ordered})
    return {"type": "object", "properties": ordered, "required": list(schema.get("required", []))}


def image_request_body(
    options_type: type[RequestOptions],
    *,
    image_field: str = "image",
    many: bool = False,
    example: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``openapi_extra`` for a route that takes images: multipart/form-data and application/json.
    The JSON example holds a tiny PNG and every default; ``example``: values of required
    parameters without a default (it must validate against the schema)."""
    base = options_schema(options_type)
    binary = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    b64 = {"type": "string", "contentEncoding": "base64", "description": "the image file, base64-encoded"}
    form = copy.deepcopy(base)
    body = copy.deepcopy(base)
    if many:
        form_image: dict[str, Any] = {
            "type": "array",
            "items": binary,
            "description": "image files (repeat the field)",
        }
        json_image: dict[str, Any] = {"type": "array", "items": b64, "minItems": 1}
    else:
        form_image = {**binary, "description": "the image file (JPEG, PNG, WebP, BMP, TIFF, GIF)"}
        json_image = b64
    for prop in form["properties"].values():
        if "default" not in prop:
            # Swagger UI pre-fills a form field with a made-up sample (0, "string") unless the
            # schema gives an example: an empty one keeps optional fields empty (sent as "" and
            # read as unset by the parser)
            prop["examples"] = [""]
    form["properties"] = {image_field: form_image, **form["properties"]}
    body["properties"] = {image_field: json_image, **body["properties"]}
    for s in (form, body):
        s["required"] = [image_field, *s["required"]]
    defaults = {k: p["default"] for k, p in base["properties"].items() if "default" in p}
    example = {image_field: [TINY_PNG_BASE64] if many else TINY_PNG_BASE64, **defaults, **(example or {})}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": body, "example": example},
            },
        }
    }


PNG_DOC = {"schema": {"type": "string", "format": "binary"}, "example": "(a PNG image)"}
NPY_DOC = {"schema": {"type": "string", "format": "binary"}, "example": "(a NumPy .npy file)"}
IMAGE_HEADERS = {
    "X-Target-Index": {"description": "class index explained", "schema": {"type": "integer"}},
    "X-Target-Label": {
        "description": "its label (percent-encoded if not ASCII)",
        "schema": {"type": "string"},
    },
    "X-Target-Score": {"description": "its softmax probability", "schema": {"type": "number"}},
    "X-Elapsed-Ms": {"description": "time spent on the request", "schema": {"type": "number"}},
}

_PROBLEM = {
    "model": Problem,
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Documented problem+json error responses."""
    descriptions = {
        404: "unknown model (the detail lists the known ones)",
        406: "no acceptable output format",
        413: "upload or decoded image too large",
        415: "not an image of a supported type",
        422: "invalid parameter, unknown method or layer, target out of range, corrupt image, or too "
        "heavy for a synchronous request (use /v1/jobs)",
        503: "overloaded (see Retry-After) or models still loading",
        504: "deadline exceeded",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {**copy.deepcopy(_PROBLEM), "description": descriptions.get(s, "error")}
    return out


EXPLAIN_EXAMPLE: dict[str, Any] = {
    "model": "efficientnet_lite0",
    "method": "gradcam",
    "parameters": resolved_parameters(
        "gradcam",
        Targets.top(1),
        ExplainParams(layer="bn2", seed=1234),
        RenderParams().resolve(get_method("gradcam").rendering),
        fmt="json",
    ),
    "elapsed_ms": 61.2,
    "explanations": [
        {
            "target": {"index": 285, "label": "Egyptian cat", "score": 0.79},
            "shape": [2, 3],
            "heatmap": [[0.0, 0.41, 0.2], [0.63, 1.0, 0.37]],
            "min": 0.0,
            "max": 3.84,
            "completeness_delta": None,
        }
    ],
}


def explain_responses() -> dict[int | str, dict[str, Any]]:
    from service.api.schemas import ExplainResponse

    return {
        200: {
            "description": "the heatmap: PNG (format png or overlay), JSON or .npy",
            "model": ExplainResponse,
            "headers": IMAGE_HEADERS,
            "content": {
                "image/png": PNG_DOC,
                "application/json": {"example": EXPLAIN_EXAMPLE},
                "application/x-npy": NPY_DOC,
            },
        },
        **problem_responses(404, 406, 413, 415, 422, 503, 504),
    }


def compare_responses() -> dict[int | str, dict[str, Any]]:
    from service.api.schemas import CompareResponse

    return {
        200: {
            "description": "one labelled PNG grid (the input and an overlay per method), or JSON",
            "model": CompareResponse,
            "headers": IMAGE_HEADERS,
            "content": {
                "image/png": PNG_DOC,
                "application/json": {
                    "example": {
                        "model": "efficientnet_lite0",
                        "methods": ["gradcam"],
                        "elapsed_ms": 70.3,
                        "results": [EXPLAIN_EXAMPLE],
                    }
                },
            },
        },
        **problem_responses(404, 406, 413, 415, 422, 503, 504),
    }


EVALUATE_EXAMPLE: dict[str, Any] = {
    "model": "efficientnet_lite0",
    "target": {"index": 285, "label": "Egyptian cat", "score": 0.79},
    "parameters": {"methods": ["gradcam"], **EvaluateParams(curve_steps=4).requested(), "seed": 1234},
    "elapsed_ms": 412.0,
    "results": [
        {
            "method": "gradcam",
            "deletion_auc": 0.118,
            "insertion_auc": 0.612,
            "random": {"deletion_auc": 0.402, "insertion_auc": 0.311},
            "curves": {
                "deletion": [0.79, 0.21, 0.05, 0.02, 0.01],
                "insertion": [0.02, 0.45, 0.71, 0.77, 0.79],
            },
        }
    ],
}


def evaluate_responses() -> dict[int | str, dict[str, Any]]:
    from service.api.schemas import EvaluateResponse

    return {
        200: {
            "description": "the scores (JSON), or a plot of the curves (format=png)",
            "model": EvaluateResponse,
            "content": {"application/json": {"example": EVALUATE_EXAMPLE}, "image/png": PNG_DOC},
        },
        **problem_responses(404, 406, 413, 415, 422, 503, 504),
    }


def predict_responses() -> dict[int | str, dict[str, Any]]:
    from service.api.schemas import PredictResponse

    return {
        200: {
            "description": "the top-k classes",
            "model": PredictResponse,
            "content": {
                "application/json": {
                    "example": {
                        "model": "efficientnet_lite0",
                        "predictions": [
                            {"index": 285, "label": "Egyptian cat", "probability": 0.79},
                            {"index": 281, "label": "tabby", "probability": 0.09},
                        ],
                        "elapsed_ms": 12.5,
                    }
                }
            },
        },
        **problem_responses(404, 406, 413, 415, 422, 503, 504),
    }


# ------------------------------------------------------------------------------------------------
# security: the API keys (Swagger UI's "Authorize" button)
# ------------------------------------------------------------------------------------------------
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: <API key>"},
}


def install_security(app: FastAPI, *, required: bool, open_paths: frozenset[str]) -> None:
    """Document the API keys on every protected operation. ``required`` (keys configured): a
    key is needed; otherwise the schemes are listed as optional (``{}`` among the alternatives),
    so the same schema reads right for a server with keys and one without."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        alternatives: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
        if not required:
            alternatives.append({})
        for path, operations in schema.get("paths", {}).items():
            if path in open_paths:
                continue
            for operation in operations.values():
                operation["security"] = alternatives
                operation.setdefault("responses", {}).setdefault(
                    "401",
                    {
                        "description": "no API key, or an unknown one (when the server requires keys)",
                        "content": {
                            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                        },
                    },
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------------
# the compatibility routes (``service.api.routes.compat``)
# ------------------------------------------------------------------------------------------------
_B64 = {"type": "string", "contentEncoding": "base64", "description": "the image file, base64-encoded"}
_BINARY = {"type": "string", "format": "binary"}
COMPAT_ERRORS = (404, 406, 413, 415, 422, 503, 504)


def _kserve_body(options_type: type[RequestOptions]) -> dict[str, Any]:
    from service.api.request import INSTANCE_KEYS

    value = {"anyOf": [_B64, {"type": "object", "properties": {"b64": _B64}, "required": ["b64"]}]}
    instance = {
        "anyOf": [
            _B64,
            {
                "type": "object",
                "properties": {k: value for k in INSTANCE_KEYS},
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": False,
            },
        ],
        "description": 'the image: {"image": {"b64": …}} (KServe), {"image_bytes": {"b64": …}}, '
        '{"b64": …} (TF Serving), {"data": …} (TorchServe\'s KServe envelope), or the base64 string',
    }
    parameters = {**options_schema(options_type), "additionalProperties": False}
    parameters["description"] = "the route's parameters, as in the native route's JSON body"
    schema = {
        "type": "object",
        "properties": {
            "instances": {
                "type": "array",
                "items": instance,
                "minItems": 1,
                "description": "one image per instance (at most SALIENCY_MAX_SYNC_IMAGES); `inputs` "
                "is read the same way",
            },
            "parameters": parameters,
        },
        "required": ["instances"],
    }
    example = {"instances": [{"image": {"b64": TINY_PNG_BASE64}}], "parameters": {}}
    return {"required": True, "content": {"application/json": {"schema": schema, "example": example}}}


def kserve_predict_doc() -> dict[str, Any]:
    from service.api.options import PredictOptions
    from service.api.schemas import KServePredictResponse

    return {
        "extra": {"requestBody": _kserve_body(PredictOptions)},
        "responses": {
            200: {
                "description": "one list per instance: its top_k classes, best first",
                "model": KServePredictResponse,
                "content": {"application/json": {}},
            },
            **problem_responses(*COMPAT_ERRORS),
        },
    }


def kserve_explain_doc() -> dict[str, Any]:
    from service.api.options import ExplainOptions
    from service.api.schemas import KServeExplainResponse

    return {
        "extra": {"requestBody": _kserve_body(ExplainOptions)},
        "responses": {
            200: {
                "description": "the explain JSON's entries: one per instance (and target, with "
                "top_k), in instance order, each with its image_index",
                "model": KServeExplainResponse,
                "content": {"application/json": {}},
            },
            **problem_responses(*COMPAT_ERRORS),
        },
    }


def _torchserve_extra(options_type: type[RequestOptions]) -> dict[str, Any]:
    """The image as the body or multipart ``data``; the parameters in the query string."""
    props = options_schema(options_type)["properties"]
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {k: v for k, v in prop.items() if k != "description"},
            "description": prop.get("description", ""),
        }
        for name, prop in props.items()
    ]
    form = {
        "type": "object",
        "properties": {"data": {"type": "array", "items": _BINARY, "description": "image files"}},
        "required": ["data"],
    }
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "description": "the image file as the body (any content type but multipart: "
            "`curl -T kitten.jpg`), or multipart/form-data with the file(s) in `data`",
            "content": {
                "application/octet-stream": {"schema": _BINARY},
                "multipart/form-data": {"schema": form},
            },
        },
    }


def torchserve_predict_doc() -> dict[str, Any]:
    from service.api.options import PredictOptions

    answer = {"type": "object", "additionalProperties": {"type": "number"}}
    return {
        "extra": _torchserve_extra(PredictOptions),
        "responses": {
            200: {
                "description": "{label: probability} of the top_k (default 5) classes; a list of "
                "them when several images were sent",
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [answer, {"type": "array", "items": answer}]},
                        "example": {"Egyptian cat": 0.79, "tabby": 0.09},
                    }
                },
            },
            **problem_responses(*COMPAT_ERRORS),
        },
    }


def torchserve_explain_doc() -> dict[str, Any]:
    from service.api.options import ExplainOptions

    return {
        "extra": _torchserve_extra(ExplainOptions),
        "responses": {
            200: {
                "description": "one nested-list attribution per image: [H, W] ([C, H, W] with "
                "reduction=none; with top_k > 1 the list of each target's)",
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": {"type": "array"}},
                        "example": [[[0.0, 0.41, 0.2], [0.63, 1.0, 0.37]]],
                    }
                },
            },
            **problem_responses(*COMPAT_ERRORS),
        },
    }
