"""The perturbation family: occlusion and RISE.

Occlusion is deterministic, so it must equal Captum's ``Occlusion`` (same window, stride, baseline
and target logit) to float rounding, and a hand-worked linear model. RISE has no reference library
(Captum lacks it, see Captum #1150): it is checked on a model that reads one pixel, on its own
formula with the masks it draws, and for its seed promises. Both are black-box: they run on a
TorchScript module, which refuses hooks, exactly as on the eager model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from helpers import small_cnn
from torch import Tensor, nn

from service.errors import InvalidParameter
from service.explainers import ExplainParams, ModelHandle, Targets, explain, get_method
from service.explainers.hooks import hook_count
from service.explainers.path import make_baseline
from service.explainers.perturbation import rise_masks


def images(n: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# occlusion
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "stride", "baseline"), [(8, 4, "mean"), (8, 8, "black"), (5, 3, "white"), (4, 2, "mean")]
)
def test_occlusion_equals_captum(window: int, stride: int, baseline: str) -> None:
    net = small_cnn()
    handle = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    x = images(2, 32)
    targets = torch.tensor([1, 3])
    params = ExplainParams(window=window, stride=stride, baseline=baseline, seed=0, batch_size=7)  # type: ignore[arg-type]
    ours = explain(handle, x, "occlusion", params, targets=Targets.given([[1], [3]])).maps[:, 0]
    base = make_baseline(baseline, x, handle, 0)
    ref = CaptumOcclusion(net).attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=base,
        target=targets,
    )[:, 0]
    covered = ~torch.isnan(ref)  # Captum divides 0 by 0 where no window reaches (5/3 on 32 px)
    torch.testing.assert_close(ours[covered], ref[covered], rtol=1e-5, atol=1e-6)
    assert bool((ours[~covered] == 0).all())
    assert bool(covered.all()) == ((32 - window) % stride == 0)


def test_occlusion_on_a_linear_model_by_hand() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(3 * 8 * 8, 2)
    net = nn.Sequential(nn.Flatten(), linear).eval()
    handle = ModelHandle(net, input_size=(3, 8, 8), optimize=False)
    x = images(1, 8, seed=2)
    out = explain(handle, x, "occlusion", ExplainParams(window=4, stride=2, baseline="black", seed=0))
    target = int(out.targets[0, 0])
    weight = linear.weight.detach()[target].view(3, 8, 8)
    base = make_baseline("black", x, handle, 0)[0]
    contribution = (weight * (x[0] - base)).sum(dim=0)  # (8, 8): the logit's drop per pixel occluded
    total, count = torch.zeros(8, 8), torch.zeros(8, 8)
    for top in (0, 2, 4):
        for left in (0, 2, 4):
            drop = contribution[top : top + 4, left : left + 4].sum()
            total[top : top + 4, left : left + 4] += drop
            count[top : top + 4, left : left + 4] += 1
    torch.testing.assert_close(out.maps[0, 0], total / count, rtol=1e-5, atol=1e-6)


def test_occlusion_cost_and_bad_window() -> None:
    handle = ModelHandle(small_cnn(), input_size=(3, 32, 32))
    m = get_method("occlusion")
    assert m.cost(ExplainParams(window=8, stride=4), handle) == 7 * 7 + 1
    assert m.cost(ExplainParams(window=5, stride=3), handle) == 10 * 10 + 1
    with pytest.raises(InvalidParameter) as err:
        explain(handle, images(1), "occlusion", ExplainParams(window=33))
    assert err.value.field == "window"


# ------------------------------------------------------------------------------------------------
# RISE
# ------------------------------------------------------------------------------------------------
class OnePixel(nn.Module):
    """Two logits ±3·x[0, 5, 9]: class 0's probability grows with that one pixel."""

    def forward(self, x: Tensor) -> Tensor:
        v = 3.0 * x[:, 0, 5, 9]
        return torch.stack([v, -v], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rise_on_a_model_that_reads_one_pixel_puts_the_maximum_there(seed: int) -> None:
    """With the paper's N = 4000 masks; 8 × 8 cells of 2 px keep neighbours' masks apart enough
    that sampling noise does not move the maximum (4 × 4 cells of 4 px: one seed in four lands
    it on a neighbour)."""
    handle = ModelHandle(OnePixel(), input_size=(3, 16, 16), optimize=False)
    x = torch.ones(1, 3, 16, 16)
    params = ExplainParams(masks=4000, mask_cells=8, seed=seed, batch_size=512)
    out = explain(handle, x, "rise", params)
    assert int(out.targets[0, 0]) == 0
    flat = int(out.maps[0, 0].argmax())
    assert divmod(flat, 16) == (5, 9)


def test_rise_is_its_formula_over_its_masks() -> None:
    net = small_cnn()
    handle = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    x = images(2, 32, seed=3)
    params = ExplainParams(masks=24, mask_cells=5, mask_p=0.3, seed=9, batch_size=10)
    out = explain(handle, x, "rise", params, targets=Targets.given([[0], [4]]))
    masks = rise_masks(0, 24, params, (32, 32), 9)
    assert masks.shape == (24, 32, 32) and float(masks.min()) >= 0 and float(masks.max()) <= 1
    with torch.no_grad():
        for i, t in enumerate((0, 4)):
            prob = net(x[i] * masks[:, None]).softmax(dim=1)[:, t]
            ref = (prob.view(-1, 1, 1) * masks).sum(0) / (24 * 0.3)
            torch.testing.assert_close(out.maps[i, 0], ref, rtol=1e-4, atol=1e-6)


def test_rise_same_seed_same_map_whatever_the_batch() -> None:
    handle = ModelHandle(small_cnn(), input_size=(3, 32, 32), optimize=False)
    x = images(3, 32, seed=4)
    params = ExplainParams(masks=20, seed=11, batch_size=7)
    together = explain(handle, x, "rise", params).maps
    alone = explain(handle, x[2:], "rise", params.with_(batch_size=3)).maps
    torch.testing.assert_close(alone, together[2:], rtol=1e-5, atol=1e-6)
    other = explain(handle, x[2:], "rise", params.with_(seed=12)).maps
    assert not torch.allclose(other, alone)
    assert get_method("rise").cost(params, handle) == 21


# ------------------------------------------------------------------------------------------------
# black-box: TorchScript
# ------------------------------------------------------------------------------------------------
def test_black_box_methods_run_on_torchscript_as_on_the_eager_model() -> None:
    net = small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    scripted = ModelHandle(traced, input_size=(3, 32, 32))
    eager = ModelHandle(net, input_size=(3, 32, 32), optimize=False)
    x = images(2, 32, seed=6)
    for method, params in (
        ("occlusion", ExplainParams(window=8, stride=8, baseline="mean", seed=0)),
        ("rise", ExplainParams(masks=16, seed=2)),
    ):
        assert get_method(method).offered(scripted)
        ours = explain(scripted, x, method, params)
        ref = explain(eager, x, method, params)
        assert torch.equal(ours.targets, ref.targets)
        torch.testing.assert_close(ours.maps, ref.maps, rtol=1e-4, atol=1e-5)
    assert hook_count(net) == 0
