"""Methods whose first pass sees every clean row score (and choose) the targets in that pass.

The engine then runs no forward pass of its own: we count the rows every model call sees. The
result is the same as with explicit targets, and the same as the separate-pass path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torchvision
from helpers import every_ig_step_in_full
from torch import nn

from service.errors import TargetOutOfRange
from service.explainers import ExplainParams, ModelHandle, Targets, all_methods, explain, get_method, predict
from service.explainers.path import make_baseline

# the CNN methods (this module's model is a ResNet); the attention family, which picks its targets
# too, is counted on ViTs in test_attention.py
PICKING = sorted(m.name for m in all_methods() if m.picks_targets and m.family != "attention")
PERTURBATION = sorted(m.name for m in all_methods() if m.family == "perturbation")
SINGLE_PASS = sorted(
    m.name for m in all_methods() if m.name in PICKING and m.family not in ("path", "perturbation")
)
N, BATCH, STEPS = 3, 2, 4


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    torch.manual_seed(0)
    return ModelHandle(torchvision.models.resnet18(num_classes=7).eval())


def images(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


@contextmanager
def counting(handle: ModelHandle, method: str) -> Iterator[list[int]]:
    """The batch size of every call of the prepared model ``method`` runs on."""
    layer = handle.resolve_layer(None) if get_method(method).needs_layer else None
    calls: list[int] = []

    def count(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        calls.append(args[0].shape[0])

    hook = handle.prepared(keep=layer).register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        hook.remove()


def chunks(rows: int) -> list[int]:
    return [min(BATCH, rows - s) for s in range(0, rows, BATCH)]


def test_the_picking_methods_are_those_whose_first_pass_sees_every_clean_row() -> None:
    assert set(PICKING) == {
        "gradcam",
        "gradcam_pp",
        "xgradcam",
        "layercam",
        "hirescam",
        "saliency",
        "input_x_gradient",
        "guided_backprop",
        "deconvnet",
        "integrated_gradients",
        "blur_ig",
        "guided_ig",
        "xrai",
        "occlusion",
        "rise",
        "kernel_shap",
        "lime",
    }
    attention = {m.name for m in all_methods() if m.family == "attention"}
    assert attention == {m.name for m in all_methods() if m.picks_targets and m.family == "attention"}


@pytest.mark.parametrize("method", SINGLE_PASS)
def test_single_pass_methods_run_the_model_once_per_chunk(handle: ModelHandle, method: str) -> None:
    x = images(3)
    params = ExplainParams(seed=5, batch_size=BATCH)
    with counting(handle, method) as calls:
        picked = explain(handle, x, method, params)
        lazy = list(calls)
        calls.clear()
        explicit = explain(handle, x, method, params, targets=Targets.given(picked.targets.tolist()))
    assert lazy == chunks(N)  # the method's own chunks, nothing else
    assert calls == chunks(N)  # explicit targets are scored by the same pass
    assert torch.equal(picked.targets, predict(handle, x).argmax(dim=1, keepdim=True))
    assert torch.equal(picked.maps, explicit.maps)
    assert torch.equal(picked.logits, explicit.logits)
    torch.testing.assert_close(picked.logits.squeeze(1), predict(handle, x).amax(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        picked.scores.squeeze(1), predict(handle, x).softmax(dim=1).amax(dim=1), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("method", PERTURBATION)
def test_perturbation_methods_score_the_targets_with_their_clean_pass(
    handle: ModelHandle, method: str
) -> None:
    """The clean rows first (their pass scores and picks the targets), then the perturbed copies."""
    x = images(9)
    params = ExplainParams(seed=5, batch_size=BATCH, window=24, stride=24, masks=3)  # 4 windows, 3 masks
    with counting(handle, method) as calls:
        out = explain(handle, x, method, params)
    if method in ("kernel_shap", "lime"):  # one image after the other: its coalitions in chunks
        rows = params.samples + (1 if method == "kernel_shap" else 0)  # + the all-removed one
        assert calls == chunks(N) + chunks(rows) * N
    else:
        copies = 4 if method == "occlusion" else 3
        assert calls == chunks(N) + chunks(N * copies)
    assert torch.equal(out.targets, predict(handle, x).argmax(dim=1, keepdim=True))
    torch.testing.assert_close(out.logits.squeeze(1), predict(handle, x).amax(dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("baseline", "baseline_rows"), [("black", 1), ("uniform", 1), ("blur", N)])
def test_ig_endpoints_score_the_targets_and_a_shared_baseline_runs_once(
    handle: ModelHandle, baseline: str, baseline_rows: int
) -> None:
    x = images(4)
    params = ExplainParams(seed=5, batch_size=BATCH, steps=STEPS, baseline=baseline)
    # the passes in full (the affine entry's partial passes are counted in test_entry.py)
    with counting(handle, "integrated_gradients") as calls, every_ig_step_in_full():
        out = explain(handle, x, "integrated_gradients", params)
    # endpoints (the clean rows, then the baseline rows), then steps × pairs gradient passes
    assert calls == chunks(N + baseline_rows) + chunks(N * STEPS)
    assert torch.equal(out.targets, predict(handle, x).argmax(dim=1, keepdim=True))
    # the completeness delta uses the same f(x): Σ IG − δ = f(x) − f(x'), with f(x) the reported logit
    assert out.attributions is not None and out.completeness_delta is not None
    gap = out.attributions.sum(dim=(2, 3, 4)) - out.completeness_delta
    base = make_baseline(baseline, x, handle, 5)
    f_base = predict(handle, base).gather(1, out.targets)
    torch.testing.assert_close(gap, out.logits - f_base, rtol=1e-4, atol=1e-4)


def test_top_k_keeps_the_separate_target_pass(handle: ModelHandle) -> None:
    x = images(5)
    with counting(handle, "gradcam") as calls:
        out = explain(handle, x, "gradcam", ExplainParams(seed=1, batch_size=BATCH), targets=Targets.top(2))
    assert calls == chunks(N) + chunks(2 * N)
    assert torch.equal(out.targets, predict(handle, x).topk(2, dim=1).indices)


def test_noise_methods_keep_the_separate_target_pass(handle: ModelHandle) -> None:
    x = images(6)
    with counting(handle, "smoothgrad") as calls:
        out = explain(handle, x, "smoothgrad", ExplainParams(seed=1, batch_size=BATCH, samples=2))
    assert calls == chunks(N) + chunks(2 * N)
    assert torch.equal(out.targets, predict(handle, x).argmax(dim=1, keepdim=True))


@pytest.mark.parametrize("method", ["saliency", "gradcam", "integrated_gradients"])
def test_explicit_target_out_of_range_is_caught_by_the_scoring_pass(handle: ModelHandle, method: str) -> None:
    x = images(7, n=2)
    with pytest.raises(TargetOutOfRange, match="outside"):
        explain(handle, x, method, ExplainParams(seed=1, steps=2), targets=Targets.given([[1], [7]]))


def test_several_explicit_targets_per_image(handle: ModelHandle) -> None:
    x = images(8, n=2)
    params = ExplainParams(seed=1, batch_size=BATCH)
    both = explain(handle, x, "saliency", params, targets=Targets.given([[1, 4], [6, 0]]))
    assert both.targets.tolist() == [[1, 4], [6, 0]]
    probs = predict(handle, x).softmax(dim=1)
    torch.testing.assert_close(both.scores, probs.gather(1, both.targets), rtol=1e-4, atol=1e-6)
    for j in range(2):
        one = explain(
            handle, x, "saliency", params, targets=Targets.given(both.targets[:, j : j + 1].tolist())
        )
        torch.testing.assert_close(both.maps[:, j], one.maps[:, 0], rtol=1e-5, atol=1e-9)
