"""The engine's entry points: ``explain`` and ``predict``."""

from __future__ import annotations

import secrets

import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidParameter
from service.explainers.base import (
    Attribution,
    CancelFn,
    Explanation,
    Method,
    ModelHandle,
    ProgressFn,
    RunContext,
    get_method,
)
from service.explainers.layers import NCHW
from service.explainers.params import ExplainParams
from service.explainers.precision import resolve_precision
from service.explainers.targets import Targets, choose_top_k


def predict(handle: ModelHandle, x: Tensor, *, batch_size: int = 32) -> Tensor:
    """Float32 logits (N, num_classes) of the shared model, on the CPU. Thread-safe: no hooks."""
    x = x.to(handle.device, torch.float32)
    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            outs.append(handle.module(x[start : start + batch_size]).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, 0)


def explain(
    handle: ModelHandle,
    x: Tensor,
    method: str,
    params: ExplainParams | None = None,
    *,
    targets: Targets | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Explanation:
    """Explain each image of ``x`` (N, C, H, W, already normalised) for its ``targets``
    (default: each image's top-1 predicted class).

    ``x`` is never modified. Holding the replica's lock, the method runs on the handle's private
    copy; hooks are gone again when this returns or raises.
    """
    m = get_method(method)
    targets = targets or Targets.top(1)
    n, k = _check_input(x, targets), targets.per_image
    if handle.input_size is None:  # a library caller's handle: measure the model at the size it is fed
        handle.input_size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    params = resolve_params(m, handle, params or ExplainParams.request())
    with handle.lock:
        ctx = RunContext(
            handle=handle,
            model=handle.prepared(
                keep=params.layer if m.needs_layer else None,
                precision="bf16" if params.precision == "bf16" else "fp32",
            ),
            params=params,
            progress=progress,
            cancel=cancel,
            layer=params.layer if m.needs_layer else None,
            view=handle.layer_view(params.layer) if m.needs_layer and params.layer else NCHW,
        )
        xd = x.detach().to(handle.device, torch.float32)
        rows, logits = _target_rows(ctx, m, xd, targets)
        ctx.total_passes = m.passes(params) * n * k
        out = m.attribute(ctx, xd.repeat_interleave(k, dim=0) if k > 1 else xd, rows.reshape(-1))
    return _explanation(m, params, out, _scored(m, out, rows, logits), x.shape)


def resolve_params(m: Method, handle: ModelHandle, params: ExplainParams) -> ExplainParams:
    """The parameters a call runs with: the method's defaults where the request left them unset
    (``ExplainParams.for_method``) and within its own limits, the seed drawn when unset, the CAM layer resolved, and
    ``MethodNotApplicable`` unless the method applies to this model (its needs first, then its
    own ``check``; ``PrecisionUnavailable`` for bf16 where the device or the method cannot serve
    it, ``precision=auto`` resolved (``precision.resolve_precision``)), and ``batch_size`` clamped to what the model's memory budget allows
    (``ModelHandle.max_batch``: a memory knob, never a result one). The job service calls this at
    submission, so a job's seed and layer are fixed before it is queued."""
    params = params.for_method(m.defaults)
    m.check_limits(params)
    m.require(handle, params)
    params = params.with_(precision=resolve_precision(m.name, params.precision, handle.device))
    if params.seed is None:
        params = params.with_(seed=secrets.randbits(62))
    if m.needs_layer:
        params = params.with_(layer=handle.resolve_layer(params.layer))
    m.check(handle, params)
    limit = handle.max_batch()
    if limit is not None and params.batch_size > limit:  # the model's memory budget
        params = params.with_(batch_size=limit)
    return params


def _check_input(x: Tensor, targets: Targets) -> int:
    if x.dim() != 4:
        raise InvalidParameter(f"expected a batch shaped (N, C, H, W), got {tuple(x.shape)}", field="image")
    n = int(x.shape[0])
    targets.check_images(n)
    return n


def _target_rows(ctx: RunContext, m: Method, x: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    """(N, K) targets for the method, and the logits (N, classes) of a scoring pass, if one ran.

    A method that scores its own targets (``picks_targets``) gets the explicit classes, or
    ``PREDICTED`` for top-1, and no pass runs here. Top-k needs the logits first: a separate
    forward pass, under the method's autocast, scores and chooses them.
    """
    if m.picks_targets and (targets.explicit or targets.top_k == 1):
        return targets.rows(int(x.shape[0])).to(x.device), None
    with torch.inference_mode():
        logits = torch.cat([ctx.forward(x[sl]) for sl in ctx.chunks(int(x.shape[0]))])
    return choose_top_k(logits, targets), logits


def _scored(m: Method, out: Attribution, rows: Tensor, logits: Tensor | None) -> tuple[Tensor, Tensor]:
    """(logits, target) of every (image, target) pair, from the scoring pass or the method's own."""
    k = rows.shape[1]
    if logits is not None:
        return (logits.repeat_interleave(k, dim=0) if k > 1 else logits), rows.reshape(-1)
    if out.logits is None or out.targets is None or out.targets.shape[0] != rows.numel():
        raise RuntimeError(f"{m.name} did not score each of its {rows.numel()} rows")
    return out.logits, out.targets


def _explanation(
    m: Method, params: ExplainParams, out: Attribution, scored: tuple[Tensor, Tensor], shape: torch.Size
) -> Explanation:
    """The method's flat result reshaped to (N, K, …), maps upsampled to the input, on the CPU."""
    n, _, h, w = shape
    pair_logits, pair_targets = scored
    k = pair_targets.shape[0] // n
    index = pair_targets.view(-1, 1)
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
        targets=pair_targets.view(n, k).cpu(),
        scores=pair_logits.softmax(dim=1).gather(1, index).view(n, k).cpu(),
        logits=pair_logits.gather(1, index).view(n, k).cpu(),
        attributions=None
        if attributions is None
        else attributions.float().reshape(n, k, *attributions.shape[1:]).cpu(),
        completeness_delta=None if out.delta is None else out.delta.float().reshape(n, k).cpu(),
        signed=m.signed,
    )
