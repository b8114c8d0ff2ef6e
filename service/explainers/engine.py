"""The engine's entry points: ``explain`` and ``predict``."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidParameter
from service.explainers.base import (
    CancelFn,
    ExplainParams,
    Explanation,
    ModelHandle,
    ProgressFn,
    RunContext,
    check_target_range,
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


def target_pairs(targets: TargetSpec, n: int) -> Tensor:
    """The given targets as (N, K) int64, one or more per image (range checked later)."""
    t = torch.as_tensor(targets, dtype=torch.int64)
    if t.dim() == 1:
        t = t.view(-1, 1)
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1:
        raise InvalidParameter(f"need one or more targets for each of the {n} images", field="target")
    return t


def resolve_targets(logits: Tensor, targets: TargetSpec, top_k: int) -> Tensor:
    """(N, K) int64 class indices: the given ones (checked against the class count) or the top-k."""
    n, num_classes = logits.shape
    if targets is None:
        if not 1 <= top_k <= num_classes:
            raise InvalidParameter(f"top_k must be in [1, {num_classes}] (got {top_k})", field="top_k")
        return logits.topk(top_k, dim=1).indices
    t = target_pairs(targets, n)
    check_target_range(t, num_classes)
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
    # A method whose own first pass sees every clean row (``picks_targets``) supplies the scores,
    # and the top-1 targets, from that pass: no forward pass of the engine's own. Top-k needs the
    # logits before the method runs, so it keeps the separate pass.
    given = None if targets is None else target_pairs(targets, n)
    own_pass = m.picks_targets and (given is not None or top_k == 1)
    with handle.lock:
        model = handle.prepared(keep=layer)
        xd = x.detach().to(handle.device, torch.float32)
        ctx = RunContext(
            handle=handle,
            model=model,
            params=params,
            progress=progress,
            cancel=cancel,
            layer=layer,
            picked=[] if own_pass else None,
            pick_top1=given is None,
        )
        if own_pass:  # the method's pass checks the range of given targets, or chooses them
            tk = given if given is not None else torch.full((n, 1), -1, dtype=torch.int64)
        else:
            with torch.inference_mode():
                logits = torch.cat([ctx.forward(xd[sl]) for sl in ctx.chunks(n)])
            tk = resolve_targets(logits.cpu(), given, top_k)
        tk = tk.to(handle.device)
        k = tk.shape[1]
        pairs_x = xd.repeat_interleave(k, dim=0) if k > 1 else xd
        ctx.total_passes = m.passes(params) * n * k
        out = m.attribute(ctx, pairs_x, tk.reshape(-1))
    if ctx.picked is not None:
        scored = sum(t.shape[0] for _, t in ctx.picked)
        if scored != n * k:
            raise RuntimeError(f"{m.name} scored {scored} of its {n * k} rows")
        pair_logits = torch.cat([lg for lg, _ in ctx.picked])
        tk = torch.cat([t for _, t in ctx.picked]).view(n, k)
    else:
        pair_logits = logits.repeat_interleave(k, dim=0) if k > 1 else logits
    pair_t = tk.reshape(-1, 1)
    scores = pair_logits.softmax(dim=1).gather(1, pair_t).view(n, k)
    target_logits = pair_logits.gather(1, pair_t).view(n, k)

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
        scores=scores.cpu(),
        logits=target_logits.cpu(),
        attributions=None
        if attributions is None
        else attributions.float().reshape(n, k, *attributions.shape[1:]).cpu(),
        completeness_delta=None if out.delta is None else out.delta.float().reshape(n, k).cpu(),
        signed=m.signed,
    )
