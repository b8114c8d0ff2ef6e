"""KernelSHAP and LIME over superpixels.

Both are exact functions of the coalitions they draw, so they are checked against Captum's
``KernelShap`` and ``Lime`` fed the very same coalitions, superpixels, baseline and score: LIME to
rounding (the same weighted least squares), KernelSHAP to 1e-4 of the map's scale (Captum
approximates the efficiency constraint with two end points of weight 10⁶, we solve it exactly).
On a model whose explained score is linear in the pixels both must recover the exact
contribution of each superpixel, Σ w·(x − baseline) over its pixels, whatever the coalitions.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator

import pytest
import torch
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import KernelShap as CaptumKernelShap
from captum.attr import Lime as CaptumLime
from helpers import small_cnn
from torch import Tensor, nn

from service.errors import InvalidParameter
from service.explainers import ExplainParams, ModelHandle, Targets, explain, get_method
from service.explainers.path import make_baseline
from service.explainers.surrogate import KernelShap, Lime, grid, lime_weights, superpixels


def blobs(n: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    """Smooth random images (normalised space): SLIC finds regions in them, as in photos."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class LinearProbability(nn.Module):
    """Two classes whose class-0 probability is a + w·x (inside (0, 1) for the test's inputs):
    the log-probabilities are its logits, so softmax gives the probabilities back exactly."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, size, size, generator=g) * 1e-4, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        p = 0.5 + (x * self.w).flatten(1).sum(dim=1)
        return torch.stack([p, 1.0 - p], dim=1).log()


def by_hand(weight: Tensor, x: Tensor, base: Tensor, labels: Tensor) -> Tensor:
    """Each superpixel's exact contribution Σ w·(x − baseline), spread over its pixels."""
    per_pixel = (weight * (x - base)).sum(dim=0)
    s = int(labels.max()) + 1
    totals = torch.zeros(s, dtype=per_pixel.dtype).index_add_(0, labels.flatten(), per_pixel.flatten())
    return totals[labels]


def test_kernel_shap_recovers_a_linear_model_exactly() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(3 * 16 * 16, 3)
    net = nn.Sequential(nn.Flatten(), linear).eval()
    handle = ModelHandle(net, input_size=(3, 16, 16), optimize=False)
    x = blobs(1, 16, seed=2)
    params = ExplainParams(samples=64, segments=12, baseline="black", seed=5)
    out = explain(handle, x, "kernel_shap", params, targets=Targets.given([[2]]))
    labels = superpixels(x, handle, 12)[0]
    base = make_baseline("black", x, handle, 0)[0]
    expected = by_hand(linear.weight.detach()[2].view(3, 16, 16), x[0], base, labels)
    torch.testing.assert_close(out.maps[0, 0], expected, rtol=1e-4, atol=1e-5)
    # efficiency: the superpixels' values add up to f(x) − f(baseline)
    s = int(labels.max()) + 1
    first = torch.stack([torch.nonzero(labels.flatten() == j)[0, 0] for j in range(s)])
    with torch.no_grad():
        gap = net(x)[0, 2] - net(base[None])[0, 2]
    torch.testing.assert_close(out.maps[0, 0].flatten()[first].sum(), gap, rtol=1e-4, atol=1e-5)


def test_lime_recovers_a_linear_probability_exactly() -> None:
    net = LinearProbability(16).eval()
    handle = ModelHandle(net, input_size=(3, 16, 16), optimize=False)
    x = blobs(1, 16, seed=4)
    params = ExplainParams(samples=80, segments=10, baseline="mean", seed=7)
    out = explain(handle, x, "lime", params, targets=Targets.given([[0]]))
    labels = superpixels(x, handle, 10)[0]
    expected = by_hand(net.w.detach(), x[0], torch.zeros_like(x[0]), labels)
    torch.testing.assert_close(out.maps[0, 0], expected, rtol=1e-4, atol=1e-7)


def _captum_inputs(
    method: str, segments: int, seed: int
) -> tuple[nn.Module, ModelHandle, Tensor, list[Tensor]]:
    net = small_cnn()
    handle = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    x = blobs(2, 32, seed=seed)
    return net, handle, x, superpixels(x, handle, segments)


def _replay(rows: Tensor) -> object:
    """A Captum perturbation generator that yields ``rows`` (our coalitions) one at a time."""

    def generator(_inputs: Tensor, **_: object) -> Iterator[Tensor]:
        yield from (r.view(1, -1).long() for r in rows)

    assert inspect.isgeneratorfunction(generator)
    return generator


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_kernel_shap_agrees_with_captum_on_the_same_coalitions(baseline: str) -> None:
    net, handle, x, labels = _captum_inputs("kernel_shap", 12, seed=1)
    params = ExplainParams(samples=60, segments=12, baseline=baseline, seed=11, batch_size=13)  # type: ignore[arg-type]
    targets = torch.tensor([1, 4])
    ours = explain(handle, x, "kernel_shap", params, targets=Targets.given([[1], [4]])).maps[:, 0]
    base = make_baseline(baseline, x, handle, 0)
    method = get_method("kernel_shap")
    assert isinstance(method, KernelShap)
    for i in range(2):
        s = int(labels[i].max()) + 1
        z = method.coalitions(s, params, 11)  # the all-removed row, then the samples
        ref = CaptumKernelShap(net)
        ref.perturb_func = _replay(torch.cat([torch.ones(1, s, dtype=torch.bool), z]))  # type: ignore[assignment]
        got = ref.attribute(
            x[i : i + 1],
            baselines=base[i : i + 1],
            target=int(targets[i]),
            feature_mask=labels[i][None, None],
            n_samples=int(z.shape[0]) + 1,
            perturbations_per_eval=16,
        )[0, 0]
        scale = float(ours[i].abs().max())
        torch.testing.assert_close(ours[i], got.float(), rtol=0, atol=1e-4 * scale)


def test_lime_agrees_with_captum_on_the_same_coalitions() -> None:
    net, handle, x, labels = _captum_inputs("lime", 20, seed=3)
    params = ExplainParams(samples=150, segments=20, baseline="mean", seed=13, batch_size=32)
    targets = torch.tensor([0, 2])
    ours = explain(handle, x, "lime", params, targets=Targets.given([[0], [2]])).maps[:, 0]
    method = get_method("lime")
    assert isinstance(method, Lime)

    def similarity(_x: Tensor, _perturbed: Tensor, z: Tensor, **_: object) -> Tensor:
        return lime_weights(z.double())

    for i in range(2):
        s = int(labels[i].max()) + 1
        z = method.coalitions(s, params, 13)
        ref = CaptumLime(
            lambda t: net(t).softmax(dim=1),
            interpretable_model=SkLearnLinearRegression(),
            similarity_func=similarity,
            perturb_func=_replay(torch.cat([torch.ones(1, s, dtype=torch.bool), z])),  # type: ignore[arg-type]
        )
        got = ref.attribute(
            x[i : i + 1],
            baselines=0.0,
            target=int(targets[i]),
            feature_mask=labels[i][None, None],
            n_samples=int(z.shape[0]) + 1,
            perturbations_per_eval=16,
        )[0, 0]
        torch.testing.assert_close(ours[i], got.float(), rtol=1e-4, atol=1e-6)


def test_a_grid_stands_in_where_slic_finds_one_region() -> None:
    labels = grid(32, 32, 16)  # a 4 × 4 grid of 8-pixel cells
    assert torch.equal(labels[::8, ::8], torch.arange(16).view(4, 4))
    assert torch.equal(torch.bincount(labels.flatten()), torch.full((16,), 64))
    handle = ModelHandle(small_cnn(), input_size=(3, 96, 96), optimize=False)
    noise = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 3
    (found,) = superpixels(noise, handle, 16)
    assert torch.equal(found, grid(96, 96, 16).to(found.device))  # SLIC merged the noise into one
    params = ExplainParams(samples=40, segments=16, baseline="black", seed=1)
    assert float(explain(handle, noise, "kernel_shap", params).maps.std()) > 0


def test_lime_weights_are_the_exponential_kernel_on_cosine_distance() -> None:
    z = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    d = torch.tensor([0.0, 1.0 - 0.5, 1.0], dtype=torch.float64)  # cos(z, 1) = |z|½ / 2
    torch.testing.assert_close(lime_weights(z), torch.exp(-(d**2) / 0.25**2))


def test_kernel_shap_draws_sizes_by_the_shapley_kernel() -> None:
    method = get_method("kernel_shap")
    assert isinstance(method, KernelShap)
    s, n = 6, 4096
    z = method.coalitions(s, ExplainParams(samples=n), seed=0)
    assert not bool(z[0].any())  # the all-removed row first
    sizes = z[1:].sum(dim=1)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= s - 1
    k = torch.arange(1, s, dtype=torch.float64)
    p = (s - 1) / (k * (s - k))
    freq = torch.bincount(sizes, minlength=s)[1:].double() / n
    torch.testing.assert_close(freq, p / p.sum(), rtol=0, atol=0.03)  # 4096 draws: σ ≤ 0.007


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_same_seed_same_map_whatever_the_batch(method: str) -> None:
    handle = ModelHandle(small_cnn(), input_size=(3, 32, 32), optimize=False)
    x = blobs(3, 32, seed=5)
    params = ExplainParams(samples=40, segments=12, seed=21, batch_size=7)
    together = explain(handle, x, method, params).maps
    alone = explain(handle, x[1:2], method, params.with_(batch_size=64)).maps
    torch.testing.assert_close(together[1:2], alone)
    other = explain(handle, x[1:2], method, params.with_(seed=22)).maps
    assert not torch.equal(other, alone)


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_defaults_cost_and_bounds(method: str) -> None:
    m = get_method(method)
    resolved = ExplainParams.request().for_method(m.defaults)
    assert (resolved.samples, resolved.baseline) == (1000, "mean")
    assert m.passes(resolved) == 1000 + (2 if method == "kernel_shap" else 1)
    schema = m.parameters_schema()["properties"]
    assert schema["samples"]["default"] == 1000 and schema["baseline"]["default"] == "mean"
    assert schema["segments"]["minimum"] == 2
    with pytest.raises(InvalidParameter):
        ExplainParams(segments=1)
    with pytest.raises(InvalidParameter):
        ExplainParams(samples=5000)


def test_black_box_on_torchscript_as_on_the_eager_model() -> None:
    net = small_cnn()
    x = blobs(1, 32, seed=6)
    params = ExplainParams(samples=30, segments=10, seed=3)
    eager = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    scripted = ModelHandle(traced, input_size=(3, 32, 32))
    for method in ("kernel_shap", "lime"):
        assert get_method(method).offered(scripted)
        a = explain(eager, x, method, params).maps
        b = explain(scripted, x, method, params).maps
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
