"""Python client of saliency-service: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

from saliency_client import Client

with Client("http://127.0.0.1:8000", api_key=None) as c:
    r = c.explain("efficientnet_lite0", "cat.jpg", method="gradcam", format="json")
    print(r.target, r.parameters["layer"], r.array.shape)
"""

from saliency_client._core import ImageInput, ParamValue, RetryPolicy
from saliency_client.aio import AsyncClient
from saliency_client.client import Client
from saliency_client.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayTimeout,
    Gone,
    JobFailed,
    JobTimeout,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    RateLimited,
    SaliencyClientError,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from saliency_client.types import (
    CompareResult,
    EvaluateResult,
    ExplainResult,
    Heatmap,
    Job,
    LayerInfo,
    MethodInfo,
    MethodScores,
    ModelInfo,
    Prediction,
    PredictResult,
    Target,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "CompareResult",
    "Conflict",
    "EvaluateResult",
    "ExplainResult",
    "Forbidden",
    "GatewayTimeout",
    "Gone",
    "Heatmap",
    "ImageInput",
    "Job",
    "JobFailed",
    "JobTimeout",
    "LayerInfo",
    "MethodInfo",
    "MethodScores",
    "ModelInfo",
    "NotAcceptable",
    "NotFound",
    "ParamValue",
    "PayloadTooLarge",
    "PredictResult",
    "Prediction",
    "ProblemError",
    "RateLimited",
    "RetryPolicy",
    "SaliencyClientError",
    "ServerError",
    "ServiceUnavailable",
    "Target",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
]
