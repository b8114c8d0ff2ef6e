"""Attention rollout, transformer attribution and LeGrad: against maps worked out by hand on a
two-block model with known attention, against references written here from the formulas on real
timm (ViT, distilled DeiT) and torchvision ViTs, and the promises about shared state."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import small_torchvision_vit
from torch import Tensor, nn

from service.errors import Cancelled, InvalidParameter, MethodNotApplicable
from service.explainers import ExplainParams, ModelHandle, Targets, explain, get_method
from service.explainers.attention import TransformerAttribution, discard_lowest
from service.explainers.attention_capture import capture_attention
from service.explainers.hooks import hook_count

ATTENTION = ["attention_rollout", "transformer_attribution", "legrad"]
CLASSES = 10


# ------------------------------------------------------------------------------------------------
# a two-block model whose attention is known: A_lh = softmax(B_lh), independent of the input
# ------------------------------------------------------------------------------------------------
class KnownAttention(nn.Module):
    """Scalar tokens (D = 1); out = mean over heads of A_h x. The fused path never forms A."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.fused_attn = True
        self.attn_drop = nn.Dropout(0.0)
        self.register_buffer("logits", logits)  # (H, T, T)

    def forward(self, x: Tensor) -> Tensor:
        # 0 · x keeps A in the autograd graph (as a real model's A is) without changing it
        a = (self.logits + 0 * x.sum()).softmax(dim=-1).expand(x.shape[0], -1, -1, -1)  # (N, H, T, T)
        v = x.unsqueeze(1)  # (N, 1, T, 1)
        if self.fused_attn:
            return torch.einsum("nhij,nhjd->nid", a, v.expand(-1, a.shape[1], -1, -1)) / a.shape[1]
        a = self.attn_drop(a)
        return (a @ v).mean(dim=1)


class Block(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.attn = KnownAttention(logits)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(x)


class PatchMean(nn.Module):
    grid_size = (2, 2)

    def forward(self, img: Tensor) -> Tensor:  # (N, 1, 4, 4) → (N, 4, 1)
        return F.avg_pool2d(img, 2).flatten(1).unsqueeze(2)


class KnownViT(nn.Module):
    """Tokens x_0 = [c, patch means]; x_l = x_{l−1} + Ā_l x_{l−1}; y = w · x_2[0] (class token)."""

    num_prefix_tokens = 1
    global_pool = "token"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patch_embed = PatchMean()
        self.cls_token = nn.Parameter(torch.tensor([[[0.7]]]))
        self.blocks = nn.Sequential(*[Block(2 * torch.randn(2, 5, 5, generator=g)) for _ in range(2)])
        self.norm = nn.Identity()
        self.register_buffer("w", torch.tensor([1.0, -2.0, 0.5]))

    def tokens(self, img: Tensor) -> Tensor:
        return torch.cat([self.cls_token.expand(img.shape[0], -1, -1), self.patch_embed(img)], dim=1)

    def forward_head(self, t: Tensor) -> Tensor:
        return t[:, 0, :] * self.w

    def forward(self, img: Tensor) -> Tensor:
        return self.forward_head(self.norm(self.blocks(self.tokens(img))))


def known_handle() -> tuple[ModelHandle, KnownViT]:
    model = KnownViT().eval()
    return ModelHandle(model, mean=(0.0,), std=(1.0,), input_size=(1, 4, 4), name="known"), model


def at_input(grid: Tensor, size: int) -> Tensor:
    """(n, gh, gw) → (n, 1, size, size), as the engine upsamples."""
    return F.interpolate(grid.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)


def test_known_attention_rollout_transformer_attribution_and_legrad_by_hand() -> None:
    handle, model = known_handle()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 2])
    a1, a2 = (blk.attn.logits.softmax(dim=-1) for blk in model.blocks)  # type: ignore[union-attr]
    eye = torch.eye(5)
    x0 = model.tokens(x).squeeze(2).detach()  # (N, T)
    m1, m2 = a1.mean(dim=0), a2.mean(dim=0)
    x1 = x0 + x0 @ m1.T
    w = model.w[targets]  # (N,)

    # rollout: rows of (Ā + I)/2 already sum to 1 (softmax rows); R = Ā₂' Ā₁'
    r = ((m2 + eye) / 2) @ ((m1 + eye) / 2)
    want = r[0, 1:].reshape(1, 2, 2).expand(2, -1, -1)
    got = explain(handle, x, "attention_rollout", targets=Targets.given([[1], [2]])).maps
    torch.testing.assert_close(got, at_input(want, 4))

    # max fusion: the rows no longer sum to 1 and are renormalised
    def norm(a: Tensor) -> Tensor:
        a = (a + eye) / 2
        return a / a.sum(dim=1, keepdim=True)

    r_max = norm(a2.amax(dim=0)) @ norm(a1.amax(dim=0))
    got = explain(handle, x, "attention_rollout", ExplainParams(head_fusion="max")).maps
    torch.testing.assert_close(got, at_input(r_max[0, 1:].reshape(1, 2, 2).expand(2, -1, -1), 4))

    # transformer attribution: ∂y/∂A₂ₕ[i,j] = w δ_i0 x₁[j] / H; ∂y/∂A₁ₕ[i,j] = w (δ_0i + Ā₂[0,i]) x₀[j] / H
    g2 = w[:, None, None] * eye[0][None, :, None] * x1[:, None, :] / 2  # (N, T, T), the same for both heads
    g1 = w[:, None, None] * (eye[0] + m2[0])[None, :, None] * x0[:, None, :] / 2
    c1 = (g1[:, None] * a1[None]).clamp_min(0).mean(dim=1)
    c2 = (g2[:, None] * a2[None]).clamp_min(0).mean(dim=1)
    r = eye + c1
    r = r + c2 @ r
    got = explain(handle, x, "transformer_attribution", targets=Targets.given([[1], [2]])).maps
    torch.testing.assert_close(got, at_input(r[:, 0, 1:].reshape(2, 2, 2), 4))

    # LeGrad: s_l = w x_l[0]; ∂s_l/∂A_lh = w δ_i0 x_{l−1}[j] / H: only row 0 is non-zero
    legrad = [
        (w[:, None] * xs / 2).clamp_min(0)[:, 1:] / 5  # mean over 2 equal heads and 5 query rows
        for xs in (x0, x1)
    ]
    got = explain(handle, x, "legrad", targets=Targets.given([[1], [2]])).maps
    torch.testing.assert_close(got, at_input(((legrad[0] + legrad[1]) / 2).reshape(2, 2, 2), 4))
    got = explain(handle, x, "legrad", ExplainParams(legrad_layers=1), targets=Targets.given([[1], [2]])).maps
    torch.testing.assert_close(got, at_input(legrad[1].reshape(2, 2, 2), 4))


def test_discard_ratio_zeroes_the_lowest_entries_of_each_row_but_never_column_0() -> None:
    a = torch.tensor([[[0.01, 0.05, 0.3, 0.02, 0.62], [0.4, 0.1, 0.2, 0.2, 0.1]]])
    out = discard_lowest(a, 0.5)  # ⌊0.5 · 4⌋ = 2 per row, among columns 1…4
    want = torch.tensor([[[0.01, 0.0, 0.3, 0.0, 0.62], [0.4, 0.0, 0.2, 0.2, 0.0]]])
    torch.testing.assert_close(out[:, :1], want[:, :1])
    assert out[0, 1, 0] == 0.4 and int((out[0, 1, 1:] == 0).sum()) == 2  # ties: any two of the lowest
    assert torch.equal(discard_lowest(a, 0.2), a)  # ⌊0.8⌋ = 0: nothing discarded


# ------------------------------------------------------------------------------------------------
# real timm and torchvision ViTs against references written from the formulas
# ------------------------------------------------------------------------------------------------
_MODELS: dict[str, ModelHandle] = {}


def timm_handle(name: str) -> ModelHandle:
    if name not in _MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=CLASSES, img_size=64, depth=2).eval()
        _MODELS[name] = ModelHandle(model, input_size=(3, 64, 64), name=name)
    return _MODELS[name]


def tv_handle() -> ModelHandle:
    if "tv" not in _MODELS:
        torch.manual_seed(0)
        model = small_torchvision_vit(CLASSES)
        _MODELS["tv"] = ModelHandle(model.eval(), input_size=(3, 64, 64), name="tv")
    return _MODELS["tv"]


def images(n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def timm_attention(model: nn.Module, x: Tensor, targets: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """A_l of a deep copy with fused attention off, and ∂y_t/∂A_l (plain hooks, written here)."""
    copy_ = copy.deepcopy(model)
    seen: list[Tensor] = []
    hooks = []
    for blk in copy_.blocks:  # type: ignore[union-attr]
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out)))
    logits = copy_(x)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), seen)
    return [a.detach() for a in seen], list(grads)


def reference_maps(attn: list[Tensor], grads: list[Tensor], prefix: int) -> dict[str, Tensor]:
    """Rollout (mean fusion) and transformer attribution, class-token row, on the 4×4 grid."""
    t = attn[0].shape[-1]
    eye = torch.eye(t)
    roll = eye.expand(attn[0].shape[0], t, t)
    chefer = roll
    for a, g in zip(attn, grads, strict=True):
        m = (a.mean(dim=1) + eye) / 2
        roll = (m / m.sum(dim=-1, keepdim=True)) @ roll
        chefer = chefer + (g * a).clamp_min(0).mean(dim=1) @ chefer
    n = attn[0].shape[0]
    return {
        "attention_rollout": roll[:, 0, prefix:].reshape(n, 4, 4),
        "transformer_attribution": chefer[:, 0, prefix:].reshape(n, 4, 4),
    }


@pytest.mark.parametrize(
    ("name", "prefix"), [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)]
)
def test_timm_vits_agree_with_a_reference_from_the_formulas(name: str, prefix: int) -> None:
    handle = timm_handle(name)
    x, targets = images(3, seed=2), torch.tensor([3, 7, 1])
    ref = reference_maps(*timm_attention(handle.module, x, targets), prefix)
    given = Targets.given([[3], [7], [1]])
    for method, want in ref.items():
        got = explain(handle, x, method, ExplainParams(batch_size=2), targets=given).maps
        torch.testing.assert_close(got, at_input(want, 64), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def tv_forward(model: Any, x: Tensor, attention: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """torchvision's ViT written out: A_l = softmax(q kᵀ/√d) computed here (or the given ones used)."""
    t = model._process_input(x)
    t = torch.cat([model.class_token.expand(t.shape[0], -1, -1), t], dim=1) + model.encoder.pos_embedding
    used = []
    for i, layer in enumerate(model.encoder.layers):
        mha = layer.self_attention
        y = layer.ln_1(t)
        n, length, e = y.shape
        h = mha.num_heads
        q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).split(e, dim=-1)
        q, k, v = (z.view(n, length, h, e // h).transpose(1, 2) for z in (q, k, v))
        a = attention[i] if attention is not None else (q @ k.transpose(-2, -1) / (e // h) ** 0.5).softmax(-1)
        used.append(a)
        t = t + mha.out_proj((a @ v).transpose(1, 2).reshape(n, length, e))
        t = t + layer.mlp(layer.ln_2(t))
    return model.heads(model.encoder.ln(t)[:, 0]), used


def test_torchvision_vit_captured_attention_reproduces_the_logits_and_methods_agree() -> None:
    handle = tv_handle()
    model = copy.deepcopy(handle.module)
    x, targets = images(3, seed=4), torch.tensor([2, 5, 8])
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as rec:
            captured = model(x)
        explicit, _ = tv_forward(model, x, rec.attention)
    assert hook_count(model) == 0 and len(rec.attention) == 2
    assert rec.attention[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, plain, rtol=1e-5, atol=1e-5)
    # gradients with respect to A through the written-out forward
    logits, used = tv_forward(model, x)
    grads = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), used)
    ref = reference_maps([a.detach() for a in used], list(grads), prefix=1)
    given = Targets.given([[2], [5], [8]])
    for method, want in ref.items():
        got = explain(handle, x, method, targets=given).maps
        torch.testing.assert_close(got, at_input(want, 64), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


# ------------------------------------------------------------------------------------------------
# parameters, applicability, shared state
# ------------------------------------------------------------------------------------------------
def test_rollout_is_class_agnostic_and_head_fusions_differ() -> None:
    handle = timm_handle("vit_tiny_patch16_224")
    x = images(2, seed=3)
    a = explain(handle, x, "attention_rollout", targets=Targets.given([[0], [1]])).maps
    b = explain(handle, x, "attention_rollout", targets=Targets.given([[5], [9]])).maps
    assert torch.equal(a, b)
    fused = {
        f: explain(handle, x, "attention_rollout", ExplainParams(head_fusion=f)).maps
        for f in ("mean", "max", "min")
    }
    assert not torch.allclose(fused["mean"], fused["max"]) and not torch.allclose(fused["mean"], fused["min"])
    discarded = explain(handle, x, "attention_rollout", ExplainParams(discard_ratio=0.9)).maps
    assert not torch.allclose(discarded, fused["mean"])
    # transformer attribution does depend on the target
    c = explain(handle, x, "transformer_attribution", targets=Targets.given([[0], [1]])).maps
    d = explain(handle, x, "transformer_attribution", targets=Targets.given([[5], [9]])).maps
    assert not torch.allclose(c, d)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"discard_ratio": 1.0},
        {"discard_ratio": -0.1},
        {"legrad_layers": 0},
        {"legrad_layers": 65},
        {"head_fusion": "bogus"},
    ],
)
def test_parameter_bounds_are_enforced(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameter) as info:
        ExplainParams(**kwargs)
    assert info.value.field == next(iter(kwargs))


def test_not_offered_on_cnns_or_windowed_attention() -> None:
    resnet = ModelHandle(torchvision.models.resnet18(num_classes=CLASSES).eval(), input_size=(3, 64, 64))
    swin = ModelHandle(
        timm.create_model(
            "swin_tiny_patch4_window7_224",
            num_classes=CLASSES,
            img_size=64,
            window_size=4,
            embed_dim=32,
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
        ).eval(),
        input_size=(3, 64, 64),
    )
    for handle in (resnet, swin):
        assert "attention" not in handle.offers()
        for method in ATTENTION:
            assert not get_method(method).offered(handle)
            with pytest.raises(MethodNotApplicable, match="self-attention"):
                explain(handle, images(1), method)
    assert all(get_method(m).offered(tv_handle()) for m in ATTENTION)


def fused_flags(model: nn.Module) -> list[bool]:
    return [bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize("method", ATTENTION)
def test_no_hooks_remain_and_no_model_changes_after_success_failure_and_cancel(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = timm_handle("vit_tiny_patch16_224")
    served = handle.module
    before = {k: v.clone() for k, v in served.state_dict().items()}
    flags = fused_flags(served)
    assert any(flags), "timm fuses attention by default: the test would prove nothing otherwise"
    x = images(3, seed=5)
    explain(handle, x, method, ExplainParams(batch_size=2))
    calls = iter(range(100))
    with pytest.raises(Cancelled):  # cancelled while the capture is in place, or between chunks
        explain(handle, x, method, ExplainParams(batch_size=1), cancel=lambda: next(calls) >= 2)

    def boom(*_a: object, **_k: object) -> Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(TransformerAttribution, "relevance", boom)
    monkeypatch.setattr("service.explainers.attention.rollout", boom)
    monkeypatch.setattr("service.explainers.attention.head", lambda _m: boom)
    with pytest.raises(RuntimeError, match="boom"):
        explain(handle, x, method)
    for model in (served, handle.prepared()):
        assert hook_count(model) == 0
        assert fused_flags(model) == flags
    assert all(torch.equal(before[k], v) for k, v in served.state_dict().items())


@pytest.mark.parametrize("method", ATTENTION)
def test_batch_independent_finite_and_not_constant(method: str) -> None:
    handle = timm_handle("deit_tiny_distilled_patch16_224")
    x = images(4, seed=6)
    together = explain(handle, x, method, ExplainParams(batch_size=3)).maps
    alone = explain(handle, x[2:3], method, ExplainParams(batch_size=1)).maps
    assert bool(torch.isfinite(together).all())
    assert bool((together.flatten(2).std(dim=2) > 0).all())
    torch.testing.assert_close(alone, together[2:3], rtol=0, atol=1e-5 * float(together.abs().max()))


def test_legrad_layers_beyond_the_model_means_all() -> None:
    handle = timm_handle("vit_tiny_patch16_224")
    x = images(2, seed=7)
    every = explain(handle, x, "legrad").maps
    torch.testing.assert_close(explain(handle, x, "legrad", ExplainParams(legrad_layers=64)).maps, every)
    assert not torch.allclose(explain(handle, x, "legrad", ExplainParams(legrad_layers=1)).maps, every)


@pytest.mark.parametrize("layers", [None, 1])
def test_legrad_agrees_with_torchcam_on_torchvision_vit(layers: int | None) -> None:
    """torchcam 0.5's ``LeGrad`` on the same blocks, given the same score projection (the contract's:
    the model's own pooling, the class token, then final norm and head; torchcam's built-in one
    pools by token mean); both maps compared up to torchcam's final min-max normalisation."""
    from torchcam.methods import LeGrad  # type: ignore[import-untyped]

    handle = tv_handle()
    model = copy.deepcopy(handle.module)
    blocks = list(model.encoder.layers)
    chosen = blocks if layers is None else blocks[-layers:]
    x = images(n=1, seed=4)
    target = 3

    def class_token_logits(
        tokens: Tensor,
    ) -> Tensor:  # the model's own pooling (torchcam's default: token mean)
        return model.heads(model.encoder.ln(tokens[:, 0]))

    with LeGrad(model, chosen, score_projection=class_token_logits) as extractor:
        scores = model(x)
        ref = extractor(target, scores)[0][0].detach()  # (4, 4)
    out = explain(handle, x, "legrad", ExplainParams(legrad_layers=layers), targets=Targets.given([[target]]))
    ours = out.maps[0, 0]
    up = F.interpolate(ref[None, None].float(), size=ours.shape, mode="bilinear", align_corners=False)[0, 0]
    r = torch.corrcoef(torch.stack([ours.flatten(), up.flatten()]))[0, 1]
    assert float(r) > 0.9999, float(r)
