"""The noise wrapper: SmoothGrad and Smooth IG."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency as CaptumSaliency
from helpers import SEEN, Recorder, random_mnasnet, random_resnet18
from torch import Tensor, nn

from service.explainers import ExplainParams, ModelHandle, Targets, explain
from service.explainers.hooks import hook_count
from service.explainers.noise import draw_samples, noise_sigma, noisy_inputs, sample_seed


class Cube(nn.Module):
    """f(x) = Σ_p x_p³ over the pixels of a one-channel image (one logit)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x**3).flatten(1).sum(dim=1, keepdim=True)


def cube_handle() -> ModelHandle:
    return ModelHandle(module=Cube(), mean=(0.0,), std=(1.0,), optimize=False)


def test_sigma_is_relative_to_each_images_range() -> None:
    x = torch.tensor([[-1.0, 3.0, 0.0, 1.0], [0.0, 0.5, 0.25, 0.0]]).view(2, 1, 2, 2)
    assert noise_sigma(x, 0.25).tolist() == [1.0, 0.125]  # 0.25 · (3 − (−1)), 0.25 · 0.5
    noisy = noisy_inputs(x, 0.25, samples=3, seed=42)
    assert noisy.shape == (3, 2, 1, 2, 2)
    # copy s of image i is x_i + σ_i ε_s, ε_s drawn by a generator seeded sample_seed(42, s)
    eps = torch.stack(
        [
            torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(sample_seed(42, s)))
            for s in range(3)
        ]
    )
    torch.testing.assert_close(noisy[:, 0], x[0] + 1.0 * eps)
    torch.testing.assert_close(noisy[:, 1], x[1] + 0.125 * eps)
    assert torch.equal(noisy, noisy_inputs(x, 0.25, samples=3, seed=42))
    assert not torch.equal(noisy, noisy_inputs(x, 0.25, samples=3, seed=43))


def test_samples_drawn_in_parallel_equal_samples_drawn_one_by_one() -> None:
    cpu = torch.device("cpu")
    together = draw_samples(3, 6, (3, 8, 8), seed=11, device=cpu)
    for j in range(6):
        assert torch.equal(together[j], draw_samples(3 + j, 1, (3, 8, 8), seed=11, device=cpu)[0])
    # distinct samples and seeds give distinct, uncorrelated draws
    flat = torch.cat([together, draw_samples(3, 6, (3, 8, 8), seed=12, device=cpu)]).flatten(1)
    corr = torch.corrcoef(flat)
    assert corr.sub(torch.eye(12)).abs().max() < 0.3


def test_sample_seeds_do_not_collide() -> None:
    seeds = {sample_seed(seed, s) for seed in range(50) for s in range(200)}
    assert len(seeds) == 50 * 200


def test_noise_is_gaussian_with_the_papers_sigma() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64) * 4 - 1  # range ≈ 4
    sigma = float(noise_sigma(x, 0.1))
    eps = (noisy_inputs(x, 0.1, samples=4, seed=1) - x) / sigma
    assert float(eps.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(eps.std()) == pytest.approx(1.0, rel=0.02)


# ------------------------------------------------------------------------------------------------
# hand-worked: f(x) = x³
# ------------------------------------------------------------------------------------------------
def test_smoothgrad_of_a_cube() -> None:
    # |∂(x³)/∂x| = 3x² at each noisy copy x_s = x + σ ε_s, averaged over the copies
    x = torch.tensor([[0.5, -1.0, 2.0, 1.5]]).view(1, 1, 2, 2)  # range 3 → σ = 0.2 · 3 = 0.6
    e = explain(
        cube_handle(),
        x,
        "smoothgrad",
        ExplainParams(samples=5, noise_level=0.2, seed=3),
        targets=Targets.given([[0]]),
    )
    copies = noisy_inputs(x, 0.2, samples=5, seed=3)[:, 0]
    expected = (3 * copies**2).mean(dim=0)
    assert e.attributions is not None
    torch.testing.assert_close(e.attributions[0, 0], expected)
    torch.testing.assert_close(e.maps[0, 0], expected.amax(dim=0))  # saliency's reduction


def test_smooth_ig_of_a_cube_and_its_delta() -> None:
    # Per copy x_s, IG from 0 with the left rule at 4 steps = 0.65625 · x_s³ (see test_path), and
    # f(x_s) − f(0) = x_s³, so delta_s = −0.34375 · x_s³; smooth_ig reports the means of both.
    x = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)  # range 1 → σ = 0.5
    params = ExplainParams(samples=6, noise_level=0.5, seed=4, steps=4, rule="riemann_left", baseline="mean")
    e = explain(cube_handle(), x, "smooth_ig", params, targets=Targets.given([[0]]))
    cubes = noisy_inputs(x, 0.5, samples=6, seed=4)[:, 0] ** 3
    assert e.attributions is not None and e.completeness_delta is not None
    torch.testing.assert_close(e.attributions[0, 0], 0.65625 * cubes.mean(dim=0))
    assert float(e.completeness_delta) == pytest.approx(
        float(-0.34375 * cubes.sum(dim=(1, 2, 3)).mean()), rel=1e-5
    )
    torch.testing.assert_close(e.maps[0, 0], e.attributions[0, 0].sum(dim=0))  # IG's reduction


def test_zero_noise_is_the_inner_method() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3)
    handle = cube_handle()
    pairs = [("smoothgrad", "saliency"), ("smooth_ig", "integrated_gradients")]
    for wrapped, inner in pairs:
        a = explain(handle, x, wrapped, ExplainParams(noise_level=0.0, samples=3, steps=5, seed=1))
        b = explain(handle, x, inner, ExplainParams(steps=5, seed=1))
        assert a.attributions is not None and b.attributions is not None
        torch.testing.assert_close(a.attributions, b.attributions)
        assert a.signed == b.signed


# ------------------------------------------------------------------------------------------------
# agreement with Captum over the exact noisy copies
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18() -> ModelHandle:
    return ModelHandle(module=random_resnet18(), name="resnet18")


@pytest.fixture(scope="module")
def mnasnet() -> ModelHandle:
    return ModelHandle(module=random_mnasnet(), name="mnasnet0_5")


def close(ours: Tensor, ref: Tensor, rel: float = 1e-4) -> None:
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, atol=rel * scale, rtol=1e-3)


TARGETS = [[3, 7], [1, 0]]
FLAT_TARGETS = [3, 7, 1, 0]


@pytest.mark.parametrize("model", ["resnet18", "mnasnet"])
def test_smoothgrad_is_captum_saliency_averaged_over_our_noise(
    model: str, request: pytest.FixtureRequest
) -> None:
    handle: ModelHandle = request.getfixturevalue(model)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 40, 40)
    params = ExplainParams(samples=4, noise_level=0.2, seed=77, batch_size=3)
    e = explain(handle, x, "smoothgrad", params, targets=Targets.given(TARGETS))
    # Captum on the prepared copy: the same arithmetic (see test_path for why that matters)
    reference = CaptumSaliency(handle.prepared())
    copies = noisy_inputs(x.repeat_interleave(2, dim=0), 0.2, samples=4, seed=77)
    ref = torch.stack(
        [reference.attribute(c.requires_grad_(True), target=FLAT_TARGETS, abs=True).detach() for c in copies]
    ).mean(dim=0)
    assert e.attributions is not None
    close(e.attributions.reshape(4, 3, 40, 40), ref)
    close(e.maps.reshape(4, 40, 40), ref.amax(dim=1))
    assert hook_count(handle.module) == 0


def test_smooth_ig_is_captum_ig_averaged_over_our_noise(mnasnet: ModelHandle) -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    params = ExplainParams(samples=3, noise_level=0.1, seed=8, steps=4, baseline="black", batch_size=5)
    e = explain(mnasnet, x, "smooth_ig", params, targets=Targets.given(TARGETS))
    lo, _ = mnasnet.pixel_bounds(3)
    reference = CaptumIG(mnasnet.prepared())
    attrs, deltas = [], []
    for c in noisy_inputs(x.repeat_interleave(2, dim=0), 0.1, samples=3, seed=8):
        a, d = reference.attribute(
            c, baselines=lo.expand_as(c).clone(), target=FLAT_TARGETS, n_steps=4,
            method="gausslegendre", return_convergence_delta=True,
        )  # fmt: skip
        attrs.append(a.detach())
        deltas.append(d.detach())
    ref = torch.stack(attrs).mean(dim=0)
    assert e.attributions is not None and e.completeness_delta is not None
    # 1e-3 of the map's scale: this random MNASNet's attributions are ~1e-9, where float32
    # convolution backward differs between runs of the suite by a few 1e-4 of the scale (oneDNN's
    # choice of algorithm); any real difference from Captum is orders of magnitude larger
    close(e.attributions.reshape(4, 3, 32, 32), ref, rel=1e-3)
    scale = float(ref.sum(dim=(1, 2, 3)).abs().max())
    torch.testing.assert_close(
        e.completeness_delta.flatten(), torch.stack(deltas).mean(dim=0), atol=1e-3 * scale, rtol=1e-3
    )


# ------------------------------------------------------------------------------------------------
# reproducibility and independence from the batch
# ------------------------------------------------------------------------------------------------
def test_same_seed_same_result(resnet18: ModelHandle) -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 3, 32, 32)
    a = explain(resnet18, x, "smoothgrad", ExplainParams(samples=3, seed=11))
    b = explain(resnet18, x, "smoothgrad", ExplainParams(samples=3, seed=11))
    c = explain(resnet18, x, "smoothgrad", ExplainParams(samples=3, seed=12))
    assert torch.equal(a.maps, b.maps)
    assert not torch.allclose(a.maps, c.maps)
    assert a.params.seed == 11
    # without a seed the engine draws one and reports it: replaying it reproduces the result
    d = explain(resnet18, x, "smoothgrad", ExplainParams(samples=3))
    assert d.params.seed is not None
    assert torch.equal(
        d.maps, explain(resnet18, x, "smoothgrad", ExplainParams(samples=3, seed=d.params.seed)).maps
    )


@pytest.mark.parametrize("method", ["smoothgrad", "smooth_ig"])
def test_an_image_alone_or_in_a_batch_gets_the_same_result(resnet18: ModelHandle, method: str) -> None:
    torch.manual_seed(8)
    x = torch.randn(3, 3, 32, 32)
    params = ExplainParams(samples=3, steps=3, seed=21, baseline="uniform")
    together = explain(
        resnet18, x, method, params.with_(batch_size=4), targets=Targets.given([[1], [2], [3]])
    )
    alone = explain(resnet18, x[1:2], method, params.with_(batch_size=1), targets=Targets.given([[2]]))
    assert together.attributions is not None and alone.attributions is not None
    close(alone.attributions[0], together.attributions[1], rel=1e-5)
    if method == "smooth_ig":
        assert together.completeness_delta is not None and alone.completeness_delta is not None
        scale = float(together.attributions[1].sum().abs())
        assert float(alone.completeness_delta[0, 0]) == pytest.approx(
            float(together.completeness_delta[1, 0]), abs=1e-4 * scale + 1e-6
        )


# ------------------------------------------------------------------------------------------------
# memory and progress
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "per_copy"), [("smoothgrad", 1), ("smooth_ig", 5 + 1)])
@pytest.mark.parametrize("samples", [2, 9])
def test_chunks_bound_memory_and_progress_adds_up(method: str, per_copy: int, samples: int) -> None:
    """Rows the model sees: per copy, the inner method's passes (IG: 5 steps + f(x)), plus for IG
    one row of its shared black baseline per chunk of copies (it counts as a pass per copy)."""
    torch.manual_seed(9)
    handle = ModelHandle(module=copy.deepcopy(Recorder()), optimize=False)
    x = torch.randn(2, 3, 12, 12)
    seen: list[float] = []
    SEEN.clear()
    params = ExplainParams(samples=samples, steps=5, batch_size=4)
    explain(handle, x, method, params, targets=Targets.given([[0, 3]] * 2), progress=seen.append)
    assert SEEN.pop(0) == 2  # the engine's own logits pass
    assert max(SEEN) <= 4  # never more than batch_size rows at once, whatever samples × steps
    chunks = -(-4 * samples // 4)  # 4 pairs × samples copies, batch_size 4 at a time
    assert sum(SEEN) == 4 * samples * per_copy + (chunks if method == "smooth_ig" else 0)
    assert seen == sorted(seen) and seen[-1] == 1.0 and all(p < 1.0 for p in seen[:-1])


def test_a_forked_child_can_still_draw() -> None:
    """Celery's prefork workers fork after the parent drew noise: the child gets fresh threads."""
    import multiprocessing as mp

    expected = draw_samples(0, 4, (3, 8, 8), seed=5, device=torch.device("cpu"))  # pool exists now
    child = mp.get_context("fork").Process(target=_draw_in_child, args=(expected.tolist(),))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung drawing noise")
    assert child.exitcode == 0  # 1: it drew other numbers


def _draw_in_child(expected: list[Any]) -> None:
    drawn = draw_samples(0, 4, (3, 8, 8), seed=5, device=torch.device("cpu"))
    os._exit(0 if drawn.tolist() == expected else 1)


# ------------------------------------------------------------------------------------------------
# VarGrad, SmoothGrad², GradientSHAP: further statistics of the same wrapper
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vargrad", "smoothgrad_sq"])
def test_vargrad_and_smoothgrad_sq_are_captums_statistics_over_our_noise(
    mnasnet: ModelHandle, method: str
) -> None:
    """Captum's ``NoiseTunnel`` statistics (smoothgrad_sq: mean of squares; vargrad: mean of
    squares − square of the mean) of its signed ``Saliency``, over our exact noisy copies."""
    torch.manual_seed(10)
    x = torch.randn(2, 3, 32, 32)
    params = ExplainParams(samples=5, noise_level=0.2, seed=31, batch_size=3)
    e = explain(mnasnet, x, method, params, targets=Targets.given(TARGETS))
    reference = CaptumSaliency(mnasnet.prepared())
    copies = noisy_inputs(x.repeat_interleave(2, dim=0), 0.2, samples=5, seed=31)
    grads = torch.stack(
        [reference.attribute(c.requires_grad_(True), target=FLAT_TARGETS, abs=False).detach() for c in copies]
    )
    square = (grads**2).mean(dim=0)
    ref = square if method == "smoothgrad_sq" else square - grads.mean(dim=0) ** 2
    assert e.attributions is not None
    close(e.attributions.reshape(4, 3, 32, 32), ref, rel=1e-3)
    close(e.maps.reshape(4, 32, 32), ref.amax(dim=1), rel=1e-3)
    assert not e.signed and bool((e.maps >= 0).all())


def test_gradient_shap_is_captums_given_our_noise_and_path_points(
    mnasnet: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captum's ``GradientShap`` is ``NoiseTunnel(InputBaselineXGradient)``; its α comes from
    ``np.random.uniform``, patched here to hand it ours, over our exact noisy copies."""
    from captum.attr._core.gradient_shap import InputBaselineXGradient

    from service.explainers.noise import path_points

    torch.manual_seed(11)
    x = torch.randn(2, 3, 32, 32)
    params = ExplainParams(samples=4, noise_level=0.1, seed=41, baseline="white", batch_size=3)
    e = explain(mnasnet, x, "gradient_shap", params, targets=Targets.given(TARGETS))
    _, hi = mnasnet.pixel_bounds(3)
    reference = InputBaselineXGradient(mnasnet.prepared())
    attrs = []
    for s, c in enumerate(noisy_inputs(x.repeat_interleave(2, dim=0), 0.1, samples=4, seed=41)):
        alpha = float(path_points(torch.tensor([s]), 41)[0])
        monkeypatch.setattr("numpy.random.uniform", lambda lo, up, n, a=alpha: [a] * n)
        attrs.append(reference.attribute(c, baselines=hi.expand_as(c).clone(), target=FLAT_TARGETS).detach())
    ref = torch.stack(attrs).mean(dim=0)
    assert e.attributions is not None
    close(e.attributions.reshape(4, 3, 32, 32), ref, rel=1e-3)
    close(e.maps.reshape(4, 32, 32), ref.sum(dim=1), rel=1e-3)


@pytest.mark.parametrize("method", ["vargrad", "smoothgrad_sq", "gradient_shap"])
def test_new_statistics_do_not_depend_on_the_batch(resnet18: ModelHandle, method: str) -> None:
    torch.manual_seed(12)
    x = torch.randn(3, 3, 32, 32)
    params = ExplainParams(samples=3, seed=22, baseline="uniform")
    together = explain(
        resnet18, x, method, params.with_(batch_size=4), targets=Targets.given([[1], [2], [3]])
    )
    alone = explain(resnet18, x[1:2], method, params.with_(batch_size=1), targets=Targets.given([[2]]))
    assert together.attributions is not None and alone.attributions is not None
    close(alone.attributions[0], together.attributions[1], rel=1e-4)
    again = explain(resnet18, x[1:2], method, params.with_(seed=23), targets=Targets.given([[2]]))
    assert not torch.allclose(again.maps, alone.maps)
