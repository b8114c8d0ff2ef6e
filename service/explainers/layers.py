"""Finding, naming and describing a model's layers: the one module that knows about layers.

Dotted names are resolved with ``get_submodule``. The CAM target layer is found by measuring the
model (``find_target_layer``: the last spatial map in execution order) or, for TorchScript
modules that refuse hooks, by structure alone (``layer_before_head``). ``supports_hooks`` and
``has_scripted_parts`` say what a module lets the engine do (``ModelHandle.offers``).
"""

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


def detect_target_layer(module: nn.Module, example: Tensor) -> str | None:
    """The CAM target layer of a model without a configured one, or ``None`` (no CAM methods).

    Measured with forward hooks where the module takes them, by structure otherwise.
    """
    if not supports_hooks(module):
        return layer_before_head(module)
    try:
        return find_target_layer(module, example)
    except UnknownLayer:
        return None


# class names (``original_name`` for TorchScript) that make up a classifier head
_HEAD_KINDS = frozenset(
    {
        "Linear",
        "Flatten",
        "Dropout",
        "Identity",
        "Softmax",
        "ReLU",
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool2d",
        "SelectAdaptivePool2d",
        "AvgPool2d",
        "ClassifierHead",
    }
)


def _kind(module: nn.Module) -> str:
    return str(getattr(module, "original_name", None) or type(module).__name__)


def _is_head(module: nn.Module) -> bool:
    children = list(module.children())
    if not children:
        return _kind(module) in _HEAD_KINDS
    return _kind(module) in _HEAD_KINDS or all(_is_head(c) for c in children)


def layer_before_head(module: nn.Module) -> str | None:
    """By structure alone (no forward hooks): the last child before the pooling/classifier head.

    ``layer4`` of a ResNet, ``bn2`` of timm's EfficientNet, ``features`` of a VGG. Used for
    TorchScript modules, which refuse Python hooks; single-child wrappers are descended into.
    """
    prefix = ""
    current = module
    while True:
        children = list(current.named_children())
        if len(children) == 1 and not _is_head(children[0][1]):
            name, current = children[0]
            prefix += name + "."
            continue
        for name, child in reversed(children):
            if not _is_head(child):
                return prefix + name
        return None


def supports_hooks(module: nn.Module) -> bool:
    """Whether Python forward hooks can be registered on ``module`` (TorchScript refuses them)."""
    try:
        handle = module.register_forward_hook(lambda *_: None)
    except RuntimeError:
        return False
    handle.remove()
    return True


def has_scripted_parts(module: nn.Module) -> bool:
    """True when ``module`` is or contains TorchScript code, which torch function modes cannot see."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())
