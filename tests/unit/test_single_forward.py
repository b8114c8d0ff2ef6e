"""Methods that pick their own top-1 targets run the model once per chunk, with the same result."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from service.explainers import ExplainParams, ModelHandle, all_methods, explain, predict

PICKING = sorted(m.name for m in all_methods() if m.picks_targets)


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    torch.manual_seed(0)
    return ModelHandle(torchvision.models.resnet18(num_classes=7).eval())


def test_the_picking_methods_are_the_single_pass_ones() -> None:
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
    }


@pytest.mark.parametrize("method", PICKING)
def test_top1_costs_one_forward_and_equals_explicit_targets(handle: ModelHandle, method: str) -> None:
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    params = ExplainParams(seed=5, batch_size=2)
    layer = (
        handle.resolve_layer(None)
        if method
        not in {
            "saliency",
            "input_x_gradient",
            "guided_backprop",
            "deconvnet",
        }
        else None
    )
    model = handle.prepared(keep=layer)
    calls: list[int] = []

    def count(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        calls.append(args[0].shape[0])

    hook = model.register_forward_pre_hook(count)
    try:
        picked = explain(handle, x, method, params)
        lazy_calls = list(calls)
        calls.clear()
        explicit = explain(handle, x, method, params, targets=picked.targets.tolist())
    finally:
        hook.remove()
    assert lazy_calls == [2, 1]  # the method's own chunks, nothing else
    assert calls == [2, 1, 2, 1]  # the engine's target pass, then the method's chunks
    assert torch.equal(picked.targets, predict(handle, x).argmax(dim=1, keepdim=True))
    assert torch.equal(picked.maps, explicit.maps)
    torch.testing.assert_close(picked.logits, explicit.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(picked.scores, explicit.scores, rtol=1e-5, atol=1e-6)


def test_top_k_and_noise_methods_keep_the_separate_target_pass(handle: ModelHandle) -> None:
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    out = explain(handle, x, "gradcam", ExplainParams(seed=1), top_k=2)
    assert torch.equal(out.targets, predict(handle, x).topk(2, dim=1).indices)
