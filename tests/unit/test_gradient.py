"""The gradient family: saliency, input×gradient, guided backprop, deconvnet, guided Grad-CAM.

Hand-worked tiny networks pin the backward rules to literal numbers; Captum (and, where Captum
cannot follow, an independent module-hook implementation) checks them on random-init models.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, InputXGradient, Saliency
from helpers import random_mnasnet, random_resnet18, with_reference
from torch import Tensor, nn

from service.errors import Cancelled, MethodNotApplicable
from service.explainers import ExplainParams, ModelHandle, Targets, explain
from service.explainers.hooks import hook_count
from service.explainers.rectifiers import RectifierRule, backward_rule

# ------------------------------------------------------------------------------------------------
# hand-worked networks
# ------------------------------------------------------------------------------------------------
# Two-layer ReLU net on x = (1, 2), no biases:
#   W1 = [[1, 1], [1, -1], [-1, 1]]  → h1 = (3, -1, 1),  r1 = relu(h1) = (3, 0, 1), mask1 = (1, 0, 1)
#   W2 = [[1, -1, -2], [-1, 1, -1]]  → h2 = (3 - 0 - 2, -3 + 0 - 1) = (1, -4), r2 = (1, 0), mask2 = (1, 0)
#   W3 = [[1, 2]]                    → y = 1
# Plain gradient:  g_r2 = (1, 2); g_h2 = g_r2·mask2 = (1, 0); g_r1 = W2ᵀ g_h2 = (1, -1, -2);
#                  g_h1 = g_r1·mask1 = (1, 0, -2); g_x = W1ᵀ g_h1 = (1 + 0 + 2, 1 - 0 - 2) = (3, -1)
# Guided:          g_h2 = relu(1, 2)·(1, 0) = (1, 0); g_r1 = (1, -1, -2);
#                  g_h1 = relu(1, -1, -2)·(1, 0, 1) = (1, 0, 0); g_x = W1ᵀ (1, 0, 0) = (1, 1)
# Deconvnet:       g_h2 = relu(1, 2) = (1, 2); g_r1 = W2ᵀ (1, 2) = (1 - 2, -1 + 2, -2 - 2) = (-1, 1, -4);
#                  g_h1 = relu(g_r1) = (0, 1, 0); g_x = W1ᵀ (0, 1, 0) = (1, -1)
W1 = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]
W2 = [[1.0, -1.0, -2.0], [-1.0, 1.0, -1.0]]
W3 = [[1.0, 2.0]]
X = [1.0, 2.0]

# One-layer ReLU6 net on x = (1, 2):
#   V1 = [[4, 2], [1, 1], [-1, 1]] → h = (8, 3, 1), r = relu6(h) = (6, 3, 1), mask (0 < h < 6) = (0, 1, 1)
#   V2 = [[1, 1, -1]]              → y = 6 + 3 - 1 = 8
# Plain:     g_h = (1, 1, -1)·(0, 1, 1) = (0, 1, -1); g_x = V1ᵀ g_h = (0 + 1 + 1, 0 + 1 - 1) = (2, 0)
# Guided:    g_h = relu(1, 1, -1)·(0, 1, 1) = (0, 1, 0); g_x = (1, 1)
#            (a rule that forgot the upper clip would give relu(g)·[h > 0] = (1, 1, 0) → (5, 3))
# Deconvnet: g_h = relu(1, 1, -1) = (1, 1, 0); g_x = (4 + 1, 2 + 1) = (5, 3)
V1 = [[4.0, 2.0], [1.0, 1.0], [-1.0, 1.0]]
V2 = [[1.0, 1.0, -1.0]]

Act = Callable[[Tensor], Tensor]


class Tiny(nn.Module):
    """Flatten → Linear → act → Linear → act → … on a (N, 2, 1, 1) "image"; no biases."""

    def __init__(self, weights: list[list[list[float]]], act: nn.Module | Act) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(len(w[0]), len(w), bias=False) for w in weights)
        with torch.no_grad():
            for layer, w in zip(self.layers, weights, strict=True):
                layer.weight.copy_(torch.tensor(w))
        self.act = act  # a module (registered as a child) or a plain function

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


def _relu_in_place_unassigned(t: Tensor) -> Tensor:
    t.relu_()  # relies on the mutation: the return value is ignored
    return t


RELUS: dict[str, nn.Module | Act] = {
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU(inplace)": nn.ReLU(inplace=True),
    "F.relu": F.relu,
    "F.relu(inplace)": lambda t: F.relu(t, inplace=True),
    "F.relu_": F.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": lambda t: t.relu(),
    "Tensor.relu_ unassigned": _relu_in_place_unassigned,
}
RELU6S: dict[str, nn.Module | Act] = {
    "nn.ReLU6": nn.ReLU6(),
    "nn.ReLU6(inplace)": nn.ReLU6(inplace=True),
    "F.relu6": F.relu6,
    "F.relu6(inplace)": lambda t: F.relu6(t, inplace=True),
    "F.hardtanh(0, 6)": lambda t: F.hardtanh(t, 0.0, 6.0),
    "F.hardtanh_(0, 6)": lambda t: F.hardtanh_(t, 0.0, 6.0),
}


def tiny_handle(model: nn.Module, channels: int = 2) -> ModelHandle:
    return ModelHandle(module=model, mean=(0.0,) * channels, std=(1.0,) * channels, optimize=False)


def run(handle: ModelHandle, x: Tensor, method: str, targets: object = None, **params: object):  # type: ignore[no-untyped-def]
    return explain(
        handle,
        x,
        method,
        ExplainParams(seed=0, **params),
        targets=None if targets is None else Targets.given(targets),
    )  # type: ignore[arg-type]


def attr_of(handle: ModelHandle, x: Tensor, method: str) -> list[float]:
    e = run(handle, x, method, targets=[[0]])
    assert e.attributions is not None
    return e.attributions[0, 0].flatten().tolist()


@pytest.mark.parametrize("act", list(RELUS), ids=list(RELUS))
def test_hand_worked_relu_net(act: str) -> None:
    handle = tiny_handle(Tiny([W1, W2, W3], RELUS[act]))
    x = torch.tensor(X).view(1, 2, 1, 1)
    assert attr_of(handle, x, "saliency") == [3.0, 1.0]  # |(3, -1)|
    assert attr_of(handle, x, "input_x_gradient") == [3.0, -2.0]  # (1·3, 2·-1)
    assert attr_of(handle, x, "guided_backprop") == [1.0, 1.0]
    assert attr_of(handle, x, "deconvnet") == [1.0, -1.0]
    # maps: saliency = max over channels, the signed ones = sum over channels
    assert run(handle, x, "saliency").maps.flatten().tolist() == [3.0]
    assert run(handle, x, "input_x_gradient").maps.flatten().tolist() == [1.0]
    assert run(handle, x, "guided_backprop").maps.flatten().tolist() == [2.0]
    assert run(handle, x, "deconvnet").maps.flatten().tolist() == [0.0]
    assert x.flatten().tolist() == X  # the input is untouched


@pytest.mark.parametrize("act", list(RELU6S), ids=list(RELU6S))
def test_hand_worked_relu6_net(act: str) -> None:
    handle = tiny_handle(Tiny([V1, V2], RELU6S[act]))
    x = torch.tensor(X).view(1, 2, 1, 1)
    assert attr_of(handle, x, "saliency") == [2.0, 0.0]
    assert attr_of(handle, x, "guided_backprop") == [1.0, 1.0]
    assert attr_of(handle, x, "deconvnet") == [5.0, 3.0]


def test_other_hardtanh_keeps_its_plain_gradient() -> None:
    # hardtanh(-1, 1) is no rectifier. x = (0.1, 0.2): h = V1 x = (0.8, 0.3, 0.1), all inside (-1, 1),
    # so the plain gradient is V1ᵀ (1, 1, -1) = (4 + 1 + 1, 2 + 1 - 1) = (6, 2); a guided rule would
    # drop the -1 and give V1ᵀ (1, 1, 0) = (5, 3).
    model = Tiny([V1, V2], lambda t: F.hardtanh(t, -1.0, 1.0))
    x = torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)
    for rule in ("guided", "deconvnet"):
        assert ruled_gradient(model, x, rule) == pytest.approx([6.0, 2.0])
    # a model with no rectifier at all gets no plain gradient under the rules' names
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(MethodNotApplicable, match="ReLU-family"):
            attr_of(tiny_handle(model), x, method)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.Hardswish(), nn.Sigmoid()], ids=str)
def test_smooth_activations_keep_their_plain_gradient(act: nn.Module) -> None:
    model = Tiny([W1, W2, W3], act)
    x = torch.tensor([[0.3, -1.7]]).view(1, 2, 1, 1)
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xg)[0, 0], xg)
    assert plain.abs().sum() > 0
    for rule in ("guided", "deconvnet"):
        assert torch.equal(torch.tensor(ruled_gradient(model, x, rule)), plain.flatten())
    for method in ("guided_backprop", "deconvnet"):  # only smooth activations: refused, not a plain gradient
        with pytest.raises(MethodNotApplicable, match="ReLU-family"):
            attr_of(tiny_handle(model), x, method)


def ruled_gradient(model: nn.Module, x: Tensor, rule: RectifierRule) -> list[float]:
    """The input gradient of output 0 under ``rule`` (the rule itself, without the engine)."""
    xg = x.clone().requires_grad_(True)
    with backward_rule(rule):
        (g,) = torch.autograd.grad(model(xg)[0, 0], xg)
    return g.flatten().tolist()


# ------------------------------------------------------------------------------------------------
# the rule's scope
# ------------------------------------------------------------------------------------------------
def _grad(model: nn.Module) -> list[float]:
    x = torch.tensor([X], requires_grad=True)
    (g,) = torch.autograd.grad(model(x.view(1, 2, 1, 1))[0, 0], x)
    return g.flatten().tolist()


def test_rule_is_gone_after_the_block_even_after_an_error() -> None:
    model = Tiny([W1, W2, W3], F.relu)
    assert torch._C._len_torch_function_stack() == 0
    with backward_rule("guided") as stats:
        assert _grad(model) == [1.0, 1.0]
    assert stats.rectified == 2
    assert torch._C._len_torch_function_stack() == 0
    assert _grad(model) == [3.0, -1.0]
    with pytest.raises(RuntimeError, match="boom"), backward_rule("deconvnet"):
        raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == 0
    assert _grad(model) == [3.0, -1.0]


def test_rule_is_thread_local() -> None:
    """While one thread is inside the guided block, another thread's gradients stay plain."""
    model = Tiny([W1, W2, W3], F.relu)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, list[float]] = {}

    def guided() -> None:
        with backward_rule("guided"):
            inside.set()
            assert done.wait(30)
            seen["guided"] = _grad(model)

    t = threading.Thread(target=guided)
    t.start()
    assert inside.wait(30)
    seen["plain"] = _grad(model)
    done.set()
    t.join(30)
    assert seen == {"plain": [3.0, -1.0], "guided": [1.0, 1.0]}


def test_cancelled_run_leaves_no_rule_and_no_hooks() -> None:
    handle = tiny_handle(Tiny([W1, W2, W3], nn.ReLU()))
    x = torch.tensor(X).view(1, 2, 1, 1).repeat(4, 1, 1, 1)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        explain(handle, x, "guided_backprop", ExplainParams(batch_size=1), cancel=cancel)
    assert torch._C._len_torch_function_stack() == 0
    assert hook_count(handle.module) == 0 and hook_count(handle.prepared()) == 0


def test_scripted_models_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        scripted = torch.jit.script(Tiny([W1, W2, W3], nn.ReLU()))
    handle = tiny_handle(scripted)
    x = torch.tensor(X).view(1, 2, 1, 1)
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(MethodNotApplicable, match="TorchScript"):
            run(handle, x, method)


# ------------------------------------------------------------------------------------------------
# agreement with Captum on random-init torchvision models
# ------------------------------------------------------------------------------------------------
def close(ours: Tensor, ref: Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 rounding (BatchNorm folding reorders sums): atol relative to the scale."""
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, atol=rel * scale, rtol=1e-3)


@pytest.fixture(scope="module")
def resnet18() -> tuple[ModelHandle, nn.Module]:
    """A random-init resnet18 handle (prepared copies cached across tests) and a reference copy."""
    return with_reference(random_resnet18(), "resnet18")


@pytest.fixture(scope="module", params=["resnet18", "mnasnet0_5"])
def zoo(
    request: pytest.FixtureRequest, resnet18: tuple[ModelHandle, nn.Module]
) -> tuple[ModelHandle, nn.Module, Tensor]:
    if request.param == "resnet18":
        handle, reference = resnet18
    else:
        handle, reference = with_reference(random_mnasnet(), "mnasnet0_5")
    torch.manual_seed(2)
    x = torch.randn(2, 3, 48, 48)
    return handle, reference, x


CAPTUM = {
    "saliency": lambda m: (Saliency(m), {"abs": True}),
    "input_x_gradient": lambda m: (InputXGradient(m), {}),
    "guided_backprop": lambda m: (GuidedBackprop(m), {}),
    "deconvnet": lambda m: (Deconvolution(m), {}),
}
TARGETS = [[3, 7], [1, 0]]  # two targets per image: pairs (img0, 3), (img0, 7), (img1, 1), (img1, 0)


@pytest.mark.parametrize("method", list(CAPTUM))
def test_agrees_with_captum(zoo: tuple[ModelHandle, nn.Module, Tensor], method: str) -> None:
    handle, reference, x = zoo
    before = x.clone()
    e = explain(handle, x, method, ExplainParams(batch_size=3), targets=Targets.given(TARGETS))
    assert torch.equal(x, before)
    algo, kwargs = CAPTUM[method](reference)
    inputs = x.repeat_interleave(2, dim=0).requires_grad_(True)
    ref = algo.attribute(inputs, target=torch.tensor(TARGETS).flatten().tolist(), **kwargs).detach()
    assert e.attributions is not None
    close(e.attributions.reshape(4, 3, 48, 48), ref)
    reduced = ref.amax(dim=1) if method == "saliency" else ref.sum(dim=1)
    close(e.maps.reshape(4, 48, 48), reduced)
    assert hook_count(handle.module) == 0


def test_guided_gradcam_is_guided_backprop_times_bilinear_gradcam(
    resnet18: tuple[ModelHandle, nn.Module],
) -> None:
    """Captum's GuidedGradCam with ``interpolate_mode="bilinear"`` is the paper's definition
    (its default, nearest, is not: the last assertion shows the two differ)."""
    handle, reference = resnet18
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    targets = [[4], [9]]
    e = explain(
        handle,
        x,
        "guided_gradcam",
        ExplainParams(layer="layer4", batch_size=1),
        targets=Targets.given(targets),
    )
    algo = GuidedGradCam(reference, reference.layer4)
    bilinear = algo.attribute(
        x.clone().requires_grad_(True), target=[4, 9], interpolate_mode="bilinear"
    ).detach()
    nearest = algo.attribute(x.clone().requires_grad_(True), target=[4, 9]).detach()
    assert e.attributions is not None
    ours = e.attributions[:, 0]
    close(ours, bilinear)
    assert not torch.allclose(ours, nearest, atol=1e-3 * float(nearest.abs().max()))
    close(e.maps[:, 0], bilinear.sum(dim=1))


# ------------------------------------------------------------------------------------------------
# functional ReLUs and ReLU6, where Captum falls back to the plain gradient
# ------------------------------------------------------------------------------------------------
class ModuleReluDenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet with its functional ``F.relu`` before pooling made an ``nn.ReLU``."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.final_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.final_relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_functional_relu_is_rectified_unlike_captum(method: str) -> None:
    config = {"growth_rate": 8, "block_config": (2, 2), "num_init_features": 16, "num_classes": 10}
    torch.manual_seed(4)
    densenet = torchvision.models.DenseNet(**config).eval()  # type: ignore[arg-type]
    as_modules = ModuleReluDenseNet(**config).eval()
    as_modules.load_state_dict(densenet.state_dict())
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    e = explain(ModelHandle(module=densenet), x, method, ExplainParams(), targets=Targets.given([[2], [5]]))
    assert e.attributions is not None
    ours = e.attributions[:, 0]
    algo = {"guided_backprop": GuidedBackprop, "deconvnet": Deconvolution}[method]
    ref = algo(as_modules).attribute(x.clone().requires_grad_(True), target=[2, 5]).detach()
    close(ours, ref)
    # Captum on the functional model misses the last ReLU's rule
    silent = algo(densenet).attribute(x.clone().requires_grad_(True), target=[2, 5]).detach()
    assert not torch.allclose(ours, silent, atol=1e-3 * float(ref.abs().max()))


def hooked_rule(model: nn.Module, x: Tensor, targets: list[int], rule: str) -> Tensor:
    """An independent implementation by module hooks (Captum's algorithm, extended to ReLU6)."""
    model = copy.deepcopy(model)
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = False

            def hook(_m: nn.Module, g_in: tuple[Tensor, ...], g_out: tuple[Tensor, ...]) -> tuple[Tensor]:
                # g_in already carries the forward mask (0 < x, and x < 6 for ReLU6)
                return (torch.relu(g_in[0] if rule == "guided" else g_out[0]),)

            handles.append(m.register_full_backward_hook(hook))
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, torch.tensor(targets).view(-1, 1)).sum(), xg)
    for h in handles:
        h.remove()
    return grad


@pytest.fixture(scope="module")
def lite0() -> ModelHandle:
    torch.manual_seed(6)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10, pretrained=False).eval()
    return ModelHandle(module=model, name="tf_efficientnet_lite0")


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_relu6_efficientnet_lite(lite0: ModelHandle, method: str) -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 3, 64, 64)
    e = explain(lite0, x, method, ExplainParams(), targets=Targets.given([[1], [8]]))
    assert e.attributions is not None
    ours = e.attributions[:, 0]
    rule = "guided" if method == "guided_backprop" else "deconvnet"
    close(ours, hooked_rule(lite0.module, x, [1, 8], rule))
    plain = explain(lite0, x, "saliency", ExplainParams(), targets=Targets.given([[1], [8]]))
    assert plain.attributions is not None
    assert not torch.allclose(ours.abs(), plain.attributions[:, 0], atol=1e-3 * float(ours.abs().max()))


def test_results_do_not_depend_on_batch_size(resnet18: tuple[ModelHandle, nn.Module]) -> None:
    handle, _ = resnet18
    torch.manual_seed(8)
    x = torch.randn(3, 3, 32, 32)
    for method in ("saliency", "guided_backprop"):
        a = explain(handle, x, method, ExplainParams(batch_size=1), targets=Targets.given([[0], [1], [2]]))
        b = explain(handle, x, method, ExplainParams(batch_size=3), targets=Targets.given([[0], [1], [2]]))
        assert a.attributions is not None and b.attributions is not None
        close(a.attributions, b.attributions, rel=1e-5)
