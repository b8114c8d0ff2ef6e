"""Our methods beside their reference implementations and beside the compute floor.

In one process, on one device, with one model and one input, each of our methods runs beside:

- its references: Captum (IntegratedGradients, NoiseTunnel(Saliency) for SmoothGrad,
  LayerGradCam + bilinear upsampling, GuidedBackprop, Saliency, …), pytorch-grad-cam (GradCAM
  and the other CAM variants) and PAIR's ``saliency`` (BlurIG, GuidedIG, XRAI: numpy pixel images,
  the gradient from the eager model through the normalisation), run the way a user would run them:
  on the eager model, parameters requiring grad;
- the compute floor: the same number of batched forward + input-gradient passes, run bare, once
  through the same prepared copy our engine uses (BatchNorm folded, channels_last, no parameter
  gradients) and once through the eager model.

It prints medians of interleaved repeats and the ratios ours/reference and ours/floor. The floor
is a full backward to the input, so CAM methods (whose backward stops at the target layer) can run
below it. Examples::

    .venv/bin/python benchmarks/methods.py                            # resnet18, 224 px, 2 threads
    .venv/bin/python benchmarks/methods.py --methods all --repeats 3
    .venv/bin/python benchmarks/methods.py --gpu-suite                # images/s on CUDA, fp32 + bf16
    .venv/bin/python benchmarks/methods.py --precision bf16 --model resnet18,default

``--precision bf16`` times our bf16 engine (``precision="bf16"``: the bf16 attribution copy, see
``service.explainers.precision``) beside our fp32 engine and Captum in fp32, for IG-32,
SmoothGrad-16, Grad-CAM and Guided Backprop unless ``--methods`` says otherwise, on a CUDA device
or a CPU with bf16 matrix units. ``--model default`` is the service's default model with its
trained weights (EfficientNet-Lite0); a comma list runs each model in turn.

``--gpu-suite`` is the figure wanted from a GPU: images/s of IG-32 and SmoothGrad-16 on a randomly
initialised ResNet-50, calls of 8 images, ours beside Captum's, in fp32 and in bf16 (ours: the
engine's ``precision="bf16"``; Captum: its calls under bf16 autocast), e.g.
``benchmarks/methods.py --device cuda --gpu-suite``.
Any option given explicitly overrides the preset.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import DTYPES, autocast, build_model, device_of, interleaved, median, set_threads, table
from torch import Tensor, nn

from service.explainers import ExplainParams, ModelHandle, Targets, all_methods, explain, predict
from service.explainers import precision as prec
from service.explainers.layers import get_layer
from service.explainers.path import make_baseline
from service.explainers.prepare import FoldedBatchNorm, FoldedBatchNormAct, SamePadding

DEFAULT_METHODS = ["integrated_gradients", "smoothgrad", "gradcam", "guided_backprop", "saliency"]

# (method, reference) → the largest acceptable ours/reference ratio (issue 2's speed targets)
TARGETS: dict[tuple[str, str], float] = {
    ("integrated_gradients", "captum"): 0.75,
    ("integrated_gradients", "floor"): 1.05,
    ("smoothgrad", "captum"): 0.75,
    ("smoothgrad", "floor"): 1.05,
    ("gradcam", "captum"): 1.0,
    ("gradcam", "grad-cam"): 1 / 2.5,
    ("guided_backprop", "captum"): 1.0,
    # issue 13: each new method ≤ 0.8 × its reference; RISE ≤ 1.1 × its bare forward passes
    ("occlusion", "captum"): 0.8,
    ("vargrad", "captum"): 0.8,
    ("smoothgrad_sq", "captum"): 0.8,
    ("gradient_shap", "captum"): 0.8,
    ("rise", "floor"): 1.1,
    ("kernel_shap", "captum"): 0.8,
    ("lime", "captum"): 0.8,
    ("blur_ig", "pair"): 0.8,
    ("guided_ig", "pair"): 0.8,
    ("xrai", "pair"): 0.8,
}

GRAD_CAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam_pp": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
}


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="torchvision or timm name, random init; 'default': the service's default model with its "
        "trained weights; a comma list runs each (default resnet18)",
    )
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--size", type=int, help="input side in pixels (default 224)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds after one warm-up round (default 3)")
    p.add_argument("--methods", help=f"comma list or 'all' (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--images", type=int, help="images per call (default 1)")
    p.add_argument("--batch-size", type=int, help="passes run at once, ours and references (default 32)")
    p.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples (default 16)")
    p.add_argument("--masks", type=int, default=4000, help="RISE masks (default 4000, the paper's)")
    p.add_argument("--window", type=int, default=16, help="occlusion window (default 16)")
    p.add_argument("--stride", type=int, default=8, help="occlusion stride (default 8)")
    p.add_argument(
        "--coalitions", type=int, default=1000, help="kernel_shap/lime samples (default 1000, theirs)"
    )
    p.add_argument("--segments", type=int, default=50, help="kernel_shap/lime superpixels (default 50)")
    p.add_argument("--rule", default="gausslegendre", help="IG rule, same for Captum (default gausslegendre)")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--dtype",
        help="fp32, bf16 (ours in bf16, the references under bf16 autocast) or a comma list (default fp32)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: our bf16 engine beside our fp32 engine and Captum in fp32 (default fp32: off)",
    )
    p.add_argument("--no-eager-floor", action="store_true", help="skip the floor through the eager model")
    p.add_argument(
        "--malloc",
        choices=["retain", "default"],
        default="retain",
        help="retain: keep freed memory as `saliency serve` does (SALIENCY_RETAIN_HEAP), for every "
        "contender alike; default: glibc's own behaviour (default retain)",
    )
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic of the repeats (default median)",
    )
    p.add_argument(
        "--gpu-suite", action="store_true", help="preset: resnet50, cuda, 8 images, IG+SG, fp32+bf16"
    )
    args = p.parse_args(argv)
    preset: dict[str, Any] = dict(
        model="resnet18",
        size=224,
        repeats=3,
        methods=",".join(DEFAULT_METHODS),
        images=1,
        batch_size=32,
        device="cpu",
        dtype="fp32",
    )
    if args.precision == "bf16":
        preset.update(methods="integrated_gradients,smoothgrad,gradcam,guided_backprop")
    if args.gpu_suite:
        preset.update(
            model="resnet50",
            methods="integrated_gradients,smoothgrad",
            images=8,
            batch_size=64,
            device="cuda",
            dtype="fp32,bf16",
            repeats=5,
        )
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------------
# contenders
# ------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    dtype: str
    handle: ModelHandle
    eager: nn.Module  # the model as a user holds it: eval, parameters requiring grad
    x: Tensor
    targets: Tensor
    params: ExplainParams
    layer: str
    owned: list[Callable[[], None]] = field(default_factory=list)  # clean-ups

    def amp(self) -> Any:
        return autocast(self.device, self.dtype)


def passes_per_image(method: str, args: argparse.Namespace) -> int:
    """Forward + input-gradient passes per image that the floor runs for ``method``."""
    if method in ("integrated_gradients", "blur_ig", "guided_ig"):
        return int(args.steps)
    if method == "xrai":
        return 2 * int(args.steps)
    if method in ("smoothgrad", "vargrad", "smoothgrad_sq", "gradient_shap"):
        return int(args.samples)
    if method == "smooth_ig":
        return int(args.steps * args.samples)
    if method == "guided_gradcam":
        return 2
    if method in ("scorecam", "eigencam", "cam", "attention_rollout", *FORWARD_ONLY):
        return 0  # forward passes only; no comparable floor (perturbation: see forward_passes)
    return 1


#: black-box methods: their floor is forward passes alone
FORWARD_ONLY = ("occlusion", "rise", "kernel_shap", "lime")
#: over superpixels, with ``--coalitions`` samples and the ``mean`` baseline (their defaults)
SURROGATES = ("kernel_shap", "lime")


def forward_passes(method: str, args: argparse.Namespace) -> int:
    """Forward passes per image of a black-box method (its floor): the perturbed copies + 1."""
    if method == "rise":
        return int(args.masks) + 1
    if method in SURROGATES:
        return int(args.coalitions) + (2 if method == "kernel_shap" else 1)
    if method == "occlusion":
        per_side = (int(args.size) - int(args.window)) // int(args.stride) + 1
        return per_side * per_side + 1
    return 0


def forward_floor(s: Setup, model: nn.Module, passes: int) -> Callable[[], None]:
    """``passes`` forward passes through ``model`` without gradients, ``batch_size`` at a time."""
    bs = int(s.args.batch_size)
    pool = torch.randn(min(bs, passes), *s.x.shape[1:], generator=torch.Generator().manual_seed(1)).to(
        s.device
    )

    def run() -> None:
        with torch.no_grad(), s.amp():
            for start in range(0, passes, bs):
                model(pool[: min(bs, passes - start)])

    return run


def floor(s: Setup, model: nn.Module, passes: int) -> Callable[[], None]:
    """``passes`` forward + input-gradient passes through ``model``, ``batch_size`` at a time."""
    bs = int(s.args.batch_size)
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(min(bs, passes), *s.x.shape[1:], generator=g).to(s.device)
    tt = s.targets.repeat((bs + len(s.targets) - 1) // len(s.targets))[: pool.shape[0]].view(-1, 1)

    def run() -> None:
        for start in range(0, passes, bs):
            n = min(bs, passes - start)
            xi = pool[:n].detach().requires_grad_(True)
            with torch.enable_grad(), s.amp():
                out = model(xi)
            (grad,) = torch.autograd.grad(out.float().gather(1, tt[:n]).sum(), xi)
            del grad

    return run


def photos(s: Setup) -> Tensor:
    """``skimage.data``'s cat photo at the input size, normalised, once per image of ``s.x``: the
    superpixel methods need an image with regions (SLIC finds one segment in noise)."""
    from skimage import data

    img = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float()[None] / 255.0
    img = nn.functional.interpolate(img, size=tuple(s.x.shape[-2:]), mode="bilinear", align_corners=False)
    mean = torch.tensor(s.handle.mean).view(1, -1, 1, 1)
    std = torch.tensor(s.handle.std).view(1, -1, 1, 1)
    return ((img - mean) / std).expand(s.x.shape[0], -1, -1, -1).contiguous().to(s.device)


def ours(s: Setup, method: str) -> Callable[[], None]:
    params, x = s.params, s.x
    if method in SURROGATES:
        params = params.with_(samples=s.args.coalitions, segments=s.args.segments, baseline="mean")
        x = photos(s)

    def run() -> None:
        explain(s.handle, x, method, params, targets=Targets.given(s.targets.view(-1, 1)))

    return run


def ours_bf16(s: Setup, method: str) -> Callable[[], None]:
    """Our engine in bf16 (``precision="bf16"``), the references and floors staying in fp32."""
    params = s.params.with_(precision="bf16")

    def run() -> None:
        explain(s.handle, s.x, method, params, targets=Targets.given(s.targets.view(-1, 1)))

    return run


def captum_reference(s: Setup, method: str) -> Callable[[], None] | None:
    import captum.attr as ca  # type: ignore[import-untyped]

    model, x, t, a = s.eager, s.x, s.targets, s.args
    bs = int(a.batch_size)
    sigma = float(s.params.noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).mean())
    baseline = make_baseline(s.params.baseline, x, s.handle, 0)
    layer = get_layer(model, s.layer)
    per_batch = max(1, bs // x.shape[0])
    calls: dict[str, Callable[[], object]] = {
        "integrated_gradients": lambda: ca.IntegratedGradients(model).attribute(
            x, baselines=baseline, target=t, n_steps=a.steps, method=a.rule,
            internal_batch_size=bs, return_convergence_delta=True,
        ),
        "smoothgrad": lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=a.samples, nt_samples_batch_size=per_batch,
            stdevs=sigma, target=t, abs=True,
        ),
        "smooth_ig": lambda: ca.NoiseTunnel(ca.IntegratedGradients(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=a.samples, nt_samples_batch_size=1, stdevs=sigma,
            baselines=baseline, target=t, n_steps=a.steps, method=a.rule, internal_batch_size=bs,
        ),
        "vargrad": lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="vargrad", nt_samples=a.samples, nt_samples_batch_size=per_batch,
            stdevs=sigma, target=t, abs=False,
        ),
        "smoothgrad_sq": lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="smoothgrad_sq", nt_samples=a.samples, nt_samples_batch_size=per_batch,
            stdevs=sigma, target=t, abs=False,
        ),
        "gradient_shap": lambda: ca.GradientShap(model).attribute(
            x, baselines=baseline, n_samples=a.samples, stdevs=sigma, target=t,
        ),
        "occlusion": lambda: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], a.window, a.window), strides=(x.shape[1], a.stride, a.stride),
            baselines=baseline, target=t, perturbations_per_eval=per_batch,
        ),
        "saliency": lambda: ca.Saliency(model).attribute(x, target=t, abs=True),
        "input_x_gradient": lambda: ca.InputXGradient(model).attribute(x, target=t),
        "guided_backprop": lambda: ca.GuidedBackprop(model).attribute(x, target=t),
        "deconvnet": lambda: ca.Deconvolution(model).attribute(x, target=t),
        "guided_gradcam": lambda: ca.GuidedGradCam(model, layer).attribute(x, target=t),
        "gradcam": lambda: ca.LayerAttribution.interpolate(  # (maps only: Captum reads no tokens)
            ca.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True),
            tuple(x.shape[-2:]), "bilinear",
        ),
    }  # fmt: skip
    if method in SURROGATES:
        return surrogate_reference(s, method)
    if method not in calls or (
        method in ("gradcam", "guided_gradcam") and s.handle.layer_view(s.layer).layout != "nchw"
    ):
        return None  # Captum's LayerGradCam reads a layer as (N, C, h, w) only
    call = calls[method]

    def run() -> None:
        with s.amp():
            call()

    return run


def surrogate_reference(s: Setup, method: str) -> Callable[[], None]:
    """Captum's KernelShap (its defaults) or Lime (least squares, as ours) over the same SLIC
    superpixels, segmented inside the timed call as a user of Captum must, one image at a time."""
    import captum.attr as ca
    from captum._utils.models.linear_model import SkLearnLinearRegression  # type: ignore[import-untyped]

    from service.explainers.surrogate import superpixels

    model, x, t, a = s.eager, photos(s), s.targets, s.args
    n = int(a.coalitions) + (2 if method == "kernel_shap" else 1)

    def run() -> None:
        for i, labels in enumerate(superpixels(x, s.handle, int(a.segments))):
            explainer = (
                ca.KernelShap(model)
                if method == "kernel_shap"
                else ca.Lime(lambda v: model(v).softmax(dim=1), interpretable_model=SkLearnLinearRegression())
            )
            with s.amp():
                explainer.attribute(
                    x[i : i + 1],
                    baselines=0.0,
                    target=int(t[i]),
                    feature_mask=labels[None, None],
                    n_samples=n,
                    perturbations_per_eval=int(a.batch_size),
                )

    return run


def grad_cam_reference(s: Setup, method: str) -> Callable[[], None] | None:
    if method not in GRAD_CAM_CLASSES:
        return None
    import pytorch_grad_cam  # type: ignore[import-untyped]
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-untyped]

    model = copy.deepcopy(s.eager)  # it keeps hooks on its model for the object's lifetime
    cls = getattr(pytorch_grad_cam, GRAD_CAM_CLASSES[method])
    view = s.handle.layer_view(s.layer)
    # a token or channels-last layer needs pytorch-grad-cam's reshape_transform: give it the
    # measured layout's own (prefix tokens dropped, the patch grid restored)
    reshape = None if view.layout == "nchw" else view.to_map
    cam = cls(model=model, target_layers=[get_layer(model, s.layer)], reshape_transform=reshape)
    if hasattr(cam, "batch_size"):
        cam.batch_size = int(s.args.batch_size)
    s.owned.append(cam.activations_and_grads.release)
    targets = [ClassifierOutputTarget(int(c)) for c in s.targets]

    def run() -> None:
        with s.amp():
            cam(input_tensor=s.x, targets=targets)

    return run


def _pair_quantile(a: Any, q: Any, *args: Any, interpolation: str | None = None, **kw: Any) -> Any:
    """numpy's quantile taking PAIR 0.2.1's ``interpolation=`` (removed in numpy 2) as ``method=``."""
    import numpy as np

    if interpolation is not None:
        kw["method"] = interpolation
    return np.quantile(a, q, *args, **kw)


def pair_reference(s: Setup, method: str) -> Callable[[], None] | None:
    """PAIR's ``saliency.core`` (the authors' code) on the same model, image, targets and settings:
    pixel images (H, W, C) in float64, ``batch_size`` steps per model call where it batches."""
    if method not in ("blur_ig", "guided_ig", "xrai"):
        return None
    try:
        import numpy as np
        import saliency.core as pair  # type: ignore[import-untyped]
        from saliency.core import guided_ig as pair_guided  # type: ignore[import-untyped]
    except ImportError:
        return None
    import types

    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = _pair_quantile
    pair_guided.np = shim
    model, p, a = s.eager, s.params, s.args
    c = s.x.shape[1]
    mean = torch.tensor(s.handle.mean, dtype=torch.float32).expand(c).view(1, -1, 1, 1).to(s.device)
    std = torch.tensor(s.handle.std, dtype=torch.float32).expand(c).view(1, -1, 1, 1).to(s.device)
    pixels = [(xi * std[0] + mean[0]).permute(1, 2, 0).double().cpu().numpy() for xi in s.x]

    def gradients(target: int) -> Callable[..., dict[str, Any]]:
        def call(batch: Any, call_model_args: object = None, expected_keys: object = None) -> dict[str, Any]:
            px = torch.tensor(np.asarray(batch), dtype=torch.float32, device=s.device).permute(0, 3, 1, 2)
            px.requires_grad_(True)
            with torch.enable_grad(), s.amp():
                out = model((px - mean) / std).float()[:, target].sum()
            (g,) = torch.autograd.grad(out, px)
            return {pair.base.INPUT_OUTPUT_GRADIENTS: g.permute(0, 2, 3, 1).double().cpu().numpy()}

        return call

    bs = int(a.batch_size)

    def one(image: Any, target: int) -> object:
        f = gradients(target)
        if method == "blur_ig":
            return pair.BlurIG().GetMask(image, f, max_sigma=p.max_sigma, steps=a.steps, batch_size=bs)
        if method == "guided_ig":
            return pair.GuidedIG().GetMask(
                image, f, x_steps=a.steps, fraction=p.fraction, max_dist=p.max_dist
            )
        extra = pair.XRAIParameters(steps=a.steps)
        extra.experimental_params["min_pixel_diff"] = 1  # as ours (the paper has no threshold)
        baselines = [np.zeros_like(image), np.ones_like(image)]
        return pair.XRAI().GetMask(image, f, baselines=baselines, batch_size=bs, extra_parameters=extra)

    def run() -> None:
        for image, target in zip(pixels, s.targets.tolist(), strict=True):
            one(image, int(target))

    return run


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def load_model(name: str, classes: int) -> nn.Module:
    """``default``: the service's default model with its trained weights; else a random init."""
    if name == "default":
        from service.models.loaders import load_builtin

        return load_builtin("efficientnet_lite0").eval()
    return build_model(name, classes)


def make_setup(args: argparse.Namespace, dtype: str, model: nn.Module) -> Setup:
    device = device_of(args.device)
    model = model.to(device).eval()
    handle = ModelHandle(model, name=args.model, input_size=(3, args.size, args.size))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size, generator=g).to(device)
    targets = predict(handle, x).argmax(dim=1).to(device)
    params = ExplainParams(
        steps=args.steps,
        samples=args.samples,
        rule=args.rule,
        masks=args.masks,
        window=args.window,
        stride=args.stride,
        seed=0,
        batch_size=args.batch_size,
        precision="bf16" if DTYPES[dtype] is not None else "fp32",
    )
    layer = handle.resolve_layer(None)
    return Setup(args, device, dtype, handle, model, x, targets, params, layer)


@dataclass
class Row:
    method: str
    dtype: str
    times: dict[str, float]  # contender → median seconds


def bench_method(s: Setup, method: str) -> Row:
    contenders: dict[str, Callable[[], object]] = {"ours": ours(s, method)}
    if s.args.precision == "bf16" and s.dtype == "fp32":
        if prec.offered(method):
            contenders["ours-bf16"] = ours_bf16(s, method)
        else:
            print(f"  {method} is not offered in bf16 (fidelity not measured or too low)", file=sys.stderr)
    for label, make in (
        ("captum", captum_reference),
        ("grad-cam", grad_cam_reference),
        ("pair", pair_reference),
    ):
        ref = make(s, method)
        if ref is not None:
            contenders[label] = ref
    passes = passes_per_image(method, s.args) * s.x.shape[0]
    if passes:
        contenders["floor"] = floor(s, s.handle.prepared(None), passes)
        if not s.args.no_eager_floor:
            contenders["floor-eager"] = floor(s, s.eager, passes)
    forwards = forward_passes(method, s.args) * s.x.shape[0]
    if forwards:
        contenders["floor"] = forward_floor(s, s.handle.prepared(None), forwards)
        if not s.args.no_eager_floor:
            contenders["floor-eager"] = forward_floor(s, s.eager, forwards)
    times = interleaved(contenders, s.device, int(s.args.repeats))
    stat = min if s.args.stat == "min" else median
    return Row(method, s.dtype, {k: stat(v) for k, v in times.items()})


def describe(s: Setup) -> str:
    prepared = s.handle.prepared(None)
    folded = sum(isinstance(m, FoldedBatchNorm | FoldedBatchNormAct) for m in prepared.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in s.eager.modules())
    unpadded = sum(isinstance(vars(m).get("forward"), SamePadding) for m in prepared.modules())
    cl = any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in prepared.parameters()
    )
    dev = (
        torch.cuda.get_device_name(s.device)
        if s.device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    return (
        f"model {s.args.model} ({'trained weights' if s.args.model == 'default' else 'random init'}, {s.args.classes} classes), input {s.args.images}×3×{s.args.size}²,"
        f" batch_size {s.args.batch_size}, steps {s.args.steps}, samples {s.args.samples}, rule {s.args.rule},"
        f" masks {s.args.masks}, window {s.args.window}, stride {s.args.stride},"
        f" coalitions {s.args.coalitions}, segments {s.args.segments},"
        f" target layer {s.layer}\n"
        f"device {dev}; torch {torch.__version__}; prepared copy: {folded}/{bns} BatchNorms folded,"
        f" {unpadded} SAME convolutions unpadded, channels_last={cl}; malloc {s.args.malloc};"
        f" {s.args.stat} of {s.args.repeats} interleaved rounds after 1 warm-up"
    )


def verdict(method: str, times: dict[str, float]) -> str:
    """The issue's targets for ``method``: 'captum ≤0.75 ok' and so on."""
    parts = []
    for (m, ref), limit in TARGETS.items():
        if m == method and ref in times:
            ratio = times["ours"] / times[ref]
            parts.append(f"{ref} ≤{limit:.2f} {'ok' if ratio <= limit else 'MISS'}")
    return ", ".join(parts)


REFS = ("captum", "grad-cam", "pair", "floor", "floor-eager")


def print_rows(rows: list[Row], images: int) -> None:
    out = []
    for r in rows:
        t = r.times
        cells = [r.method, r.dtype, f"{t['ours']:.3f}", f"{images / t['ours']:.2f}"]
        cells += [f"{t[k]:.3f}" if k in t else "-" for k in REFS]
        cells += [f"{t['ours'] / t[k]:.2f}" if k in t else "-" for k in REFS]
        out.append([*cells, verdict(r.method, t)])
    header = ["method", "dtype", "ours s", "ours img/s"]
    header += [f"{k} s" for k in REFS] + [f"÷{k}" for k in REFS] + ["targets (ours ÷ it)"]
    print(table(header, out))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    if args.malloc == "retain":
        from service.runtime.process.heap import retain_freed_memory

        if not retain_freed_memory():
            args.malloc = "default (retain not available)"
    warnings.filterwarnings("ignore", module="captum")
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    known = [m.name for m in all_methods()]
    methods = known if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(known)}")
    dtypes = [d.strip() for d in args.dtype.split(",")]
    if any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"--dtype must be among {', '.join(DTYPES)}")
    wants_bf16 = args.precision == "bf16" or any(DTYPES[d] is not None for d in dtypes)
    if wants_bf16 and not prec.bf16_supported(device_of(args.device)):
        raise SystemExit(f"bf16: the {args.device} device here has no bf16 matrix units")
    for name in args.model.split(","):
        args.model = name
        torch.manual_seed(0)
        model = load_model(name, args.classes)
        rows: list[Row] = []
        for dtype in dtypes:
            s = make_setup(args, dtype, model)
            if dtype == dtypes[0]:
                print(describe(s), flush=True)
            try:
                for method in methods:
                    if method == "cam" and not _cam_applies(s):
                        continue
                    rows.append(bench_method(s, method))
                    print(f"  done {method} {dtype}", file=sys.stderr, flush=True)
            finally:
                for release in s.owned:
                    release()
        if args.precision == "bf16":
            print_precision(rows)
        else:
            print_rows(rows, args.images)
        if args.gpu_suite:
            print_throughput(rows, args.images)
        print()
    return 0


#: (method) → the largest acceptable ratio of our bf16 time to Captum's fp32 time (issue 15)
BF16_TARGETS: dict[str, float] = {"integrated_gradients": 0.5, "smoothgrad": 0.5}


def print_precision(rows: list[Row]) -> None:
    """``--precision bf16``: our bf16 beside our fp32 and Captum's fp32, with the ratios."""
    out = []
    for r in rows:
        t = r.times
        fp32, bf16, cap = t["ours"], t.get("ours-bf16"), t.get("captum")
        target = BF16_TARGETS.get(r.method)
        verdict_ = "-"
        if target is not None and bf16 is not None and cap is not None:
            verdict_ = f"bf16÷captum ≤{target:.2f} {'ok' if bf16 / cap <= target else 'MISS'}"
        out.append(
            [
                r.method,
                f"{fp32:.3f}",
                "-" if bf16 is None else f"{bf16:.3f}",
                "-" if cap is None else f"{cap:.3f}",
                "-" if bf16 is None else f"{bf16 / fp32:.2f}",
                "-" if bf16 is None or cap is None else f"{bf16 / cap:.2f}",
                "-" if cap is None else f"{fp32 / cap:.2f}",
                verdict_,
            ]
        )
    header = [
        "method",
        "ours fp32 s",
        "ours bf16 s",
        "captum fp32 s",
        "bf16÷fp32",
        "bf16÷captum",
        "fp32÷captum",
    ]
    print(table([*header, "target"], out))


def print_throughput(rows: list[Row], images: int) -> None:
    """The GPU figure: images/s, ours beside Captum's."""
    out = []
    for r in rows:
        cap = r.times.get("captum")
        ours_ips = images / r.times["ours"]
        cap_ips = images / cap if cap else float("nan")
        out.append([r.method, r.dtype, f"{ours_ips:.1f}", f"{cap_ips:.1f}", f"{ours_ips / cap_ips:.2f}×"])
    print()
    print(table(["method", "dtype", "ours img/s", "captum img/s", "ours speed-up"], out))


def _cam_applies(s: Setup) -> bool:
    from service.errors import MethodNotApplicable
    from service.explainers import get_method

    try:
        get_method("cam").check(s.handle, s.params.with_(layer=s.layer))
    except MethodNotApplicable:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
