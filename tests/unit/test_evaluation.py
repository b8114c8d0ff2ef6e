"""The evaluation metrics (``service.evaluation``): curves and AUC by hand and against an
independent per-stage loop, models whose relevant region is known, the sanity check."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from service.errors import InvalidParameter
from service.evaluation import EvaluateParams, evaluate, random_map, score_maps
from service.evaluation.curves import auc, ranks, stage_counts
from service.evaluation.sanity import blocks, spearman
from service.explainers import ExplainParams, ModelHandle, Targets, explain

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------------------
# a hand-worked 4×4 example
# ------------------------------------------------------------------------------------------------
W16 = torch.arange(16, dtype=torch.float32).view(4, 4) / 10  # pixel i weighs i / 10


class WeightedSum(nn.Module):
    """Two classes: logit 0 = Σ x · W16 (one channel), logit 1 = 0, so p(0) = sigmoid(Σ x · W16)."""

    def forward(self, x: Tensor) -> Tensor:
        s = (x[:, 0] * W16.to(x.device)).sum(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


MAP = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.5],
        [0.2, 0.8, 0.5, 0.0],
        [0.3, 0.7, 0.6, 0.4],
        [0.5, 0.0, 0.2, 0.1],
    ]
)
# ranked highest first, ties in raster order: 0.9 (0), 0.8 (5), 0.7 (9), 0.6 (10), 0.5 (2, 3, 6, 12),
# 0.4 (11), 0.3 (8), 0.2 (4, 14), 0.1 (1, 15), 0.0 (7, 13); with 4 steps a stage replaces 4 more
STAGE_MASKS = [
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]],  # pixels 0, 5, 9, 10: Σ i = 24
    [[1, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]],  # + 2, 3, 6, 12: Σ i = 47
    [[1, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0]],  # + 11, 8, 4, 14: Σ i = 84
    [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],  # all: Σ i = 120
]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def hand_handle() -> ModelHandle:
    return ModelHandle(WeightedSum(), mean=(0.0,), std=(1.0,), input_size=(1, 4, 4), optimize=False)


def test_stage_counts_round_exactly() -> None:
    assert stage_counts(16, 4) == [0, 4, 8, 12, 16]
    assert stage_counts(10, 4) == [0, 2, 5, 8, 10]  # 2.5 → 2 and 7.5 → 8: Python's round, halves to even
    assert stage_counts(224 * 224, 50)[1] == 1004  # 1003.52


def test_ranks_are_highest_first_ties_in_raster_order() -> None:
    order = torch.argsort(ranks(MAP))
    assert order.tolist() == [0, 5, 9, 10, 2, 3, 6, 12, 11, 8, 4, 14, 1, 15, 7, 13]
    for k, mask in enumerate(STAGE_MASKS):
        assert (ranks(MAP) < 4 * k).view(4, 4).int().tolist() == mask


def test_hand_worked_curves_and_auc() -> None:
    """x = 1 everywhere, black substitute = 0 (mean 0, std 1): deletion stage k leaves
    Σ W16 over the pixels not yet deleted, insertion puts back Σ W16 over those inserted."""
    x = torch.ones(1, 1, 4, 4)
    [curves] = score_maps(
        hand_handle(),
        x,
        [MAP],
        [0],
        [0],
        kinds=("deletion", "insertion"),
        steps=4,
        substitute="black",
        batch_size=3,
    )
    deletion = [sigmoid(s) for s in (12.0, 9.6, 7.3, 3.6, 0.0)]  # 0.1 × (120 − 0, −24, −47, −84, −120)
    insertion = [sigmoid(s) for s in (0.0, 2.4, 4.7, 8.4, 12.0)]
    assert curves["deletion"] == pytest.approx(deletion, abs=1e-6)
    assert curves["insertion"] == pytest.approx(insertion, abs=1e-6)
    for kind, p in (("deletion", deletion), ("insertion", insertion)):
        by_hand = 0.25 * (p[0] / 2 + p[1] + p[2] + p[3] + p[4] / 2)  # trapezoid over 0, ¼, ½, ¾, 1
        assert auc(curves[kind]) == pytest.approx(by_hand, abs=1e-6)
    # the same stages, written out: deletion stage k is x with STAGE_MASKS[k] set to 0
    for k, mask in enumerate(STAGE_MASKS):
        kept = 1 - torch.tensor(mask, dtype=torch.float32)
        assert curves["deletion"][k] == pytest.approx(sigmoid(float((kept * W16).sum())), abs=1e-6)


def test_batch_size_does_not_change_the_curves() -> None:
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = {"kinds": ("deletion", "insertion"), "steps": 7, "substitute": "mean"}
    a = score_maps(hand_handle(), x, [MAP], [0], [0], batch_size=1, **kw)  # type: ignore[arg-type]
    b = score_maps(hand_handle(), x, [MAP], [0], [0], batch_size=64, **kw)  # type: ignore[arg-type]
    assert a == b


# ------------------------------------------------------------------------------------------------
# against an independent per-stage loop on a real model
# ------------------------------------------------------------------------------------------------
def reference_curves(
    model: nn.Module, x: Tensor, m: Tensor, target: int, steps: int, lo: Tensor
) -> dict[str, list[float]]:
    """One forward pass per stage, written from the contract's words with NumPy's sort."""
    _c, h, w = x.shape
    order = np.argsort(-m.numpy().ravel(), kind="stable")
    blurred = TF.gaussian_blur(x, kernel_size=[11, 11], sigma=[5.0, 5.0])
    out: dict[str, list[float]] = {"deletion": [], "insertion": []}
    for k in range(steps + 1):
        n = round(k * h * w / steps)
        chosen = np.zeros(h * w, dtype=bool)
        chosen[order[:n]] = True
        mask = torch.from_numpy(chosen).view(1, h, w)
        deleted = torch.where(mask, blurred, x)
        inserted = torch.where(mask, x, blurred)
        with torch.no_grad():
            for kind, inp in (("deletion", deleted), ("insertion", inserted)):
                out[kind].append(float(model(inp[None]).softmax(dim=1)[0, target]))
    return out


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def test_curves_match_a_per_stage_reference_loop() -> None:
    model = small_cnn()
    handle = ModelHandle(model, name="cnn", target_layer="5", input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expl = explain(handle, x, "gradcam", ExplainParams(seed=0))
    target = int(expl.targets[0, 0])
    m = expl.maps[0, 0]
    [ours] = score_maps(
        handle,
        x,
        [m],
        [0],
        [target],
        kinds=("deletion", "insertion"),
        steps=13,
        substitute="blur",
        batch_size=8,
    )
    lo, _ = handle.pixel_bounds(3)
    ref = reference_curves(model, x[0], m, target, 13, lo)
    for kind in ("deletion", "insertion"):
        assert ours[kind] == pytest.approx(ref[kind], abs=2e-5)
        assert auc(ours[kind]) == pytest.approx(np.trapezoid(ref[kind], dx=1 / 13), abs=2e-5)


# ------------------------------------------------------------------------------------------------
# models whose relevant region is known
# ------------------------------------------------------------------------------------------------
class Quadrant(nn.Module):
    """Looks only at the top-left quadrant: its pixels' brightness (a 1×1 convolution of
    weights ±1 after a mask) decides class 0 against class 1."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1.0
        self.register_buffer("mask", mask)
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(
                torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]).view(2, 3, 1, 1)
            )
            self.features[0].bias.zero_()
            self.head.weight.copy_(torch.tensor([[4.0, -4.0], [0.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([-1.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x * self.mask)
        return self.head(f.mean(dim=(2, 3)))


class Blind(nn.Module):
    """Ignores its input: the same logits for every image (a convolution runs, its output unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return self.head.bias.expand(x.shape[0], -1) + 0.0 * f.mean(dim=(1, 2, 3)).unsqueeze(1)


def bright_image(size: int = 32, seed: int = 0) -> Tensor:
    """Bright, textured pixels (normalised values around +1.5)."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 + torch.rand(1, 3, size, size, generator=g)


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_quadrant_model_maps_beat_the_random_map_and_point_at_it(method: str) -> None:
    model = Quadrant(64).eval()
    handle = ModelHandle(model, name="quadrant", target_layer="features", input_size=(3, 64, 64))
    x = bright_image(64)
    expl = explain(handle, x, method, ExplainParams(seed=0, steps=16), targets=Targets.given([[0]]))
    params = EvaluateParams(
        metrics="deletion,insertion,pointing", curve_steps=16, substitute="black", box="0,0,32,32"
    )
    ev = evaluate(handle, x, [expl], params, seed=7, batch_size=16)
    [r] = ev.results
    rand = ev.random_aucs
    assert r.aucs["deletion"] < rand["deletion"] - 0.1  # the quadrant goes first: the score falls at once
    assert r.aucs["insertion"] > rand["insertion"] + 0.1
    assert r.pointing is not None and r.pointing.hit
    px, py = r.pointing.peak
    assert px < 32 and py < 32  # the quadrant itself, not just the margin
    far = evaluate(
        handle, x, [expl], EvaluateParams(metrics="pointing", box="48,48,64,64"), seed=7, batch_size=16
    )
    assert far.results[0].pointing is not None and not far.results[0].pointing.hit


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_blind_model_aucs_equal_the_random_map(method: str) -> None:
    torch.manual_seed(0)
    handle = ModelHandle(Blind().eval(), name="blind", target_layer="features", input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expl = explain(handle, x, method, ExplainParams(seed=0))
    ev = evaluate(handle, x, [expl], EvaluateParams(curve_steps=10), seed=3, batch_size=32)
    for kind in ("deletion", "insertion"):
        assert ev.results[0].aucs[kind] == pytest.approx(ev.random_aucs[kind], abs=1e-6)
        assert ev.results[0].aucs[kind] == pytest.approx(ev.score, abs=1e-6)  # a flat curve at p


def test_random_map_is_seeded() -> None:
    assert torch.equal(random_map(8, 9, 5), random_map(8, 9, 5))
    assert not torch.equal(random_map(8, 9, 5), random_map(8, 9, 6))


# ------------------------------------------------------------------------------------------------
# sanity
# ------------------------------------------------------------------------------------------------
def deeper_cnn() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def hooks_of(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_sanity_correlations_fall_and_the_served_model_is_untouched() -> None:
    model = deeper_cnn()
    before = copy.deepcopy(model.state_dict())
    handle = ModelHandle(model, name="cnn", target_layer="4", input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits_before = model(x).clone()
    expl = explain(handle, x, "gradcam", ExplainParams(seed=0))
    ev = evaluate(handle, x, [expl], EvaluateParams(metrics="sanity"), seed=11, batch_size=8)
    s = ev.results[0].sanity
    assert s is not None
    assert s.layers == ["8", "4", "2", "0"]  # output first: the head, then each convolution
    assert len(s.spearman) == 4
    # the head alone keeps a part of the map (0.34); with the layer the map reads, nothing is left
    assert 0.2 < s.spearman[0] < 0.6
    assert all(abs(r) < 0.15 for r in s.spearman[1:])
    # the served model: the same bits, the same outputs, no hooks, still in eval mode
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), logits_before)
    assert hooks_of(model) == 0
    assert not model.training
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_blocks_expand_sequences_and_descend_wrappers() -> None:
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    names = [n for n, _ in blocks(net)]
    assert names[:3] == ["conv1", "bn1", "layer1.0"] and names[-2:] == ["layer4.1", "fc"]
    wrapped = nn.Sequential(net)
    assert next(n for n, _ in blocks(nn.ModuleDict({"net": wrapped}))) == "net.0.conv1"


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (64,), generator=g).float()  # many ties
    b = a + torch.randn(64, generator=g)
    assert spearman(a, b) == pytest.approx(float(stats.spearmanr(a.numpy(), b.numpy())[0]), abs=1e-12)
    assert spearman(a, torch.zeros(64)) == 0.0


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"metrics": "deletion,nope"}, "metrics"),
        ({"metrics": " , "}, "metrics"),
        ({"curve_steps": 1}, "curve_steps"),
        ({"curve_steps": 225}, "curve_steps"),
        ({"metrics": "pointing"}, "box"),
        ({"box": "10,10,5,20"}, "box"),
        ({"box": "1,2,3"}, "box"),
        ({"box": "-1,0,3,4"}, "box"),
    ],
)
def test_bad_parameters_name_their_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        EvaluateParams(**values)  # type: ignore[arg-type]
    assert info.value.field == field


def test_box_outside_the_image() -> None:
    p = EvaluateParams(metrics="pointing", box="0,0,81,50")
    with pytest.raises(InvalidParameter):
        p.check_box(80, 50)
    EvaluateParams(metrics="pointing", box="0,0,80,50").check_box(80, 50)
