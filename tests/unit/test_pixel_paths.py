"""Blur IG, Guided IG and XRAI beside PAIR's ``saliency`` package (the authors' code), and by hand.

PAIR's methods take an (H, W, C) pixel image and a function returning the gradient of the output
with respect to it; ``pair_gradients`` wraps our torch model so (normalisation inside, float32 as
the model runs). Every comparison is deterministic, so the results must agree up to float rounding:

- Blur IG: PAIR blurs in float64 with scipy, we blur in float32 by matrix products; the model then
  sees inputs that differ in the last bits, so rtol 1e-3 and atol 1e-4 of the map's scale.
- Guided IG: the same float32 gradients (the handle is not optimised and runs one pair per chunk,
  as PAIR does), the path in float64 on both sides; differences come only from summation order
  (atol 1e-6 of the scale).
- XRAI: our averaged IG handed to PAIR as its ``base_attribution``, so segmentation and selection
  are compared exactly (1e-9); and, on a linear model, where every integration rule gives the exact
  integral, PAIR's whole pipeline including its own IG.

PAIR 0.2.1 calls ``np.quantile(..., interpolation="lower")``, a keyword numpy 2 removed;
``pair_guided_ig`` gives it a numpy whose ``quantile`` takes it (the same quantile, ``method``).
Where we deviate from PAIR's defaults, the tests give PAIR our setting: XRAI drops a region once it
adds no pixel (``min_pixel_diff`` 1; PAIR's experimental default 50 is not in the paper).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import saliency.core as saliency  # type: ignore[import-untyped]
import scipy.ndimage
import torch
from saliency.core import guided_ig as pair_guided_module  # type: ignore[import-untyped]
from torch import Tensor, nn

from service.explainers import ExplainParams, ModelHandle, Targets, explain, get_method
from service.explainers.blur_ig import blur_matrix
from service.explainers.engine import resolve_params
from service.explainers.pixels import to_input
from service.explainers.xrai import segment_masks, xrai_regions

GRADS = saliency.base.INPUT_OUTPUT_GRADIENTS


def small_cnn(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    ).eval()  # fmt: skip


def pixel_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random (n, H, W, 3) pixel images in [0, 1]: blocks of colour with some noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3))
    big = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    return np.clip(big + 0.05 * rng.standard_normal(big.shape), 0, 1)


def as_input(pixels: np.ndarray, handle: ModelHandle) -> Tensor:
    p = torch.tensor(pixels, dtype=torch.float32).permute(0, 3, 1, 2)
    return to_input(p, handle)


def pair_gradients(net: nn.Module, handle: ModelHandle, target: int) -> Callable[..., dict[str, Any]]:
    """PAIR's ``call_model_function``: ∂ logit[target] / ∂ pixels of a (B, H, W, C) batch."""
    c = 3
    mean = torch.tensor(handle.mean, dtype=torch.float32).expand(c).view(1, -1, 1, 1)
    std = torch.tensor(handle.std, dtype=torch.float32).expand(c).view(1, -1, 1, 1)

    def call(
        batch: np.ndarray, call_model_args: object = None, expected_keys: object = None
    ) -> dict[str, Any]:
        p = torch.tensor(np.asarray(batch), dtype=torch.float32).permute(0, 3, 1, 2).requires_grad_(True)
        with torch.enable_grad():
            out = net((p - mean) / std)[:, target].sum()
            (g,) = torch.autograd.grad(out, p)
        return {GRADS: g.permute(0, 2, 3, 1).double().numpy()}

    return call


def hwc(t: Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).double().numpy()


def close(ours: np.ndarray, ref: np.ndarray, *, rtol: float, scale_tol: float) -> None:
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=scale_tol * scale)


# ------------------------------------------------------------------------------------------------
# Blur IG
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.7, 6.0, 40.0])
def test_blur_matrices_are_scipys_gaussian_filter_with_zero_padding(sigma: float) -> None:
    img = np.random.default_rng(1).uniform(0, 1, (20, 13, 3))
    ref = scipy.ndimage.gaussian_filter(img, sigma=[sigma, sigma, 0], mode="constant")
    bh, bw = blur_matrix(20, sigma), blur_matrix(13, sigma)
    ours = np.einsum("ij,jkc,lk->ilc", bh, img, bw)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("steps", "max_sigma", "batch_size"), [(12, 6.0, 5), (7, 50.0, 64)])
def test_blur_ig_equals_pairs(steps: int, max_sigma: float, batch_size: int) -> None:
    net = small_cnn()
    handle = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    pixels = pixel_images(2, 32)
    targets = [1, 3]
    params = ExplainParams(steps=steps, max_sigma=max_sigma, batch_size=batch_size)
    out = explain(handle, as_input(pixels, handle), "blur_ig", params, targets=Targets.given([[1], [3]]))
    assert out.attributions is not None
    for i, t in enumerate(targets):
        ref = saliency.BlurIG().GetMask(
            pixels[i], pair_gradients(net, handle, t), max_sigma=max_sigma, steps=steps, batch_size=4
        )
        close(hwc(out.attributions[i, 0]), ref, rtol=1e-3, scale_tol=1e-4)


def test_blur_ig_completeness_with_many_steps() -> None:
    """Σ attributions → f(x) − f(x blurred by max_sigma) as the Riemann sum refines (smooth model)."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)
    ).eval()
    handle = ModelHandle(net, input_size=(3, 16, 16), optimize=False)
    x = as_input(pixel_images(1, 16, seed=3), handle)
    gaps = []
    for steps in (16, 256):
        out = explain(handle, x, "blur_ig", ExplainParams(steps=steps, max_sigma=4.0, batch_size=64))
        assert out.completeness_delta is not None and out.attributions is not None
        gaps.append(abs(float(out.completeness_delta[0, 0])) / float(out.attributions.sum().abs()))
    assert gaps[1] < 0.02 and gaps[1] < gaps[0] / 4


# ------------------------------------------------------------------------------------------------
# Guided IG
# ------------------------------------------------------------------------------------------------
def _quantile(a: Any, q: Any, *args: Any, interpolation: str | None = None, **kw: Any) -> Any:
    if interpolation is not None:
        kw["method"] = interpolation
    return np.quantile(a, q, *args, **kw)


@pytest.fixture
def pair_guided_ig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = _quantile
    monkeypatch.setattr(pair_guided_module, "np", shim)
    yield saliency.GuidedIG()


@pytest.mark.parametrize(("fraction", "max_dist"), [(0.25, 0.02), (0.1, 0.2), (0.5, 1.0)])
def test_guided_ig_equals_pairs(pair_guided_ig: Any, fraction: float, max_dist: float) -> None:
    net = small_cnn(seed=1)
    handle = ModelHandle(net, input_size=(3, 16, 16), optimize=False)
    pixels = pixel_images(2, 16, seed=4)
    steps = 16
    params = ExplainParams(steps=steps, fraction=fraction, max_dist=max_dist, batch_size=1)
    out = explain(handle, as_input(pixels, handle), "guided_ig", params, targets=Targets.given([[0], [2]]))
    assert out.attributions is not None
    for i, t in enumerate([0, 2]):
        ref = pair_guided_ig.GetMask(
            pixels[i], pair_gradients(net, handle, t), x_steps=steps, fraction=fraction, max_dist=max_dist
        )
        close(hwc(out.attributions[i, 0]), ref, rtol=1e-5, scale_tol=1e-6)


def test_guided_ig_without_room_to_stray_is_left_riemann_ig_from_black() -> None:
    """max_dist = 0 pins every feature to the straight path: each step moves all of them by 1/steps,
    times the gradient at the step's start — IG from black with the left Riemann rule."""
    net = small_cnn(seed=2)
    handle = ModelHandle(net, input_size=(3, 16, 16), optimize=False)
    x = as_input(pixel_images(2, 16, seed=5), handle)
    guided = explain(handle, x, "guided_ig", ExplainParams(steps=10, max_dist=0.0))
    ig = explain(
        handle, x, "integrated_gradients", ExplainParams(steps=10, rule="riemann_left", baseline="black")
    )
    assert guided.attributions is not None and ig.attributions is not None
    scale = float(ig.attributions.abs().max())
    torch.testing.assert_close(guided.attributions, ig.attributions, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# XRAI
# ------------------------------------------------------------------------------------------------
def pair_xrai_parameters(steps: int) -> Any:
    extra = saliency.XRAIParameters(steps=steps)
    extra.experimental_params["min_pixel_diff"] = 1  # ours: drop a region once it adds no pixel
    return extra


def test_xrai_selection_equals_pairs_given_the_same_attribution() -> None:
    net = small_cnn(seed=3)
    handle = ModelHandle(net, input_size=(3, 48, 48), optimize=False)
    pixels = pixel_images(2, 48, seed=6)
    out = explain(
        handle, as_input(pixels, handle), "xrai", ExplainParams(steps=8), targets=Targets.given([[1], [4]])
    )
    assert out.attributions is not None
    for i in range(2):
        ig = hwc(out.attributions[i, 0])
        ref = saliency.XRAI().GetMask(
            pixels[i],
            pair_gradients(net, handle, 0),
            base_attribution=ig,
            extra_parameters=pair_xrai_parameters(8),
        )
        np.testing.assert_allclose(
            out.maps[i, 0].double().numpy(), ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max()
        )


def test_xrai_equals_pairs_end_to_end_on_a_linear_model() -> None:
    """Constant gradients: IG is exact under any rule, so PAIR's own IG (np.linspace nodes) from the
    black and white images, its segmentation and its selection must give our map."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 40 * 40, 3)).eval()
    handle = ModelHandle(net, input_size=(3, 40, 40), optimize=False)
    pixels = pixel_images(1, 40, seed=7)
    out = explain(
        handle, as_input(pixels, handle), "xrai", ExplainParams(steps=4), targets=Targets.given([[2]])
    )
    ref = saliency.XRAI().GetMask(
        pixels[0],
        pair_gradients(net, handle, 2),
        baselines=[np.zeros_like(pixels[0]), np.ones_like(pixels[0])],
        extra_parameters=pair_xrai_parameters(4),
        batch_size=4,
    )
    np.testing.assert_allclose(out.maps[0, 0].double().numpy(), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


class ReadsOneRegion(nn.Module):
    """Logit 0 = the mean red value inside rows 8–23, columns 24–39 of a 48 px image; logit 1 = 0."""

    def forward(self, x: Tensor) -> Tensor:
        v = x[:, 0, 8:24, 24:40].mean(dim=(1, 2))
        return torch.stack([v, torch.zeros_like(v)], dim=1)


def test_xrai_ranks_the_region_the_model_reads_first() -> None:
    handle = ModelHandle(ReadsOneRegion(), input_size=(3, 48, 48), mean=(0.0,), std=(1.0,), optimize=False)
    pixels = pixel_images(1, 48, seed=8)
    pixels[0, 8:24, 24:40] = (0.9, 0.2, 0.2)  # a red square where the model looks
    out = explain(
        handle, as_input(pixels, handle), "xrai", ExplainParams(steps=2), targets=Targets.given([[0]])
    )
    m = out.maps[0, 0]
    top = float(m.max())
    assert float(m[8:24, 24:40].min()) == top  # the square lies in the first region chosen
    first = m == top
    assert int(first.sum()) < 48 * 48 // 4  # … a region about the square, not the whole image
    assert float(m[~first].max()) < top


def test_xrai_regions_by_hand() -> None:
    """Three regions over six pixels: {0,1} density 5, {1,2,3} then adds {2,3} at density 1.5 after
    {4,5} at 2; a fourth region covering only pixels already taken is dropped."""
    attr = np.array([6.0, 4.0, 1.0, 2.0, 3.0, 1.0])
    masks = np.array(
        [
            [0, 1, 1, 1, 0, 0],  # 7/3
            [1, 1, 0, 0, 0, 0],  # 5
            [0, 0, 0, 0, 1, 1],  # 2
            [0, 1, 0, 0, 0, 0],  # 4, and nothing once {0,1} is in
        ],
        dtype=bool,
    )
    np.testing.assert_allclose(xrai_regions(attr, masks), [5, 5, 1.5, 1.5, 2, 2])


def test_segments_cover_the_image_at_every_scale() -> None:
    masks = segment_masks(pixel_images(1, 32, seed=9)[0])
    assert masks.shape[1] == 32 * 32 and masks.any(axis=0).all()
    assert masks.shape[0] >= 6  # at least one region per scale


@pytest.mark.parametrize(("method", "steps"), [("blur_ig", 100), ("guided_ig", 200), ("xrai", 100)])
def test_steps_default_to_the_authors_unless_given(method: str, steps: int) -> None:
    handle = ModelHandle(small_cnn(), input_size=(3, 32, 32), optimize=False)
    m = get_method(method)
    assert resolve_params(m, handle, ExplainParams.request()).steps == steps
    assert resolve_params(m, handle, ExplainParams.request(steps=7)).steps == 7
    assert m.parameters_schema()["properties"]["steps"]["default"] == steps


def test_costs_and_knobs() -> None:
    p = ExplainParams(steps=10)
    assert get_method("blur_ig").passes(p) == 12
    assert get_method("guided_ig").passes(p) == 12
    assert get_method("xrai").passes(p) == 24
    assert {"max_sigma"} <= get_method("blur_ig").uses
    assert {"fraction", "max_dist"} <= get_method("guided_ig").uses
    for name, knob in (("blur_ig", "max_sigma"), ("guided_ig", "fraction"), ("guided_ig", "max_dist")):
        assert knob in get_method(name).parameters_schema()["properties"]


def test_they_run_on_torchscript_as_on_the_eager_model() -> None:
    """Input gradients are all they need of a model: a traced module (no hooks) gives the same maps."""
    net = small_cnn(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    scripted = ModelHandle(traced, input_size=(3, 32, 32))
    eager = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    x = as_input(pixel_images(2, 32, seed=10), eager)
    for method, params in (
        ("blur_ig", ExplainParams(steps=4, max_sigma=5.0)),
        ("guided_ig", ExplainParams(steps=4)),
        ("xrai", ExplainParams(steps=3)),
    ):
        assert get_method(method).offered(scripted)
        ours, ref = explain(scripted, x, method, params), explain(eager, x, method, params)
        assert torch.equal(ours.targets, ref.targets)
        scale = float(ref.maps.abs().max())
        torch.testing.assert_close(ours.maps, ref.maps, rtol=1e-4, atol=1e-5 * scale)
