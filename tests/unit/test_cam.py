"""The CAM family on models small enough to work out by hand, plus the identities between methods.

The hand model (``TinyCam``): a 1×1 convolution reading only the first of three input channels
(a ``ModelHandle`` describes RGB inputs; the other two channels are noise the weights ignore),
``c1 = x``, ``c2 = 1 − x``; ReLU; global average pooling; a linear layer
``y0 = 2·p1 − p2 + 0.5``, ``y1 = −p1 + 3·p2``. The target layer is the ReLU, so the maps are
4×4 like the input and the engine does no upsampling: every number below is exact.

    x  = [[ 2, 0,  1, -1],     f1 = ReLU(x)     = [[2,0,1,0],[0,3,0,1],[0,1,0,2],[1,0,0,0]]  Σ = 11
          [ 0, 3,  0,  1],     f2 = ReLU(1 − x) = [[0,1,0,2],[1,0,1,0],[3,0,1,0],[0,1,2,1]]  Σ = 13
          [-2, 1,  0,  2],
          [ 1, 0, -1,  0]]     y0 = 2·11/16 − 13/16 + 1/2 = 17/16,   y1 = −11/16 + 39/16 = 28/16

Gradients at the layer are constant per channel: ∂y_c/∂f_k(x,y) = W[c,k] / 16.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from service.errors import MethodNotApplicable
from service.explainers import ExplainParams, ModelHandle, Targets, explain, get_method
from service.explainers.class_cam import CamHead, detect_head
from service.explainers.hooks import hook_count

X = [[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 1.0], [-2.0, 1.0, 0.0, 2.0], [1.0, 0.0, -1.0, 0.0]]
F1 = torch.tensor([[2.0, 0, 1, 0], [0, 3, 0, 1], [0, 1, 0, 2], [1, 0, 0, 0]])
F2 = torch.tensor([[0.0, 1, 0, 2], [1, 0, 1, 0], [3, 0, 1, 0], [0, 1, 2, 1]])
# CAM_c = Σ_k W[c,k] f_k, worked out entry by entry
CAM0 = torch.tensor([[4.0, -1, 2, -2], [-1, 6, -1, 2], [-3, 2, -1, 4], [2, -1, -2, -1]])  # 2·f1 − f2
CAM1 = torch.tensor([[-2.0, 3, -1, 6], [3, -3, 3, -1], [9, -1, 3, -2], [-1, 3, 6, 3]])  # −f1 + 3·f2


class TinyCam(nn.Module):
    def __init__(
        self, conv_weight: tuple[float, float] = (1.0, -1.0), conv_bias: tuple[float, float] = (0, 1)
    ):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 0, 0] = torch.tensor(conv_weight)
            self.conv.bias.copy_(torch.tensor(conv_bias))
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 3.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, 0.0]))
        self.below_target_required_grad: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        self.below_target_required_grad.append(h.requires_grad)
        return self.fc(self.pool(self.act(h)).flatten(1))


def tiny_input() -> Tensor:
    """1×3×4×4: channel 0 is ``X``; channels 1 and 2 are noise the convolution ignores."""
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[0, 0] = torch.tensor(X)
    return x


def tiny_handle(**kw: tuple[float, float]) -> ModelHandle:
    return ModelHandle(TinyCam(**kw).eval(), target_layer="act", name="tiny")


def maps(handle: ModelHandle, method: str, x: Tensor, targets: list[int], **params: Any) -> Tensor:
    return explain(handle, x, method, ExplainParams(**params), targets=Targets.given([targets])).maps[0]


# ------------------------------------------------------------------------------------------------
# hand-worked maps
# ------------------------------------------------------------------------------------------------
def test_tiny_model_logits_are_the_hand_values() -> None:
    y = TinyCam().eval()(tiny_input())
    torch.testing.assert_close(y, torch.tensor([[17 / 16, 28 / 16]]))


def test_cam_by_hand() -> None:
    out = explain(tiny_handle(), tiny_input(), "cam", targets=Targets.given([[0, 1]]))
    torch.testing.assert_close(out.maps[0, 0], CAM0)
    torch.testing.assert_close(out.maps[0, 1], CAM1)
    assert out.signed
    # no ReLU, no bias: the map's mean plus the bias is the logit (9/16 + 1/2 = 17/16, 28/16 + 0)
    torch.testing.assert_close(out.maps[0].mean(dim=(1, 2)) + torch.tensor([0.5, 0.0]), out.logits[0])


def test_gradcam_by_hand() -> None:
    # α_k = W[c,k]/16 → Grad-CAM_c = ReLU(CAM_c)/16
    got = maps(tiny_handle(), "gradcam", tiny_input(), [0, 1])
    torch.testing.assert_close(got[0], CAM0.clamp(min=0) / 16)
    torch.testing.assert_close(got[1], CAM1.clamp(min=0) / 16)
    assert got[0, 1, 1] == pytest.approx(6 / 16) and got[0, 0, 1] == 0.0


@pytest.mark.parametrize("method", ["hirescam", "xgradcam"])
def test_gap_head_variants_equal_gradcam_by_hand(method: str) -> None:
    # HiResCAM: Σ_k (W[c,k]/16)·f_k = CAM/16 before the ReLU. XGrad-CAM: Σ_xy (f_k/Σf_k)·W[c,k]/16 = W[c,k]/16.
    got = maps(tiny_handle(), method, tiny_input(), [0, 1])
    torch.testing.assert_close(got[0], CAM0.clamp(min=0) / 16)
    torch.testing.assert_close(got[1], CAM1.clamp(min=0) / 16)


def test_gradcam_pp_by_hand() -> None:
    # class 0, channel 1: g = 2/16 = 1/8, Σf1 = 11: α = g²/(2g² + 11·g³) = (1/64)/(2/64 + 11/512) = 8/27;
    #   w1 = Σ_xy α·ReLU(g) = 16 · 8/27 · 1/8 = 16/27. Channel 2: g = −1/16, ReLU(g) = 0 → w2 = 0.
    # class 1, channel 2: g = 3/16, Σf2 = 13: α = (9/256)/(18/256 + 13·27/4096) = 144/639 = 16/71;
    #   w2 = 16 · 16/71 · 3/16 = 48/71. Channel 1: g = −1/16 → w1 = 0.
    got = maps(tiny_handle(), "gradcam_pp", tiny_input(), [0, 1])
    torch.testing.assert_close(got[0], 16 / 27 * F1)
    torch.testing.assert_close(got[1], 48 / 71 * F2)


def test_layercam_by_hand() -> None:
    # ReLU(Σ_k ReLU(W[c,k]/16)·f_k): class 0 → (2/16)·f1, class 1 → (3/16)·f2
    got = maps(tiny_handle(), "layercam", tiny_input(), [0, 1])
    torch.testing.assert_close(got[0], F1 / 8)
    torch.testing.assert_close(got[1], 3 / 16 * F2)


def test_scorecam_by_hand() -> None:
    # Masks: H1 = f1/3 and H2 = f2/3 (min 0, max 3; no upsampling). Channel 0 of the masked images:
    #   x∘H1: 4/3 (×2), 1/3 (×4), 3 (×1), 0 (×9) → Σf1 = 7, Σf2 = 9·1 + 4·(2/3) = 35/3
    #         y0 = (14 − 35/3)/16 + 1/2 = 31/48, y1 = (−7 + 35)/16 = 84/48  → y1 − y0 = 53/48
    #   x∘H2: −2/3 (×2), −2 (×1), 0 (×13) → Σf1 = 0, Σf2 = 2·(5/3) + 3 + 13 = 58/3
    #         y0 = −58/48 + 1/2 = −34/48, y1 = 58/16 = 174/48          → y1 − y0 = 13/3
    # α_k = softmax(f(x∘H_k))_c = σ(±(y0 − y1)); map = ReLU(α1·f1 + α2·f2) (the maps are ≥ 0).
    def sigmoid(t: float) -> float:
        return 1 / (1 + math.exp(-t))

    got = maps(tiny_handle(), "scorecam", tiny_input(), [0, 1])
    torch.testing.assert_close(got[0], sigmoid(-53 / 48) * F1 + sigmoid(-13 / 3) * F2)
    torch.testing.assert_close(got[1], sigmoid(53 / 48) * F1 + sigmoid(13 / 3) * F2)


def test_eigencam_by_hand() -> None:
    # conv weights (1, 2), no bias: f2 = 2·f1, so the centred observations are (f1 − 11/16)·(1, 2);
    # first principal axis v = (1, 2)/√5 (loadings summing ≥ 0), projection = √5·(f1 − 11/16).
    handle = tiny_handle(conv_weight=(1.0, 2.0), conv_bias=(0.0, 0.0))
    got = maps(handle, "eigencam", tiny_input(), [0, 1])
    expected = (math.sqrt(5) * (F1 - 11 / 16)).clamp(min=0)
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], expected)  # class-agnostic


# ------------------------------------------------------------------------------------------------
# CAM versus Grad-CAM, and where CAM applies
# ------------------------------------------------------------------------------------------------
def test_cam_is_gradcam_times_hw_by_hand() -> None:
    # Grad-CAM = ReLU(CAM)/(h·w): equal to CAM/(h·w) where CAM ≥ 0, zero where CAM < 0.
    handle, x = tiny_handle(), tiny_input()
    cam = maps(handle, "cam", x, [0, 1])
    grad = maps(handle, "gradcam", x, [0, 1])
    assert bool((cam < 0).any()) and bool((cam > 0).any())
    torch.testing.assert_close(grad * 16, cam.clamp(min=0))
    torch.testing.assert_close((grad * 16)[cam >= 0], cam[cam >= 0])
    assert bool((grad[cam < 0] == 0).all())


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_cam_equals_gradcam_times_hw_on_resnet18() -> None:
    # On a GAP + linear head the identity CAM = (h·w)·Grad-CAM is exact wherever CAM ≥ 0. layer4's
    # maps are post-ReLU (≥ 0); with the target rows of fc made non-negative CAM ≥ 0 everywhere, so the
    # identity holds on the whole map, also after the (linear) bilinear upsampling. layer4 is 2×2.
    model = resnet18()
    with torch.no_grad():
        model.fc.weight[:3].abs_()
    handle = ModelHandle(model, name="resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    targets = [[0, 1, 2], [2, 0, 1]]
    cam = explain(handle, x, "cam", targets=Targets.given(targets)).maps
    grad = explain(handle, x, "gradcam", targets=Targets.given(targets)).maps
    assert float(cam.abs().max()) > 0.01
    torch.testing.assert_close(cam, grad * 4, rtol=1e-5, atol=1e-6)
    # and HiResCAM / XGrad-CAM coincide with Grad-CAM on such a head (Draelos & Carin; Fu et al.)
    for method in ("hirescam", "xgradcam"):
        other = explain(handle, x, method, targets=Targets.given(targets)).maps
        torch.testing.assert_close(other, grad, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def densenet() -> ModelHandle:
    torch.manual_seed(0)
    return ModelHandle(torchvision.models.densenet121(num_classes=10).eval(), name="densenet121")


def test_cam_mean_plus_bias_is_the_logit_on_densenet121(densenet: ModelHandle) -> None:
    # DenseNet pools ReLU(features) through a functional, in-place ReLU: CAM must use ReLU(features).
    # mean(CAM) + b_c = y_c then holds (bilinear ×32 upsampling keeps the mean); with the raw
    # pre-ReLU features it would not.
    model = densenet.module
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    out = explain(densenet, x, "cam", targets=Targets.top(3))
    assert out.params.layer == "features"
    bias = model.classifier.bias.detach()[out.targets[0]]
    torch.testing.assert_close(out.maps[0].mean(dim=(1, 2)) + bias, out.logits[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        raw = model.features(x)  # nothing in-place after it here
    w = model.classifier.weight.detach()[out.targets[0]]
    wrong = torch.einsum("kc,chw->khw", w, raw[0]).mean(dim=(1, 2)) + bias
    assert not torch.allclose(wrong, out.logits[0], rtol=1e-3, atol=1e-4)


def test_target_layer_sees_the_output_before_an_in_place_relu(densenet: ModelHandle) -> None:
    # DenseNet's forward runs F.relu(features, inplace=True): the recorded map must be the layer's output.
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    out = explain(densenet, x, "eigencam", ExplainParams(layer="features"))
    with torch.no_grad():
        act = densenet.module.features(x)
    assert float(act.min()) < 0  # pre-ReLU
    obs = act[0].flatten(1).T
    obs = obs - obs.mean(dim=0)
    v = torch.linalg.svd(obs, full_matrices=False).Vh[0]
    v = -v if float(v.sum()) < 0 else v
    expected = (obs @ v).clamp(min=0).view(1, 1, 2, 2)
    expected = torch.nn.functional.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.maps[0, 0], expected[0, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("builder", "supported"),
    [
        (lambda: torchvision.models.resnet18(num_classes=10), True),
        (lambda: torchvision.models.efficientnet_b0(num_classes=10), True),  # Dropout → Linear: fine
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), False),  # Linear → Hardswish → …
        (lambda: torchvision.models.vgg11(num_classes=10), False),  # three-layer classifier
    ],
    ids=["resnet18", "efficientnet_b0", "mobilenet_v3_small", "vgg11"],
)
def test_supports_cam(builder: object, supported: bool) -> None:
    torch.manual_seed(0)
    model = builder().eval()  # type: ignore[operator]
    handle = ModelHandle(model, optimize=False)  # head detection does not depend on the speed-ups
    assert get_method("cam").offered(handle) is supported
    assert hook_count(model) == 0 and hook_count(handle.prepared(keep=handle.resolve_layer(None))) == 0


def test_cam_on_vgg11_raises_before_any_work() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    handle = ModelHandle(model, name="vgg11", optimize=False)
    seen: list[float] = []
    with pytest.raises(MethodNotApplicable, match="gradcam") as info:
        explain(handle, torch.randn(1, 3, 64, 64), "cam", progress=seen.append)
    assert info.value.field == "method"
    assert seen == []
    assert hook_count(model) == 0


def test_cam_on_the_wrong_layer_names_the_right_one() -> None:
    handle = ModelHandle(resnet18(), optimize=False)
    with pytest.raises(MethodNotApplicable, match="'layer4'") as info:
        explain(handle, torch.randn(1, 3, 64, 64), "cam", ExplainParams(layer="layer3"))
    assert info.value.field == "layer"


def test_detect_head_measures_the_head() -> None:
    class Scaled(TinyCam):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    example = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    assert detect_head(TinyCam().eval(), "act", example) == CamHead(linear="fc", relu=False)
    # the conv's output is pooled through the ReLU: recognised as ReLU(maps), like DenseNet's head
    assert detect_head(TinyCam().eval(), "conv", example) == CamHead(linear="fc", relu=True)
    assert detect_head(Scaled().eval(), "act", example) is None  # work after the last linear layer


# ------------------------------------------------------------------------------------------------
# engine guarantees for the family
# ------------------------------------------------------------------------------------------------
FAMILY = ["cam", "gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam"]


@pytest.mark.parametrize("method", FAMILY)
def test_no_hooks_no_parameter_gradients_no_graph_below_the_layer(method: str) -> None:
    handle = tiny_handle()
    x = tiny_input()
    before = x.clone()
    state = {k: v.clone() for k, v in handle.module.state_dict().items()}
    prepared = handle.prepared(keep="act")
    assert isinstance(prepared, TinyCam)
    prepared.below_target_required_grad.clear()
    explain(handle, x, method, targets=Targets.given([[0, 1]]))
    assert prepared.below_target_required_grad and not any(prepared.below_target_required_grad)
    assert hook_count(handle.module) == 0 and hook_count(prepared) == 0
    assert all(p.grad is None for p in [*handle.module.parameters(), *prepared.parameters()])
    assert all(p.requires_grad for p in handle.module.parameters())
    assert all(torch.equal(v, state[k]) for k, v in handle.module.state_dict().items())
    assert torch.equal(x, before)


class SmallCnn(nn.Module):
    """A random CNN small enough for many Score-CAM runs: 6 channels of 4×4 maps at 16×16 input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_scorecam_does_not_depend_on_batch_size_or_on_sharing_an_image() -> None:
    handle = ModelHandle(SmallCnn().eval(), target_layer="features")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    both = explain(
        handle, x, "scorecam", ExplainParams(batch_size=64), targets=Targets.given([[1, 4], [4, 2]])
    ).maps
    assert float(both.max()) > 0
    for batch_size in (1, 5):
        for k, targets in enumerate(([[1], [4]], [[4], [2]])):
            alone = explain(
                handle, x, "scorecam", ExplainParams(batch_size=batch_size), targets=Targets.given(targets)
            ).maps
            torch.testing.assert_close(alone[:, 0], both[:, k], rtol=1e-5, atol=1e-7)


def test_scorecam_progress_counts_the_real_passes() -> None:
    handle = tiny_handle()
    seen: list[float] = []
    explain(
        handle,
        tiny_input(),
        "scorecam",
        ExplainParams(batch_size=1),
        targets=Targets.given([[0, 1]]),
        progress=seen.append,
    )
    # one activation pass for the (shared) image, then one per non-constant channel (2)
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_eigencam_is_class_agnostic_and_oriented() -> None:
    handle = ModelHandle(SmallCnn().eval(), target_layer="features")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    out = explain(handle, x, "eigencam", targets=Targets.top(3))
    torch.testing.assert_close(out.maps[0, 1], out.maps[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.maps[0, 2], out.maps[0, 0], rtol=0, atol=0)
    # orientation: the projection correlates positively with the total activation Σ_k A_k
    with torch.no_grad():
        act = handle.module.features(x)[0]  # (6, 4, 4)
    obs = act.flatten(1).T
    obs = obs - obs.mean(dim=0)
    p = obs @ torch.linalg.svd(obs, full_matrices=False).Vh[0]
    p = -p if float(p @ obs.sum(dim=1)) < 0 else p
    expected = torch.nn.functional.interpolate(
        p.clamp(min=0).view(1, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False
    )
    assert float(expected.max()) > 0
    torch.testing.assert_close(out.maps[0, 0], expected[0, 0], rtol=1e-4, atol=1e-6)
