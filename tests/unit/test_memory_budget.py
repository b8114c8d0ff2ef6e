"""The model's memory bounds: ``batch_size`` clamped to the activation budget (results unchanged),
and the private copies kept as a bounded LRU."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from service.explainers import ExplainParams, ModelHandle, explain, get_method
from service.explainers.engine import resolve_params
from service.explainers.layers import activation_bytes


def resnet(**kwargs: object) -> ModelHandle:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return ModelHandle(module=model, name="r18", input_size=(3, 64, 64), **kwargs)  # type: ignore[arg-type]


def test_activation_bytes_counts_every_leaf_output_once() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 2, 1)))
    x = torch.zeros(2, 3, 8, 8)
    # input 2·3·64, conv 2·4·64, relu 2·4·64, inner conv 2·2·64 (the containers are not counted)
    assert activation_bytes(model, x) == 4 * 2 * 64 * (3 + 4 + 4 + 2)


def test_batch_size_is_clamped_to_the_memory_budget_and_results_do_not_change() -> None:
    free = resnet()
    per_pass = free.pass_bytes()
    assert per_pass > 0
    tight = resnet(batch_memory_bytes=3 * per_pass + 1)
    assert tight.max_batch() == 3 and free.max_batch() is None
    method = get_method("integrated_gradients")
    asked = ExplainParams(steps=16, batch_size=64, seed=0)
    assert resolve_params(method, tight, asked).batch_size == 3
    assert resolve_params(method, free, asked).batch_size == 64
    smaller = ExplainParams(steps=16, batch_size=2, seed=0)
    assert resolve_params(method, tight, smaller).batch_size == 2  # below the bound: unchanged
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a = explain(free, x, "integrated_gradients", asked)
    b = explain(tight, x, "integrated_gradients", asked)
    assert b.params.batch_size == 3
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-4, atol=1e-6)


def test_a_tiny_budget_still_allows_one_pass_at_a_time() -> None:
    handle = resnet(batch_memory_bytes=1)
    assert handle.max_batch() == 1
    out = explain(handle, torch.randn(1, 3, 64, 64), "saliency", ExplainParams(batch_size=32))
    assert out.params.batch_size == 1


def test_private_copies_are_a_bounded_lru() -> None:
    handle = resnet(max_copies=2)
    x = torch.randn(1, 3, 64, 64)
    layers = ["layer1", "layer2", "layer3", "layer4", "layer1"]
    for layer in layers:
        explain(handle, x, "gradcam", ExplainParams(layer=layer))
        assert len(handle._prepared) <= 2
    assert [layer for layer, _ in handle._prepared] == ["layer4", "layer1"]  # keyed (layer, precision)
    # the shared model was never touched: no hooks, gradients still off where they were
    assert not any(m._forward_hooks or m._backward_hooks for m in handle.module.modules())
