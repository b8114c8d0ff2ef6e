"""Deletion + insertion curves (``service.evaluation``) beside the explanation and a reference.

In one process, on the default model (efficientnet_lite0, its shipped weights) and the coffee
photo of ``skimage.data`` (224×224 model input), for Grad-CAM's map of the top-1 class:

- the Grad-CAM explanation itself (``engine.explain``);
- ``score_maps``: both curves, ``--steps`` stages each (2 × (steps + 1) rows, batched by
  ``--batch-size``, no gradient, on the private copy);
- the floor: the same number of bare forward passes of the private copy at the same batch size
  on inputs already built (the target: the curves cost at most this + 10 %);
- the references: a straightforward loop written from the contract, one unbatched forward pass
  per stage (as the papers' reference code does), on the served model, whose curves are checked
  against ours; and, when ``quantus`` is installed (``pip install quantus``, not a dependency),
  Quantus' ``PixelFlipping`` (one deletion curve, 49 steps of 1024 pixels, black baseline), compared
  per curve with ours.

    PYTHONPATH=. python benchmarks/evaluate.py [--steps 50] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from _common import interleaved, median, set_threads, table
from PIL import Image
from torch import Tensor, nn

from service.config import Settings
from service.evaluation import score_maps
from service.evaluation.curves import auc, stage_counts
from service.explainers import ExplainParams, Targets, explain
from service.models.registry import ModelRegistry


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee()).convert("RGB")


def reference_loop(model: nn.Module, x: Tensor, m: Tensor, target: int, steps: int) -> dict[str, list[float]]:
    """One unbatched forward pass per stage, masks rebuilt with NumPy each stage."""
    _, h, w = x.shape
    order = np.argsort(-m.numpy().ravel(), kind="stable")
    blurred = TF.gaussian_blur(x, kernel_size=[11, 11], sigma=[5.0, 5.0])
    out: dict[str, list[float]] = {"deletion": [], "insertion": []}
    with torch.no_grad():
        for k in range(steps + 1):
            chosen = np.zeros(h * w, dtype=bool)
            chosen[order[: round(k * h * w / steps)]] = True
            mask = torch.from_numpy(chosen).view(1, h, w)
            for kind, inp in (
                ("deletion", torch.where(mask, blurred, x)),
                ("insertion", torch.where(mask, x, blurred)),
            ):
                out[kind].append(float(model(inp[None]).softmax(dim=1)[0, target]))
    return out


def quantus_deletion(
    model: nn.Module, xb: Tensor, m: Tensor, target: int, batch_size: int
) -> Callable[[], object]:
    """Quantus' pixel flipping (a deletion curve) on the same image and map: 1024 pixels a step
    (49 steps; Quantus needs a step that divides the pixel count), black baseline."""
    import quantus

    metric = quantus.PixelFlipping(
        features_in_step=1024,
        perturb_baseline="black",
        normalise=False,
        disable_warnings=True,
        display_progressbar=False,
    )
    x_np, a_np, y_np = xb.numpy(), m.numpy()[None, None], np.array([target])

    def run() -> object:
        return metric(
            model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np, channel_first=True,
            device="cpu", batch_size=batch_size, softmax=True,
        )  # fmt: skip

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    cpu = torch.device("cpu")
    registry = ModelRegistry.from_settings(Settings(models_config=None, device="cpu", warmup=False))
    loaded = registry.get("efficientnet_lite0")
    handle = loaded.handle
    x, _ = loaded.preprocess(coffee())
    xb = x[None]
    params = ExplainParams(seed=0, batch_size=args.batch_size)
    expl = explain(handle, xb, "gradcam", params)
    target, m = int(expl.targets[0, 0]), expl.maps[0, 0]
    layer = expl.params.layer
    rows_total = 2 * (args.steps + 1)
    stack = xb.repeat(rows_total, 1, 1, 1)
    model = handle.prepared(keep=layer)

    def ours() -> list[dict[str, list[float]]]:
        return score_maps(
            handle, xb, [m], [0], [target], kinds=("deletion", "insertion"), steps=args.steps,
            substitute="blur", batch_size=args.batch_size, keep=layer,
        )  # fmt: skip

    def bare() -> None:
        with torch.inference_mode():
            for s in range(0, rows_total, args.batch_size):
                model(stack[s : s + args.batch_size])

    contenders = {
        "Grad-CAM explanation": lambda: explain(
            handle, xb, "gradcam", params, targets=Targets.given([[target]])
        ),
        f"deletion+insertion, {args.steps} steps (ours, batched)": ours,
        f"bare forward passes ×{rows_total} (floor)": bare,
    }
    ref_name = "reference: per-stage unbatched loop"
    contenders[ref_name] = lambda: reference_loop(handle.module, x, m, target, args.steps)
    quantus_name = "Quantus PixelFlipping, deletion only, 49 steps"
    if importlib.util.find_spec("quantus") is not None:
        contenders[quantus_name] = quantus_deletion(handle.module, xb, m, target, args.batch_size)
    times = interleaved(contenders, cpu, args.repeats)
    ours_s = median(times[f"deletion+insertion, {args.steps} steps (ours, batched)"])
    bare_s = median(times[f"bare forward passes ×{rows_total} (floor)"])
    expl_s = median(times["Grad-CAM explanation"])
    rows = [
        [name, f"{median(ts) * 1000:.0f}", f"{median(ts) / expl_s:.2f}×", f"{median(ts) / ours_s:.2f}×"]
        for name, ts in times.items()
    ]
    print(
        f"efficientnet_lite0 on CPU, {args.threads} threads, batch_size {args.batch_size}, coffee 224², "
        f"class {target}; medians of {args.repeats} interleaved rounds"
    )
    print(table(["what", "ms", "vs explanation", "vs ours"], rows))
    [c] = ours()
    ref = reference_loop(handle.module, x, m, target, args.steps)
    diff = max(abs(a - b) for k in c for a, b in zip(c[k], ref[k], strict=True))
    print(
        f"\ncurves: ours AUC deletion {auc(c['deletion']):.4f} insertion {auc(c['insertion']):.4f}; "
        f"reference {auc(ref['deletion']):.4f} / {auc(ref['insertion']):.4f}; max |Δp| {diff:.2e} "
        f"(ours on the BN-folded private copy, the reference on the served model)"
    )
    print(f"stages replace {stage_counts(224 * 224, args.steps)[1]} pixels each (of {224 * 224})")
    over = ours_s / bare_s - 1
    speedup = median(times[ref_name]) / ours_s
    print(f"ours vs floor: {over:+.1%} (target ≤ +10 %); reference / ours: {speedup:.1f}× (target ≥ 5×)")
    if quantus_name in times:  # one curve of 49 steps against half of ours (two curves of 50)
        per_curve = median(times[quantus_name]) / (ours_s / 2)
        print(f"Quantus (one deletion curve) / ours per curve: {per_curve:.1f}× (target ≥ 5×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
