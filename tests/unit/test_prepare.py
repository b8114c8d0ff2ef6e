"""The prepared copy: BatchNorm folded into convolutions, channels_last, and nothing else changed.

Freshly initialised BatchNorms are nearly the identity (mean 0, variance 1, γ 1, β 0), so a wrong
fold would go unnoticed on them: every model here first gets random BatchNorm statistics and
affine parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from unittest import mock

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn

from service.explainers.hooks import hook_count
from service.explainers.prepare import (
    FoldedBatchNorm,
    FoldedBatchNormAct,
    SamePadding,
    close,
    fold_pairs,
    prepare_model,
    unpad_same_convs,
)


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


ARCHS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name: (builder, BatchNorms that follow a convolution directly)
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 20),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=5), 59),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=5), 49),
    "tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5), 49),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module, int]:
    name = request.param
    build, folds = ARCHS[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build())
    return name, model, prepare_model(model), folds


def image(n: int = 2, size: int = 64, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits_and_grad(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (grad,) = torch.autograd.grad(out[:, 0].sum() - out[:, 1].sum(), xi)
    return out.detach(), grad


def folded_count(model: nn.Module) -> int:
    return sum(isinstance(m, FoldedBatchNorm | FoldedBatchNormAct) for m in model.modules())


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "hooks": hook_count(model),
        "formats": [p.is_contiguous() for p in model.parameters()],
    }


def assert_same_snapshot(a: dict[str, object], b: dict[str, object]) -> None:
    sa, sb = a["state"], b["state"]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for key in ("types", "training", "grad", "hooks", "formats"):
        assert a[key] == b[key], key


# ------------------------------------------------------------------------------------------------
# the folding arithmetic on a model small enough to check by hand
# ------------------------------------------------------------------------------------------------
class ConvBn(nn.Module):
    def __init__(self, bias: bool = True, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=bias)
        self.bn = nn.BatchNorm2d(2, affine=affine, eps=0.0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
            if self.conv.bias is not None:
                self.conv.bias.copy_(torch.tensor([1.0, 3.0]))
            self.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))  # type: ignore[union-attr]
            self.bn.running_var.copy_(torch.tensor([4.0, 0.25]))  # type: ignore[union-attr]
            if affine:
                self.bn.weight.copy_(torch.tensor([3.0, 2.0]))
                self.bn.bias.copy_(torch.tensor([0.5, -1.0]))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.bn(self.conv(x))
        return out.mean(dim=(2, 3))


@pytest.mark.parametrize(
    ("bias", "affine", "weight", "shift"),
    [
        # channel 0: (2x + 1 − 1)/2·3 + 0.5 = 3x + 0.5;  channel 1: (−x + 3 + 2)/0.5·2 − 1 = −4x + 19
        (True, True, [3.0, -4.0], [0.5, 19.0]),
        # no conv bias: (2x − 1)/2·3 + 0.5 = 3x − 1;  (−x + 2)/0.5·2 − 1 = −4x + 7
        (False, True, [3.0, -4.0], [-1.0, 7.0]),
        # no affine: (2x + 1 − 1)/2 = x;  (−x + 3 + 2)/0.5 = −2x + 10
        (True, False, [1.0, -2.0], [0.0, 10.0]),
    ],
)
def test_fold_arithmetic_by_hand(bias: bool, affine: bool, weight: list[float], shift: list[float]) -> None:
    model = ConvBn(bias=bias, affine=affine).eval()
    assert fold_pairs(model, [("conv", "bn")]) == [("conv", "bn")]
    assert isinstance(model.bn, FoldedBatchNorm)
    assert model.conv.bias is not None
    torch.testing.assert_close(model.conv.weight.view(2), torch.tensor(weight))
    torch.testing.assert_close(model.conv.bias, torch.tensor(shift))


def test_prepare_folds_the_hand_model_and_keeps_its_values() -> None:
    model = ConvBn().eval()
    x = image(2, 4)[:, :1]
    prepared = prepare_model(model)
    assert isinstance(prepared.get_submodule("bn"), FoldedBatchNorm)
    torch.testing.assert_close(prepared(x), model(x))


# ------------------------------------------------------------------------------------------------
# real architectures
# ------------------------------------------------------------------------------------------------
def test_prepared_copy_computes_the_same_logits_and_input_gradients(
    arch: tuple[str, nn.Module, nn.Module, int],
) -> None:
    _, model, prepared, folds = arch
    assert folded_count(prepared) == folds
    x = image(size=32)
    ref_out, ref_grad = logits_and_grad(model, x)
    out, grad = logits_and_grad(prepared, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * float(ref_out.abs().max()))
    # a rounding-level change may flip a unit at a ReLU kink, which moves the input gradient by
    # up to ~0.5 % (see prepare._equivalent): compare in norm
    assert close(ref_grad, grad, 2e-2, norm=True)


def test_folding_is_exact_in_float64(arch: tuple[str, nn.Module, nn.Module, int]) -> None:
    """Fold in float64 and compare in float64: no rounding, so logits and gradients agree tightly."""
    import service.explainers.prepare as prepare

    _, model, _, folds = arch
    plain = copy.deepcopy(model).double()
    probe = prepare._probe(prepare_model(model, optimize=False), None)
    assert probe is not None and len(probe.pairs) == folds
    folded = copy.deepcopy(plain)
    fold_pairs(folded, probe.pairs)
    x = image(size=32).double()
    ref_out, ref_grad = logits_and_grad(plain, x)
    out, grad = logits_and_grad(folded, x)
    assert close(ref_out, out, 1e-10, norm=False)
    assert close(ref_grad, grad, 1e-10, norm=True)


def test_prepared_copy_keeps_every_module_name(arch: tuple[str, nn.Module, nn.Module, int]) -> None:
    _, model, prepared, _ = arch
    assert [n for n, _ in prepared.named_modules()] == [n for n, _ in model.named_modules()]


def test_prepared_copy_has_no_parameter_gradients_and_is_in_eval_mode(
    arch: tuple[str, nn.Module, nn.Module, int],
) -> None:
    _, _, prepared, _ = arch
    assert not any(p.requires_grad for p in prepared.parameters())
    assert not any(m.training for m in prepared.modules())
    assert hook_count(prepared) == 0


def test_prepared_copy_is_channels_last(arch: tuple[str, nn.Module, nn.Module, int]) -> None:
    _, _, prepared, _ = arch
    convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[2:] != (1, 1)]
    assert convs
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_prepared_copy_shares_no_tensor_with_the_model(arch: tuple[str, nn.Module, nn.Module, int]) -> None:
    _, model, prepared, _ = arch
    ours = {t.data_ptr() for t in (*prepared.parameters(), *prepared.buffers()) if t.numel()}
    theirs = {t.data_ptr() for t in (*model.parameters(), *model.buffers()) if t.numel()}
    assert not ours & theirs


def test_timm_batchnorm_act_keeps_its_activation() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(timm.create_model("tf_efficientnet_lite0", num_classes=5))
    prepared = prepare_model(model)
    bn1 = prepared.get_submodule("bn1")
    assert isinstance(bn1, FoldedBatchNormAct)
    assert isinstance(bn1.act, nn.ReLU6)
    assert isinstance(prepared.get_submodule("bn1.act"), nn.ReLU6)


def test_hooks_on_containers_still_fire() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(torchvision.models.resnet18(num_classes=5))
    prepared = prepare_model(model)
    seen: dict[str, list[Tensor]] = {"model": [], "prepared": []}

    def recorder(key: str) -> Callable[[nn.Module, object, Tensor], None]:
        return lambda _m, _i, out: seen[key].append(out.detach().clone())

    x = image()
    h1 = model.layer4.register_forward_hook(recorder("model"))
    h2 = prepared.get_submodule("layer4").register_forward_hook(recorder("prepared"))
    try:
        with torch.no_grad():
            model(x)
            prepared(x)
    finally:
        h1.remove()
        h2.remove()
    assert len(seen["model"]) == len(seen["prepared"]) == 1
    ref = seen["model"][0]
    torch.testing.assert_close(seen["prepared"][0], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("optimize", [True, False])
def test_the_given_model_is_untouched(optimize: bool) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(timm.create_model("tf_efficientnet_lite0", num_classes=5))
    model.blocks[0].requires_grad_(False)  # mixed flags must survive as they are
    model.train()
    before = snapshot(model)
    rng = torch.random.get_rng_state()
    prepared = prepare_model(model, optimize=optimize)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is not consumed
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert folded_count(prepared) == (49 if optimize else 0)


def test_without_optimize_only_eval_and_gradients_change() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(torchvision.models.resnet18(num_classes=5))
    plain = prepare_model(model, optimize=False)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert all(p.is_contiguous() for p in plain.parameters())
    x = image()
    assert torch.equal(plain(x), model(x))


# ------------------------------------------------------------------------------------------------
# what must not be folded
# ------------------------------------------------------------------------------------------------
def capture_output(model: nn.Module, name: str, x: Tensor) -> Tensor:
    box: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: box.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return box[0]


@pytest.mark.parametrize(
    ("build", "keep", "bn"),
    [
        (lambda: torchvision.models.resnet18(num_classes=5), "conv1", "bn1"),
        (lambda: torchvision.models.resnet18(num_classes=5), "layer4.1.conv2", "layer4.1.bn2"),
        (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5), "conv_stem", "bn1"),
    ],
)
def test_keep_layer_output_stays_exact(build: Callable[[], nn.Module], keep: str, bn: str) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(build())
    prepared = prepare_model(model, keep=keep)
    assert type(prepared.get_submodule(bn)) is type(model.get_submodule(bn))  # this pair is kept
    assert folded_count(prepared) == folded_count(prepare_model(model)) - 1  # the others still fold
    x = image()
    ref = capture_output(model, keep, x)
    torch.testing.assert_close(
        capture_output(prepared, keep, x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())
    )


class SharedConvOutput(nn.Module):
    """The convolution's output feeds the BatchNorm and, functionally, a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        y = torch.relu(self.bn(h)) + h
        return self.fc(self.bn2(self.conv2(y)).mean(dim=(2, 3)))


class ReusedBatchNorm(nn.Module):
    """One BatchNorm applied after two different convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.bn(self.b(self.bn(self.a(x)))).mean(dim=(2, 3)))


def test_a_conv_output_read_elsewhere_is_not_folded() -> None:
    model = randomise_batchnorms(SharedConvOutput())
    prepared = prepare_model(model)
    assert isinstance(prepared.get_submodule("bn"), nn.BatchNorm2d)
    assert isinstance(prepared.get_submodule("bn2"), FoldedBatchNorm)
    x = image(2, 8)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_batchnorm_used_twice_is_not_folded() -> None:
    model = randomise_batchnorms(ReusedBatchNorm())
    prepared = prepare_model(model)
    assert folded_count(prepared) == 0
    x = image(2, 8)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_failed_check_falls_back_to_the_plain_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.explainers.prepare as prepare

    real = prepare._fold_into

    def wrong(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        real(conv, bn)
        with torch.no_grad():
            assert conv.bias is not None
            conv.bias.add_(0.5)  # a fold that is off by a constant

    monkeypatch.setattr(prepare, "_fold_into", wrong)
    model = randomise_batchnorms(ConvBn())
    prepared = prepare_model(model)
    assert isinstance(prepared.get_submodule("bn"), nn.BatchNorm2d)
    x = image(2, 4)[:, :1]
    torch.testing.assert_close(prepared(x), model(x))


def test_a_model_that_cannot_run_the_probe_is_copied_plainly() -> None:
    class Fussy(ConvBn):
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[-1] != 5:
                raise ValueError("only 5×5 inputs")
            return super().forward(x)

    model = Fussy().eval()
    prepared = prepare_model(model)
    assert isinstance(prepared.get_submodule("bn"), nn.BatchNorm2d)
    assert not any(p.requires_grad for p in prepared.parameters())


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*is deprecated:FutureWarning")
def test_torchscript_is_used_as_it_is() -> None:
    scripted = torch.jit.script(randomise_batchnorms(ConvBn()))
    state = {k: v.clone() for k, v in scripted.state_dict().items()}
    assert prepare_model(scripted) is scripted
    assert all(torch.equal(v, state[k]) for k, v in scripted.state_dict().items())


def test_the_float64_check_used_off_the_cpu_accepts_a_fold_and_rejects_a_wrong_one() -> None:
    import service.explainers.prepare as prepare

    model = randomise_batchnorms(ConvBn())
    folded = copy.deepcopy(model)
    fold_pairs(folded, [("conv", "bn")])
    x = image(1, 4)[:, :1]
    assert prepare._equivalent(model, folded, x, float64=True)
    with torch.no_grad():
        folded.conv.bias.add_(1e-3)  # type: ignore[union-attr]
    assert not prepare._equivalent(model, folded, x, float64=True)
    assert model.conv.weight.dtype == folded.conv.weight.dtype == torch.float32  # copies were cast


# ------------------------------------------------------------------------------------------------
# TF "SAME" convolutions without a padded copy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "side"),
    [
        (3, 2, 1, 112),
        (3, 2, 1, 113),
        (5, 2, 1, 56),
        (5, 2, 1, 57),
        (3, 1, 1, 20),
        (3, 2, 2, 30),
        (4, 3, 1, 31),
    ],
)
@pytest.mark.parametrize("groups", [1, 4])
def test_same_padding_inside_the_convolution_is_timms(
    kernel: int, stride: int, dilation: int, side: int, groups: int
) -> None:
    """Even and odd sides (asymmetric and symmetric padding), strides 1–3, a dilated kernel (which
    keeps timm's padded copy), a plain and a grouped convolution: the same outputs and input
    gradients as timm's ``Conv2dSame``, in float64 to the last bits of float32."""
    torch.manual_seed(side + kernel)
    ref = timm.layers.Conv2dSame(8, 8, kernel, stride, dilation=dilation, groups=groups).double()
    ours = copy.deepcopy(ref)
    assert unpad_same_convs(ours) == 1 and isinstance(vars(ours)["forward"], SamePadding)
    x = torch.randn(2, 8, side, side + 1, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(a), ours(b)
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ya)
    (ga,), (gb,) = torch.autograd.grad(ya, a, g), torch.autograd.grad(yb, b, g)
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)


def test_same_padding_for_timms_tf_models_keeps_names_and_hooks() -> None:
    """A TF-ported timm model: its SAME convolutions run unpadded in the prepared copy, which
    computes what the model does, names every module as it does, fires hooks on them and can be
    deep-copied (the bf16 copy and each ``keep`` layer's copy are made from it)."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) == 5  # the stem and the four stride-2 depthwise convolutions
    prepared = prepare_model(model)
    assert all(isinstance(vars(prepared.get_submodule(n)).get("forward"), SamePadding) for n in same)
    assert [n for n, _ in prepared.named_modules()] == [n for n, _ in model.named_modules()]
    seen: list[tuple[int, ...]] = []
    hook = prepared.get_submodule(same[1]).register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape))
    )
    x = torch.randn(2, 3, 224, 224)
    try:
        with torch.no_grad():
            got, want = prepared(x), model(x)
    finally:
        hook.remove()
    assert seen == [(2, 96, 56, 56)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    again = copy.deepcopy(prepared)
    assert vars(again.get_submodule(same[0]))["forward"].conv is again.get_submodule(same[0])
    with torch.no_grad():
        torch.testing.assert_close(again(x), got)


def test_same_padding_pads_a_copy_in_bf16() -> None:
    """In bf16 (weights stored in bf16, or under autocast) the input is padded as timm pads it: the
    widened kernel's bf16 depthwise backward is the slower of the two; in float32 only the kernel is."""
    conv = timm.layers.Conv2dSame(8, 8, 3, 2, groups=8)
    unpad_same_convs(conv)
    x = torch.randn(2, 8, 16, 16)
    padded: list[tuple[int, ...]] = []
    real_pad = nn.functional.pad

    def pad(t: Tensor, *args: object, **kwargs: object) -> Tensor:
        padded.append(tuple(t.shape))
        return real_pad(t, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(nn.functional, "pad", pad):
        conv(x)
        assert padded == [(8, 1, 3, 3)]  # float32: the kernel, not the input
        padded.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x)
        assert padded == [(2, 8, 16, 16)]
        padded.clear()
        conv.to(torch.bfloat16)(x.bfloat16())
        assert padded == [(2, 8, 16, 16)]
