"""Finding, naming and describing a model's layers: the one module that knows about layers.

Dotted names are resolved with ``get_submodule``. The layers CAM methods can use, their layouts
(``nchw``, ``nhwc``, ``tokens``) and the default one are measured on the model
(``describe_layers``) or, for TorchScript modules that refuse hooks, the default is found by
structure alone (``layer_before_head``). ``supports_hooks`` and
``has_scripted_parts`` say what a module lets the engine do (``ModelHandle.offers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

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


Layout = Literal["nchw", "nhwc", "tokens"]


@dataclass(frozen=True)
class LayerView:
    """How to read a layer's output as a map (N, C, h, w).

    ``nchw``: as it is; ``nhwc``: channels last (timm's Swin and MaxViT stages); ``tokens``: a
    sequence (N, T, C) of ``prefix_tokens`` (class, distillation, register tokens) followed by the
    ``grid`` of patch tokens in raster order.
    """

    layout: Layout
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    def to_map(self, t: Tensor) -> Tensor:
        """The output (or its gradient) as (N, C, h, w); prefix tokens dropped."""
        if self.layout == "nchw":
            return t
        if self.layout == "nhwc":
            return t.permute(0, 3, 1, 2)
        assert self.grid is not None
        gh, gw = self.grid
        patches = t[:, self.prefix_tokens :, :]
        return patches.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)


NCHW = LayerView("nchw")


@dataclass(frozen=True)
class LayerInfo:
    """A layer a CAM method can use: its name, module class, layout and (C, h, w) map shape."""

    name: str
    type: str
    view: LayerView
    shape: tuple[int, int, int]

    def describe(self, default: bool) -> dict[str, object]:
        """The ``GET /v1/models/{model}/layers`` entry."""
        return {
            "name": self.name,
            "type": self.type,
            "layout": self.view.layout,
            "shape": list(self.shape),
            "prefix_tokens": self.view.prefix_tokens,
            "default": default,
        }


@dataclass(frozen=True)
class Tokens:
    """What a transformer says about its token sequence: the prefix tokens and the patch grid."""

    prefix_tokens: int
    grid: tuple[int, int]


def token_facts(model: nn.Module) -> Tokens | None:
    """The model's prefix-token count and patch grid, read from the model itself: timm's
    ``num_prefix_tokens`` and ``patch_embed.grid_size``, torchvision's ``class_token`` and
    ``image_size // patch_size``. ``None`` for models without a patch embedding."""
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and len(grid) == 2:
        return Tokens(int(getattr(model, "num_prefix_tokens", 0) or 0), (int(grid[0]), int(grid[1])))
    image, patch = getattr(model, "image_size", None), getattr(model, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and hasattr(model, "conv_proj"):
        prefix = 1 if getattr(model, "class_token", None) is not None else 0
        return Tokens(prefix, (image // patch, image // patch))
    return None


def channels_last_hint(model: nn.Module) -> bool:
    """Whether the model declares channels-last feature maps (timm's ``output_fmt == "NHWC"``)."""
    return str(getattr(model, "output_fmt", "")).upper() == "NHWC"


def _is_grid(h: int, w: int, height: int, width: int) -> bool:
    """(h, w) is the input (height, width) seen at one integer stride (rounded up or down), h·w > 1."""
    if h * w <= 1:
        return False
    for stride in range(1, max(height, width) + 1):
        hs, ws = height / stride, width / stride
        if h in (math.floor(hs), math.ceil(hs)) and w in (math.floor(ws), math.ceil(ws)):
            return True
        if hs < h - 1:
            return False
    return False


def read_layout(
    shape: tuple[int, ...], input_hw: tuple[int, int], tokens: Tokens | None, channels_last: bool
) -> LayerView | str:
    """How an output of ``shape`` (batch dimension excluded) reads as a map, or why it does not.

    A 3-d output is a token sequence when its length is the model's prefix tokens plus its patch
    grid. A 4-d output is a map when its last two dimensions are a grid of the input (``nchw``) or
    its middle two are (``nhwc``); when both readings fit (C = h = w), the model's own
    ``output_fmt`` decides, and without one the shape is refused as ambiguous.
    """
    height, width = input_hw
    if len(shape) == 2:
        if tokens is None:
            return f"an output shaped {list(shape)} is a sequence, and the model declares no patch grid"
        gh, gw = tokens.grid
        if shape[0] == tokens.prefix_tokens + gh * gw and gh * gw > 1:
            return LayerView("tokens", tokens.prefix_tokens, tokens.grid)
        return (
            f"{shape[0]} tokens are not the model's {tokens.prefix_tokens} prefix tokens plus its "
            f"{gh}×{gw} patch grid"
        )
    if len(shape) != 3:
        return f"an output shaped {list(shape)} is neither a map nor a token sequence"
    a, b, c = shape
    nchw, nhwc = _is_grid(b, c, height, width), _is_grid(a, b, height, width)
    if nchw and nhwc:
        if channels_last:
            return LayerView("nhwc")
        return f"an output shaped {list(shape)} {AMBIGUOUS}"
    if nchw:
        return NCHW
    if nhwc:
        return LayerView("nhwc")
    return f"an output shaped {list(shape)} is no spatial grid of the {height}×{width} input"


AMBIGUOUS = "reads as channels-first and as channels-last"


@dataclass
class LayerTable:
    """The layers of one model that CAM methods can use, in execution order, and the default."""

    layers: list[LayerInfo]
    default: str | None
    refused: dict[str, str] = field(default_factory=dict)  # layer → why it cannot be used

    def names(self) -> list[str]:
        return [info.name for info in self.layers]

    def get(self, name: str) -> LayerInfo:
        """The usable layer ``name``; ``UnknownLayer`` (422) listing the usable ones otherwise."""
        for info in self.layers:
            if info.name == name:
                return info
        why = self.refused.get(name)
        raise UnknownLayer(name, self.names(), usable=True, reason=why)

    def describe(self, default: str | None = None) -> list[dict[str, object]]:
        """Every usable layer; ``default`` (the model's configured layer, else the measured one)
        is marked."""
        chosen = default or self.default
        return [info.describe(info.name == chosen) for info in self.layers]


def _inside_attention(name: str, attention: list[str]) -> bool:
    return any(name.startswith(a + ".") for a in attention)


def is_attention(module: nn.Module) -> bool:
    """An attention block: timm's (``fused_attn``), torchvision's ``MultiheadAttention``, or any
    module whose class name ends in ``Attention``."""
    return (
        hasattr(module, "fused_attn")
        or isinstance(module, nn.MultiheadAttention)
        or type(module).__name__.endswith("Attention")
    )


def describe_layers(model: nn.Module, example: Tensor) -> LayerTable:
    """Measure the layers CAM methods can use: one forward and one backward pass on ``example``
    (two or more images), every module's output shape read with ``read_layout`` (shapes that read
    both as channels-first and channels-last are read again on a wider input, ``_settle``).

    Left out: modules inside attention blocks (their outputs are attention internals), adaptive
    pooling (it belongs to the head: VGG's ``avgpool``), outputs whose batch dimension is not the
    images' (Swin's windows), and every output ``read_layout`` refuses. The default layer is the
    last usable one, in execution order, whose map receives a gradient from the features the head
    reads (the input of the last linear layer, weighted at random) — ``blocks[-1].norm1`` of a
    class-token ViT, whose later outputs reach the head only through the class token — preferring
    the width of the model's last usable map, and not an ``Identity`` (it repeats the map before it).
    Containers finish after their children, so the outermost module that returns the final map
    wins (``layer4`` of a ResNet). Every hook lives inside this function's ``try/finally``.
    """
    tokens, channels_last = token_facts(model), channels_last_hint(model)
    input_hw = (int(example.shape[2]), int(example.shape[3]))
    batch = int(example.shape[0])
    modules = dict(model.named_modules())
    attention = [n for n, m in modules.items() if n and is_attention(m)]
    seen: list[tuple[str, Tensor]] = []
    refused: dict[str, str] = {}
    head: list[Tensor] = []  # the input of the last linear layer run: the features the head reads

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, inputs: tuple[object, ...], out: object) -> None:
            if isinstance(m, nn.Linear) and inputs and isinstance(inputs[0], Tensor):
                head[:] = [inputs[0]]
            if isinstance(m, _HEAD_POOLS) or _inside_attention(name, attention):
                return
            if not isinstance(out, Tensor) or out.dim() < 3 or out.shape[0] != batch:
                return
            if out.requires_grad:
                out.retain_grad()
            seen.append((name, out))

        return hook

    handles = []
    try:
        for name, module in modules.items():
            if name:
                handles.append(module.register_forward_hook(make(name)))
        x = example.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            # what reaches the head's features (not the logits: a zero-initialised head, as
            # torchvision's ViT has, would pass no gradient back at all)
            top = head[0] if head and head[0].requires_grad else logits
            if isinstance(top, Tensor) and top.requires_grad:
                weights = torch.randn(top.shape, generator=torch.Generator().manual_seed(0)).to(top)
                torch.autograd.backward((top * weights).sum())
    finally:
        for h in handles:
            h.remove()

    views = {name: read_layout(tuple(out.shape[1:]), input_hw, tokens, channels_last) for name, out in seen}
    ambiguous = [n for n, v in views.items() if isinstance(v, str) and v.endswith(AMBIGUOUS)]
    if ambiguous:
        views.update(_settle(model, example, ambiguous, tokens))
    layers: list[LayerInfo] = []
    reached: dict[str, bool] = {}
    for name, out in seen:
        view = views[name]
        if isinstance(view, str):
            refused.setdefault(name, view)
            continue
        refused.pop(name, None)
        as_map = view.to_map(out.detach())
        info = LayerInfo(name, type(modules[name]).__name__, view, tuple(as_map.shape[1:]))  # type: ignore[arg-type]
        layers = [i for i in layers if i.name != name] + [info]
        grad = out.grad
        reached[name] = grad is not None and bool((view.to_map(grad) != 0).any())
    return LayerTable(layers, _default_layer(layers, reached), refused)


def _settle(
    model: nn.Module, example: Tensor, names: list[str], tokens: Tokens | None
) -> dict[str, LayerView | str]:
    """Read the ambiguous layers again on an input twice as wide (a forward pass only): where C =
    h = w at the first size, the width now tells the layouts apart. A model that takes no other
    size leaves them ambiguous (refused)."""
    wide = torch.cat([example, example], dim=3)
    shapes: dict[str, tuple[int, ...]] = {}

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor):
                shapes[name] = tuple(out.shape[1:])

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            model(wide)
    except Exception:
        return {}
    finally:
        for h in handles:
            h.remove()
    hw = (int(wide.shape[2]), int(wide.shape[3]))
    out: dict[str, LayerView | str] = {}
    for name in names:
        if name in shapes:
            view = read_layout(shapes[name], hw, tokens, channels_last=False)
            if not isinstance(view, str):
                out[name] = view
    return out


def _default_layer(layers: list[LayerInfo], reached: dict[str, bool]) -> str | None:
    # an Identity passes the map of the layer before it on: name that layer instead
    live = [i for i in layers if reached.get(i.name) and i.type != "Identity"]
    if not live:
        return None
    width = layers[-1].shape[0]
    same = [i for i in live if i.shape[0] == width]
    return (same or live)[-1].name


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


#: a model that refuses hooks is assumed to hold this many times its input per image in activations
FALLBACK_ACTIVATION_RATIO = 200


def activation_bytes(model: nn.Module, example: Tensor) -> int:
    """Bytes of every module's tensor outputs on one forward of ``example`` (leaf modules only,
    so a container's output is not counted again): what a backward pass keeps alive, roughly.
    The hooks live inside this function's ``try/finally``."""
    total = 0

    def hook(_m: nn.Module, _inputs: tuple[object, ...], out: object) -> None:
        nonlocal total
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total + example.numel() * example.element_size()
