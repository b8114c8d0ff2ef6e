"""Finding and naming layers: dotted names resolved with ``get_submodule``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.errors import UnknownLayer

_HEAD_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule, in definition order (the root, named '', excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; ``UnknownLayer`` lists the valid names otherwise."""
    if not name:
        raise UnknownLayer(name, layer_names(model))
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnknownLayer(name, layer_names(model)) from None


def find_target_layer(model: nn.Module, example: Tensor) -> str:
    """The last module, in execution order, whose output is a spatial feature map (N, C, h, w), h·w > 1.

    That is the map the classifier head pools (``layer4`` of a ResNet, ``features`` of a DenseNet
    or VGG, ``bn2`` of timm's EfficientNet). Containers finish after their children, so the outermost
    module that returns the final map wins. Adaptive pooling modules belong to the head (VGG's
    ``avgpool`` resizes to 7×7 before the classifier) and are skipped.
    """
    order: list[str] = []
    handles = []

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, _i: object, out: object) -> None:
            if isinstance(m, _HEAD_POOLS):
                return
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                order.append(name)

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise UnknownLayer("(auto)", layer_names(model))
    return order[-1]
