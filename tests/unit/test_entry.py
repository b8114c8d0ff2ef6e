"""The affine entry (``service.explainers.entry``): which models have one, and that IG through it
is the IG of running every step in full, agreeing with Captum."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torchvision
from captum.attr import IntegratedGradients as CaptumIG
from helpers import every_ig_step_in_full, random_mnasnet, random_resnet18
from torch import Tensor, nn

from service.explainers import ExplainParams, ModelHandle, Targets, explain
from service.explainers.base import RunContext
from service.explainers.entry import find_entry
from service.explainers.hooks import hook_count
from service.explainers.path import make_baseline


def entry_name(model: nn.Module, side: int = 32, *, bf16: bool = False) -> str | None:
    handle = ModelHandle(module=model, input_size=(3, side, side))
    copy = handle.prepared(precision="bf16" if bf16 else "fp32")
    ctx = RunContext(handle=handle, model=copy, params=ExplainParams(precision="bf16" if bf16 else "fp32"))
    found = find_entry(copy, handle.probe_input(), ctx.autocast)
    assert hook_count(copy) == 0
    return None if found is None else found.name


class Tiny(nn.Module):
    """A convolution, a ReLU, global pooling and a linear head: its ``conv`` is an affine entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def head(self, h: Tensor) -> Tensor:
        return self.fc(torch.relu(h).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))


class TwoPaths(Tiny):
    """The input reaches the output past the first convolution too."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x) + x.mean(1, keepdim=True))


class Clamped(Tiny):
    """A clamp before the first convolution: its output is not affine in the input."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x.clamp(-1, 1)))


class SizeChecked(Tiny):
    """Refuses inputs of another size (as a ViT does): the rest must run on a full-size stand-in."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 32:
            raise ValueError("32 px only")
        return super().forward(x)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 32 * 32, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_the_first_convolution_of_common_cnns_is_their_entry() -> None:
    torch.manual_seed(0)
    assert entry_name(torchvision.models.resnet18(num_classes=5).eval()) == "conv1"
    assert entry_name(torchvision.models.mobilenet_v3_small(num_classes=5).eval()) == "features.0.0"
    assert entry_name(torchvision.models.densenet121(num_classes=5).eval()) == "features.conv0"
    # in a bf16 copy the entry is in the fp32 stages (precision.fp32_region), so still affine
    assert entry_name(torchvision.models.resnet18(num_classes=5).eval(), 64, bf16=True) == "conv1"


@pytest.mark.parametrize("model", [TwoPaths, Clamped, Mlp])
def test_models_without_an_affine_entry_have_none(model: type[nn.Module]) -> None:
    torch.manual_seed(0)
    assert entry_name(model().eval()) is None


def test_torchscript_has_no_entry() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    assert entry_name(traced) is None


def test_a_model_that_checks_its_input_size_gets_a_full_size_stand_in() -> None:
    torch.manual_seed(0)
    handle = ModelHandle(module=SizeChecked().eval(), input_size=(3, 32, 32))
    copy = handle.prepared()
    found = find_entry(copy, handle.probe_input(), RunContext(handle, copy, ExplainParams()).autocast)
    assert found is not None and found.name == "conv" and found.side is None


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Smooth(nn.Module):
    """A CNN without kinks (SiLU, average pooling): float32 rounding moves its gradients by
    rounding only, so IG through the entry and IG in full must agree to float32 precision. (On a
    ReLU network a kink within rounding of a path point moves a few pixels either way: see the
    ResNet-18 test below.)"""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.Tanh(),
        )
        self.head = nn.Linear(32, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def smooth() -> ModelHandle:
    torch.manual_seed(2)
    net = Smooth()
    with torch.no_grad():  # a BatchNorm that is not the identity, for prepare to fold
        bn = net.features[1]
        assert isinstance(bn, nn.BatchNorm2d)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return ModelHandle(module=net.eval(), name="smooth")


def both_ways_agree(
    handle: ModelHandle, x: Tensor, params: ExplainParams, targets: Targets, bound: float
) -> None:
    """IG through the entry and IG in full: maps within ``bound`` (relative L2), completeness
    deltas within ``bound`` of the largest attribution total."""
    ours = explain(handle, x, "integrated_gradients", params, targets=targets)
    with every_ig_step_in_full():
        full = explain(handle, x, "integrated_gradients", params, targets=targets)
    assert ours.attributions is not None and full.attributions is not None
    assert rel(ours.attributions, full.attributions) < bound
    assert ours.completeness_delta is not None and full.completeness_delta is not None
    scale = float(full.attributions.sum(dim=(2, 3, 4)).abs().max())
    torch.testing.assert_close(ours.completeness_delta, full.completeness_delta, atol=bound * scale, rtol=0)


@pytest.fixture(scope="module")
def mnasnet() -> ModelHandle:
    return ModelHandle(module=random_mnasnet(), name="mnasnet0_5")


# steps < batch_size: several pairs a chunk; steps > batch_size: a pair over several chunks
@pytest.mark.parametrize(("steps", "batch_size"), [(4, 7), (9, 4), (6, 6)])
@pytest.mark.parametrize("baseline", ["black", "blur", "uniform"])
def test_ig_through_the_entry_is_ig_in_full(
    smooth: ModelHandle, steps: int, batch_size: int, baseline: str
) -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 3, 40, 40)
    params = ExplainParams(steps=steps, batch_size=batch_size, baseline=baseline, seed=4)  # type: ignore[arg-type]
    both_ways_agree(smooth, x, params, Targets.given([[1, 2], [3, 4], [5, 6]]), bound=1e-5)
    assert hook_count(smooth.module) == 0 and hook_count(smooth.prepared()) == 0


@pytest.mark.parametrize("which", ["smooth", "mnasnet"])
def test_ig_through_the_entry_agrees_with_captum(
    smooth: ModelHandle, mnasnet: ModelHandle, which: str
) -> None:
    """Captum runs every step in full on the same prepared copy; MNASNet's ReLU kinks allow
    rounding-sized moves of a few pixels (measured: relative L2 ≤ 2e-4)."""
    handle, bound = (smooth, 1e-5) if which == "smooth" else (mnasnet, 1e-3)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 40, 40)
    params = ExplainParams(steps=8, baseline="white", batch_size=5)
    ours = explain(handle, x, "integrated_gradients", params, targets=Targets.given([[3], [1]]))
    ref = CaptumIG(handle.prepared()).attribute(
        x, baselines=make_baseline("white", x, handle, 0), target=[3, 1], n_steps=8, method="gausslegendre"
    )
    assert ours.attributions is not None
    assert rel(ours.attributions.reshape(ref.shape), ref.detach()) < bound


def test_smooth_ig_runs_through_the_entry_too(smooth: ModelHandle) -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 3, 40, 40)
    params = ExplainParams(steps=4, samples=3, batch_size=5, seed=2)
    calls: list[int] = []
    with mock.patch.object(RunContext, "entry", autospec=True, side_effect=lambda ctx: record(ctx, calls)):
        ours = explain(smooth, x, "smooth_ig", params)
    assert calls and all(found for found in calls)
    with every_ig_step_in_full():
        full = explain(smooth, x, "smooth_ig", params)
    assert ours.attributions is not None and full.attributions is not None
    assert rel(ours.attributions, full.attributions) < 1e-5


def record(ctx: RunContext, calls: list[int]) -> object:
    from service.explainers.entry import entry_of

    found = entry_of(ctx.model, ctx.handle.probe_input, ctx.autocast)
    calls.append(int(found is not None))
    return found


def test_on_resnet18_the_two_ways_differ_only_by_rounding_at_relu_kinks() -> None:
    """A random ResNet-18 puts ReLU kinks within float32 rounding of some path points: the entry's
    rounding (as a 1e-7 change of the baseline does) moves a few pixels, the total stays."""
    handle = ModelHandle(module=random_resnet18(), name="resnet18")
    torch.manual_seed(11)
    x = torch.randn(2, 3, 40, 40)
    params = ExplainParams(steps=6, baseline="uniform", batch_size=5, seed=123)
    both_ways_agree(handle, x, params, Targets.given([[3, 7], [1, 0]]), bound=1e-2)


def test_the_rest_runs_in_the_same_chunks_and_the_entry_once_per_image(mnasnet: ModelHandle) -> None:
    """The passes through the rest of the model come in the chunks of the full passes; the
    entry's own forwards are one per clean row and baseline plus one pull-back per finished run of
    pairs — none per step."""
    torch.manual_seed(7)
    x = torch.randn(3, 3, 40, 40)
    copy = mnasnet.prepared()
    sizes: list[tuple[int, int]] = []

    def count(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        sizes.append((int(args[0].shape[0]), int(args[0].shape[-1])))

    params = ExplainParams(steps=5, batch_size=4, baseline="black")
    explain(mnasnet, x, "integrated_gradients", params, targets=Targets.given([[1], [2], [3]]))  # entry found
    hook = copy.register_forward_pre_hook(count)
    try:
        explain(mnasnet, x, "integrated_gradients", params, targets=Targets.given([[1], [2], [3]]))
    finally:
        hook.remove()
    rest = [n for n, side in sizes if side < 40]  # the small stand-in input
    assert rest == [4, 4, 4, 3]  # 3 pairs × 5 steps in chunks of 4
    full = [n for n, side in sizes if side == 40]
    # endpoints: 3 clean rows + 1 black row in chunks of 4; then E(x') once, E(x) of each pair
    # once, and ≤ one pull-back per chunk
    assert full[:1] == [4]
    entry_rows = sum(full[1:])
    assert 1 + 3 <= entry_rows <= 1 + 3 + 3
