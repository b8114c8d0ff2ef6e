"""The classifiers people deploy now: ViT (class, distillation and register tokens), Swin, ConvNeXt,
EVA and torchvision's ViT, random-init and small, through every method each model offers.

Layer layouts are measured (``describe_layers``): token layers drop the model's prefix tokens and
reshape to its patch grid, channels-last layers are permuted; the default layer is one whose map
the head's features reach. Grad-CAM on token and NHWC layers equals a hand-written reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import small_torchvision_vit
from torch import Tensor, nn

from service.errors import MethodNotApplicable, UnknownLayer
from service.explainers import ExplainParams, ModelHandle, Targets, all_methods, explain
from service.explainers.hooks import hook_count
from service.explainers.layers import get_layer, read_layout

CLASSES = 10


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    size: int
    default: str  # the measured default layer
    layout: str
    prefix: int


def _timm(name: str, **kw: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, num_classes=CLASSES, **kw)


FAMILIES: dict[str, Family] = {
    "vit": Family(_timm("vit_tiny_patch16_224", img_size=64, depth=2), 64, "blocks.1.norm1", "tokens", 1),
    "deit_distilled": Family(
        _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=2), 64, "blocks.1.norm1", "tokens", 2
    ),
    "vit_registers": Family(
        _timm("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4, no_embed_class=True),
        64,
        "blocks.1.norm1",
        "tokens",
        5,
    ),
    "swin": Family(
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=4,
            embed_dim=32,
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
        ),
        64,
        "norm",
        "nhwc",
        0,
    ),
    "convnext": Family(_timm("convnext_atto"), 64, "stages", "nchw", 0),
    "eva02": Family(_timm("eva02_tiny_patch14_224", img_size=56, depth=2), 56, "blocks.1", "tokens", 1),
    "torchvision_vit": Family(
        lambda: small_torchvision_vit(CLASSES), 64, "encoder.layers.encoder_layer_1.ln_1", "tokens", 1
    ),
}
_HANDLES: dict[str, ModelHandle] = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_handles() -> Iterator[None]:
    yield
    _HANDLES.clear()


def handle_for(family: str) -> ModelHandle:
    if family not in _HANDLES:
        torch.manual_seed(0)
        f = FAMILIES[family]
        _HANDLES[family] = ModelHandle(f.build().eval(), input_size=(3, f.size, f.size), name=family)
    return _HANDLES[family]


def images(family: str, n: int = 2, seed: int = 0) -> Tensor:
    size = FAMILIES[family].size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


PARAMS = ExplainParams(steps=3, samples=2, seed=3, batch_size=4, masks=8, window=16, stride=16)
METHODS = [m.name for m in all_methods()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layouts_and_default_layer_are_measured(family: str) -> None:
    f, handle = FAMILIES[family], handle_for(family)
    table = handle.layers()
    assert table.default == f.default
    info = table.get(f.default)
    assert info.view.layout == f.layout and info.view.prefix_tokens == f.prefix
    # the default map receives a gradient: Grad-CAM there is not all zeros, and not constant
    out = explain(handle, images(family), "gradcam", PARAMS)
    assert bool((out.maps.flatten(2).std(dim=2) > 0).all())
    # layers inside attention blocks are never offered
    assert not [n for n in table.names() if ".attn." in n or ".self_attention." in n]


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "torchvision_vit"])
def test_class_token_vit_last_output_gives_no_map(family: str) -> None:
    """Why the default is the last block's first norm: after it, only the class token reaches the
    head, so Grad-CAM on the final norm (a valid token layer) is all zeros."""
    handle = handle_for(family)
    final = "norm" if family != "torchvision_vit" else "encoder.ln"
    out = explain(handle, images(family), "gradcam", PARAMS.with_(layer=final))
    assert float(out.maps.abs().max()) == 0.0


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in METHODS])
def test_every_offered_method_runs_batched_and_leaves_no_trace(family: str, method: str) -> None:
    handle = handle_for(family)
    m = next(m for m in all_methods() if m.name == method)
    x = images(family, n=3, seed=1)
    if not m.offered(handle):
        with pytest.raises(MethodNotApplicable):
            explain(handle, x, method, PARAMS)
        return
    before = {k: v.clone() for k, v in handle.module.state_dict().items()}
    together = explain(handle, x, method, PARAMS)
    alone = explain(handle, x[1:2], method, PARAMS.with_(batch_size=1))
    maps = together.maps
    assert maps.shape == (3, 1, x.shape[2], x.shape[3])
    assert bool(torch.isfinite(maps).all())
    assert bool((maps.flatten(2).std(dim=2) > 0).all()), "a constant map"
    assert torch.equal(alone.targets, together.targets[1:2])
    if method != "scorecam":
        # Score-CAM's map is Σ_k α_k A_k with near-equal α_k on a random net: it cancels, and the
        # last-bit differences of batched kernels show; its batch independence is checked on a
        # small model in test_engine.py
        scale = float(together.maps[1:2].abs().max())
        torch.testing.assert_close(alone.maps, together.maps[1:2], rtol=0, atol=1e-4 * scale)
    assert hook_count(handle.module) == 0
    assert all(torch.equal(before[k], v) for k, v in handle.module.state_dict().items())


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "vit_registers", "torchvision_vit", "swin"])
def test_gradcam_on_tokens_and_channels_last_equals_a_hand_written_reference(family: str) -> None:
    handle = handle_for(family)
    layer = handle.layers().default
    assert layer is not None
    f = FAMILIES[family]
    x = images(family, n=2, seed=5)
    targets = [[3], [7]]
    ours = explain(handle, x, "gradcam", ExplainParams(layer=layer), targets=Targets.given(targets)).maps

    model = handle.module
    seen: dict[str, Tensor] = {}

    def keep(_m: nn.Module, _i: object, out: Tensor) -> None:
        out.retain_grad()
        seen["out"] = out

    hook = get_layer(model, layer).register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        hook.remove()
    logits.gather(1, torch.tensor(targets)).sum().backward()
    act, grad = seen["out"].detach(), seen["out"].grad
    assert grad is not None
    if f.layout == "nhwc":  # (N, h, w, C) → (N, C, h, w)
        act, grad = act.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    else:  # drop the prefix tokens, reshape the patch tokens to the grid
        side = int((act.shape[1] - f.prefix) ** 0.5)
        act = act[:, f.prefix :].reshape(2, side, side, -1).permute(0, 3, 1, 2)
        grad = grad[:, f.prefix :].reshape(2, side, side, -1).permute(0, 3, 1, 2)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    ref = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_gradcam_agrees_with_pytorch_grad_cam_given_a_correct_reshape_transform() -> None:
    from pytorch_grad_cam import GradCAM  # type: ignore[import-untyped]
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-untyped]

    handle = handle_for("deit_distilled")
    model = handle.module
    x = images("deit_distilled", n=2, seed=6)

    def reshape(t: Tensor) -> Tensor:  # two prefix tokens (class, distillation), a 4×4 grid
        return t[:, 2:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    with GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as cam:
        ref = torch.from_numpy(
            cam(input_tensor=x, targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(5)])
        )
    ours = explain(handle, x, "gradcam", targets=Targets.given([[2], [5]])).maps[:, 0]
    # pytorch-grad-cam min-max scales each map and resizes with OpenCV; compare the normalised maps
    # at the grid's resolution pattern by correlation
    ours_n = (ours - ours.amin(dim=(1, 2), keepdim=True)) / (
        ours.amax(dim=(1, 2), keepdim=True) - ours.amin(dim=(1, 2), keepdim=True)
    )
    for i in range(2):
        r = torch.corrcoef(torch.stack([ours_n[i].flatten(), ref[i].flatten().float()]))[0, 1]
        assert float(r) > 0.98


def test_read_layout_refuses_what_it_cannot_tell_apart() -> None:
    from service.explainers.layers import Tokens

    tokens = Tokens(prefix_tokens=1, grid=(4, 4))
    assert read_layout((512, 7, 7), (224, 224), None, False).layout == "nchw"  # type: ignore[union-attr]
    assert read_layout((7, 7, 768), (224, 224), None, False).layout == "nhwc"  # type: ignore[union-attr]
    assert read_layout((17, 192), (64, 64), tokens, False).prefix_tokens == 1  # type: ignore[union-attr]
    assert isinstance(read_layout((18, 192), (64, 64), tokens, False), str)  # not prefix + grid
    assert isinstance(read_layout((3, 197, 64), (224, 224), None, False), str)  # attention heads
    assert isinstance(read_layout((7, 7, 7), (224, 224), None, False), str)  # C = h = w: ambiguous
    assert read_layout((7, 7, 7), (224, 224), None, True).layout == "nhwc"  # type: ignore[union-attr]
    assert isinstance(read_layout((17, 192), (64, 64), None, False), str)  # a sequence, no grid known


def test_a_layer_outside_the_usable_ones_is_refused_naming_them() -> None:
    handle = handle_for("vit")
    x = images("vit")
    for layer in ("blocks.1.attn.qkv", "head", "blocks.1.attn.attn_drop", "no.such.layer"):
        with pytest.raises(UnknownLayer) as info:
            explain(handle, x, "gradcam", ExplainParams(layer=layer))
        assert "blocks.1.norm1" in info.value.message
        assert info.value.field == "layer"


def test_rectifier_rules_are_refused_on_models_without_rectifiers() -> None:
    for family in ("vit", "swin", "convnext"):  # GELU throughout
        handle = handle_for(family)
        assert "rectifiers" not in handle.offers()
        for method in ("guided_backprop", "deconvnet", "guided_gradcam"):
            with pytest.raises(MethodNotApplicable, match="ReLU-family"):
                explain(handle, images(family), method, PARAMS)


def test_cam_on_a_swin_equals_its_linear_head() -> None:
    """Swin pools its channels-last map and applies one linear layer: CAM applies there, and its
    spatial mean plus the bias is the logit."""
    handle = handle_for("swin")
    x = images("swin", n=1, seed=2)
    out = explain(handle, x, "cam", targets=Targets.given([[4]]), params=ExplainParams(layer="norm"))
    with torch.no_grad():
        logits = handle.module(x)
    head = handle.module.head.fc
    # at layer resolution the map is Σ_k w_k f_k; the upsampled map keeps its mean for 2×2 → 64×64
    mean = float(out.maps[0, 0].mean())
    assert mean + float(head.bias[4].detach()) == pytest.approx(float(logits[0, 4]), rel=1e-3, abs=1e-4)
