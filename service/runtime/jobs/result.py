"""A finished job's result as bytes: the engine's ``Explanation`` plus each image's geometry.

Encoded with ``torch.save`` and read back with ``torch.load(weights_only=True)``: only tensors,
numbers, strings, lists and dicts, so a result read from Redis can never run code. Maps stay at
the model's resolution; the API maps them onto each upload's geometry when it renders them.

``encoded_size`` predicts the encoding's length before anything runs, so a job whose result the
store could not hold is refused at submission; it sits next to ``encode`` so the two change
together (a unit test holds it to the real length).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import torch

from service.explainers import ExplainParams, Explanation
from service.imaging.geometry import Geometry


@dataclass
class JobResult:
    explanation: Explanation  # (N, K, …) over the job's images in upload order
    geometries: list[Geometry]
    elapsed_ms: float  # compute time, from start to finish on the worker


def concat(parts: list[Explanation]) -> Explanation:
    """One explanation of all images from explanations of consecutive groups of them."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(p, name) for p in parts]
        return None if any(t is None for t in tensors) else torch.cat(tensors)

    maps, targets, scores, logits = (cat(n) for n in ("maps", "targets", "scores", "logits"))
    assert maps is not None and targets is not None and scores is not None and logits is not None
    return Explanation(
        method=first.method,
        params=first.params,
        maps=maps,
        targets=targets,
        scores=scores,
        logits=logits,
        attributions=cat("attributions"),
        completeness_delta=cat("completeness_delta"),
        signed=first.signed,
    )


# torch.save's zip archive: one record per tensor storage (local and central headers, the
# 64-byte alignment of its data) and per-image geometry in the pickle; a fixed part for the rest
_PER_TENSOR = 200
_PER_IMAGE = 128
_FIXED = 3072


def encoded_size(
    images: int, per_image: int, input_size: tuple[int, int, int], *, keep_attributions: bool
) -> int:
    """An upper estimate of ``len(encode(...))`` for ``images`` × ``per_image`` targets on a model
    whose input is ``input_size`` (C, H, W): float32 maps at the input's H×W, per-channel
    attributions when kept, and the (N, K) targets (int64), scores, logits and completeness deltas."""
    c, h, w = input_size
    cells = images * per_image
    data = cells * h * w * 4 + cells * (8 + 4 + 4 + 4)
    tensors = 5
    if keep_attributions:
        data += cells * c * h * w * 4
        tensors += 1
    return data + tensors * _PER_TENSOR + images * _PER_IMAGE + _FIXED


def encode(result: JobResult, *, keep_attributions: bool) -> bytes:
    e = result.explanation
    payload: dict[str, Any] = {
        "version": 1,
        "method": e.method,
        "params": asdict(e.params),
        "signed": e.signed,
        "maps": e.maps.contiguous(),
        "targets": e.targets.contiguous(),
        "scores": e.scores.contiguous(),
        "logits": e.logits.contiguous(),
        "attributions": e.attributions.contiguous()
        if keep_attributions and e.attributions is not None
        else None,
        "completeness_delta": e.completeness_delta,
        "geometries": [asdict(g) for g in result.geometries],
        "elapsed_ms": float(result.elapsed_ms),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def decode(data: bytes) -> JobResult:
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    explanation = Explanation(
        method=payload["method"],
        params=ExplainParams(**payload["params"]),
        maps=payload["maps"],
        targets=payload["targets"],
        scores=payload["scores"],
        logits=payload["logits"],
        attributions=payload["attributions"],
        completeness_delta=payload["completeness_delta"],
        signed=bool(payload["signed"]),
    )
    geometries = [Geometry(**{**g, "crop_box": tuple(g["crop_box"])}) for g in payload["geometries"]]
    return JobResult(explanation, geometries, float(payload["elapsed_ms"]))
