"""Deletion and insertion curves (Petsiuk, Das & Saenko, "RISE", BMVC 2018, §4.1), batched.

Followed to the letter of the contract (``shared/API.md``, "Evaluate"), so the numbers compare
with other implementations:

- the model input's pixels are ranked by the map at the model's input resolution, highest
  first, ties in raster order (a stable sort);
- stage k of ``steps`` (k = 0 … steps) has the first ``round(k·H·W / steps)`` ranked pixels
  replaced: deletion puts the substitute there, insertion starts from the substitute and puts
  the original pixels back there. ``round`` is Python's (halves to even), computed exactly on
  the fraction;
- the curve is the target's softmax probability at every stage; its AUC the trapezoid rule over
  the fractions k / steps, 0 … 1;
- substitutes, of the *normalised* input: ``blur`` is
  ``torchvision.transforms.functional.gaussian_blur(x, kernel_size=11, sigma=5)`` (RISE's
  values), ``black`` the normalised black image, ``mean`` the image's per-channel mean.

Every stage of every curve is one row of a stream of model inputs, built a chunk at a time
(``batch_size`` rows: a mask comparison against each pixel's rank, so a chunk costs one
``torch.where``) and run as one no-grad forward pass: 2 × (steps + 1) rows for both curves,
where the papers' reference code runs a pass per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torchvision.transforms.functional as TF
from torch import Tensor

from service.errors import Cancelled, InvalidParameter

#: RISE's blur: kernel 11, σ 5
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

Forward = Callable[[Tensor], Tensor]  # a batch of inputs → logits (n, classes)
CancelFn = Callable[[], bool]


def ranks(m: Tensor) -> Tensor:
    """Each pixel's position (0 = first replaced) in the map's order: highest first, ties in
    raster order. ``m`` is (H, W); the result (H·W,) int64, in raster order."""
    flat = torch.nan_to_num(m.detach().flatten().float(), nan=float("-inf"))
    order = torch.sort(flat, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos


def stage_counts(pixels: int, steps: int) -> list[int]:
    """Pixels replaced at stages 0 … steps: ``round(k · pixels / steps)``, exactly."""
    return [round(Fraction(k * pixels, steps)) for k in range(steps + 1)]


def fractions(steps: int) -> list[float]:
    """The x axis of a curve: k / steps for k = 0 … steps."""
    return [k / steps for k in range(steps + 1)]


def auc(curve: Sequence[float] | Tensor) -> float:
    """The trapezoid rule over the fractions 0 … 1 (equally spaced stages)."""
    y = torch.as_tensor(curve, dtype=torch.float64)
    steps = y.numel() - 1
    if steps < 1:
        raise ValueError("a curve needs at least two stages")
    return float(torch.trapezoid(y, dx=1.0 / steps))


def substitute_image(x: Tensor, kind: str, black: Tensor) -> Tensor:
    """The substitute of one normalised input ``x`` (C, H, W); ``black``: the normalised value
    of intensity 0 per channel, (C, 1, 1)."""
    if kind == "blur":
        if min(x.shape[-2:]) <= BLUR_KERNEL // 2:
            raise InvalidParameter(
                f"substitute=blur needs an input larger than {BLUR_KERNEL // 2} px a side", field="substitute"
            )
        blurred: Tensor = TF.gaussian_blur(
            x, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[BLUR_SIGMA, BLUR_SIGMA]
        )
        return blurred
    if kind == "black":
        return black.to(x.device, x.dtype).expand_as(x).clone()
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
    raise InvalidParameter(f"unknown substitute {kind!r}", field="substitute")


@dataclass(frozen=True)
class CurveTask:
    """One curve: which input (an index into the inputs), its substitute, the pixels' ranks,
    deletion or insertion, and the class whose probability is followed."""

    image: int
    substitute: Tensor  # (C, H, W), on the inputs' device
    ranks: Tensor  # (H·W,) int64, on the inputs' device
    kind: str  # "deletion" | "insertion"
    target: int


def stage_inputs(x: Tensor, task: CurveTask, counts: Tensor, stages: slice) -> Tensor:
    """Stages ``stages`` of one curve as a batch (n, C, H, W)."""
    _c, h, w = x.shape
    replaced = (task.ranks.view(1, -1) < counts[stages].view(-1, 1)).view(-1, 1, h, w)
    if task.kind == "deletion":
        return torch.where(replaced, task.substitute, x)
    if task.kind == "insertion":
        return torch.where(replaced, x, task.substitute)
    raise ValueError(f"unknown curve {task.kind!r}")


def run_curves(
    forward: Forward,
    xs: Tensor,
    tasks: Sequence[CurveTask],
    steps: int,
    *,
    batch_size: int,
    cancel: CancelFn | None = None,
    advance: Callable[[int], None] | None = None,
) -> Tensor:
    """The curves of ``tasks`` over inputs ``xs`` (N, C, H, W): (len(tasks), steps + 1) softmax
    probabilities, float64 on the CPU. All stages of all curves are one stream of rows, run
    ``batch_size`` at a time."""
    per = steps + 1
    total = len(tasks) * per
    _, _, h, w = xs.shape
    counts = torch.tensor(stage_counts(h * w, steps), dtype=torch.int64, device=xs.device)
    targets = torch.tensor([t.target for t in tasks], dtype=torch.int64, device=xs.device)
    out = torch.empty(total, dtype=torch.float64)
    step = max(1, batch_size)
    for start in range(0, total, step):
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the caller")
        stop = min(total, start + step)
        parts: list[Tensor] = []
        g = start
        while g < stop:
            t, k = divmod(g, per)
            end = min(stop, (t + 1) * per)
            task = tasks[t]
            parts.append(stage_inputs(xs[task.image], task, counts, slice(k, k + end - g)))
            g = end
        batch = torch.cat(parts)
        rows = torch.arange(start, stop, device=xs.device) // per
        with torch.inference_mode():
            probs = forward(batch).float().softmax(dim=1)
        out[start:stop] = probs.gather(1, targets[rows].view(-1, 1)).squeeze(1).double().cpu()
        if advance is not None:
            advance(stop - start)
    return out.view(len(tasks), per)
