"""The engine's entry points: ``explain`` and ``predict``."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidParameter, TargetOutOfRange
from service.explainers.base import (
    CancelFn,
    ExplainParams,
    Explanation,
    ModelHandle,
    ProgressFn,
    RunContext,
    get_method,
)

TargetSpec = Sequence[Sequence[int]] | Tensor | None


def predict(handle: ModelHandle, x: Tensor, *, batch_size: int = 32) -> Tensor:
    """Float32 logits (N, num_classes) of the shared model, on the CPU. Thread-safe: no hooks."""
    x = x.to(handle.device, torch.float32)
    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            outs.append(handle.module(x[start : start + batch_size]).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, 0)


def resolve_targets(logits: Tensor, targets: TargetSpec, top_k: int) -> Tensor:
    """(N, K) int64 class indices: the given ones (checked against the class count) or the top-k."""
    n, num_classes = logits.shape
    if targets is None:
        if not 1 <= top_k <= num_classes:
            raise InvalidParameter(f"top_k must be in [1, {num_classes}] (got {top_k})", field="top_k")
        return logits.topk(top_k, dim=1).indices
    t = torch.as_tensor(targets, dtype=torch.int64)
    if t.dim() == 1:
        t = t.view(-1, 1)
    if t.shape[0] != n or t.dim() != 2 or t.shape[1] < 1:
        raise InvalidParameter(f"need one or more targets for each of the {n} images", field="target")
    if bool(((t < 0) | (t >= num_classes)).any()):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise TargetOutOfRange(f"target {bad} is outside [0, {num_classes})", field="target")
    return t


def explain(
    handle: ModelHandle,
    x: Tensor,
    method: str,
    params: ExplainParams | None = None,
    *,
    targets: TargetSpec = None,
    top_k: int = 1,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Explanation:
    """Explain each image of ``x`` (N, C, H, W, already normalised) for its targets.

    ``targets``: one or more class indices per image; ``None`` explains each image's ``top_k``
    predicted classes. ``x`` is never modified. Holding the replica's lock, the method runs on
    the handle's private copy; hooks are gone again when this returns or raises.
    """
    m = get_method(method)
    params = (params or ExplainParams()).validate()
    if x.dim() != 4:
        raise InvalidParameter(f"expected a batch shaped (N, C, H, W), got {tuple(x.shape)}", field="image")
    if params.seed is None:
        params = params.with_(seed=secrets.randbits(62))
    layer = handle.resolve_layer(params.layer) if m.needs_layer else None
    if layer is not None:
        params = params.with_(layer=layer)
    m.check(handle, params)

    n, _, h, w = x.shape
    with handle.lock:
        model = handle.prepared(keep=layer)
        xd = x.detach().to(handle.device, torch.float32)
        with torch.inference_mode():
            logits = torch.cat(
                [model(xd[s : s + params.batch_size]).float() for s in range(0, n, params.batch_size)]
            )
        tk = resolve_targets(logits.cpu(), targets, top_k).to(handle.device)
        k = tk.shape[1]
        probs = logits.softmax(dim=1)
        pairs_x = xd.repeat_interleave(k, dim=0) if k > 1 else xd
        pairs_t = tk.reshape(-1)
        ctx = RunContext(
            handle=handle,
            model=model,
            params=params,
            total_passes=m.passes(params) * pairs_t.numel(),
            progress=progress,
            cancel=cancel,
            layer=layer,
        )
        out = m.attribute(ctx, pairs_x, pairs_t)

    maps = out.maps.float()
    if maps.dim() == 4:
        maps = maps.squeeze(1)
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    attributions = out.attributions
    return Explanation(
        method=m.name,
        params=params,
        maps=maps.reshape(n, k, h, w).cpu(),
        targets=tk.cpu(),
        scores=probs.gather(1, tk).cpu(),
        logits=logits.gather(1, tk).cpu(),
        attributions=None
        if attributions is None
        else attributions.float().reshape(n, k, *attributions.shape[1:]).cpu(),
        completeness_delta=None if out.delta is None else out.delta.float().reshape(n, k).cpu(),
        signed=m.signed,
    )
