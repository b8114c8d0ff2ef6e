"""CAM, the original class activation map, and the detection of the head it needs.

CAM is only defined for a network whose logits are a linear layer applied to the global average of
the target layer's feature maps. Rather than trusting module names, the head is *measured*: one
forward pass of a random example records the target layer's output A and the input and output of
every ``nn.Linear``; the head qualifies when the last linear layer's output is the model's output
and its input is the spatial mean of A (or of ReLU(A): DenseNet applies a functional ReLU between
its ``features`` and the pooling). Dropout in eval mode is the identity and does not get in the way;
anything else between the pooling and the last linear layer (mobilenet_v3's Linear → Hardswish →
Dropout → Linear, VGG's three-layer classifier) disqualifies the model, with an error that points
to ``gradcam``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from service.errors import MethodNotApplicable
from service.explainers.base import Attribution, Method, ModelHandle, Need, RunContext, register
from service.explainers.figures import CAM_HEATMAP
from service.explainers.hooks import capture
from service.explainers.layers import NCHW, LayerView, get_layer
from service.explainers.params import ExplainParams


@dataclass(frozen=True)
class CamHead:
    """A verified GAP + linear head: the final layer's dotted name and what feeds the pooling."""

    linear: str
    relu: bool  # the pooled maps are ReLU(layer output), not the output itself


# prepared model → {layer name → head or None}; weak so dropped models take their entry with them
_HEADS: weakref.WeakKeyDictionary[nn.Module, dict[str, CamHead | None]] = weakref.WeakKeyDictionary()
_HEADS_LOCK = threading.Lock()  # the cache is shared by every handle; detection runs under the handle's lock


def detect_head(model: nn.Module, layer: str, example: Tensor, view: LayerView = NCHW) -> CamHead | None:
    """The GAP + linear head fed by ``layer``'s output (read as a map through ``view``), measured on
    ``example``; None if there is none.

    Every hook lives inside this function's ``try/finally``.
    """
    target = get_layer(model, layer)
    seen: dict[str, Tensor] = {}
    calls: list[tuple[str, Tensor, Tensor]] = []

    def on_target(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            seen["act"] = out.clone()  # DenseNet's next op is an in-place ReLU

    def on_linear(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inputs: tuple[object, ...], out: object) -> None:
            if inputs and isinstance(inputs[0], Tensor) and isinstance(out, Tensor):
                calls.append((name, inputs[0].clone(), out))

        return hook

    handles = [target.register_forward_hook(on_target)]
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(on_linear(name)))
        with torch.inference_mode():
            logits = model(example)
    finally:
        for h in handles:
            h.remove()

    raw = seen.get("act")
    if not isinstance(logits, Tensor) or raw is None or not calls:
        return None
    act = view.to_map(raw)
    if act.dim() != 4:
        return None
    name, z, out = calls[-1]
    if out.shape != logits.shape or not torch.equal(out, logits):
        return None  # something runs after the last linear layer
    if z.dim() != 2 or z.shape != (act.shape[0], act.shape[1]):
        return None  # the last linear layer does not read one value per channel of the layer
    for relu in (False, True):
        pooled = (torch.relu(act) if relu else act).float().mean(dim=(2, 3))
        scale = float(pooled.abs().max()) + 1e-12
        if torch.allclose(z.float(), pooled, rtol=1e-4, atol=1e-5 * scale):
            return CamHead(linear=name, relu=relu)
    return None


def cam_head(handle: ModelHandle, layer: str) -> CamHead | None:
    """The verified head of ``handle``'s model for ``layer`` (measured once, then cached)."""
    with handle.lock:
        model = handle.prepared(keep=layer)
        with _HEADS_LOCK:
            per_model = _HEADS.setdefault(model, {})
            if layer in per_model:
                return per_model[layer]
        head = detect_head(model, layer, handle.probe_input(), handle.layer_view(layer))
        with _HEADS_LOCK:
            per_model[layer] = head
        return head


@register
class Cam(Method):
    """CAM (Zhou et al., CVPR 2016, https://arxiv.org/abs/1512.04150).

    M_c(x,y) = Σ_k w_k^c f_k(x,y): f_k the feature maps that feed global average pooling, w^c the final
    linear layer's row for class c. No gradient is computed. As in the paper there is no ReLU and no
    bias, so the map is signed and its spatial mean plus the bias is the logit y_c. On the same
    head Grad-CAM's weights are w_k^c / (h·w), hence ReLU(CAM) = (h·w) · Grad-CAM at layer resolution
    (and CAM = (h·w) · Grad-CAM wherever CAM ≥ 0).

    Only for GAP + linear heads (see ``detect_head``); any other model raises ``MethodNotApplicable``
    before any work, suggesting ``gradcam``.

    Shown by default as in the paper's Fig. 3: the map in jet over the photo, min–max scaled; of
    the signed map, its positive part (the class evidence the figures highlight).
    """

    name = "cam"
    family = "cam"
    description = "Class activation map: the final linear layer's class weights applied to the pooled maps."
    paper = "https://arxiv.org/abs/1512.04150"
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "precision"})
    signed = True
    rendering = CAM_HEATMAP
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "layer"})

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        layer = handle.resolve_layer(params.layer)
        if cam_head(handle, layer) is not None:
            return
        for other in _other_layers(handle, layer):
            if cam_head(handle, other) is not None:
                raise MethodNotApplicable(
                    f"CAM needs the layer whose maps feed global average pooling ({other!r}), not "
                    f"{layer!r}; use 'gradcam' for other layers",
                    field="layer",
                )
        raise MethodNotApplicable(
            f"CAM needs a model whose classifier is global average pooling followed by a single linear "
            f"layer on the maps of {layer!r}; {handle.name!r} has another head. Use 'gradcam' instead: "
            "it generalises CAM to any CNN",
            field="method",
        )

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        assert ctx.layer is not None
        head = cam_head(ctx.handle, ctx.layer)
        if head is None:  # check() ran first; this only guards direct calls
            raise MethodNotApplicable("CAM needs a GAP + linear head; use 'gradcam'", field="method")
        linear = get_layer(ctx.model, head.linear)
        assert isinstance(linear, nn.Linear)
        maps: list[Tensor] = []
        for sl in ctx.chunks(x.shape[0]):
            with capture(ctx.model, ctx.layer) as cap, torch.inference_mode():
                ctx.forward(x[sl])
                act = ctx.as_map(cap.get()).float()
            if head.relu:
                act = torch.relu(act)
            w = linear.weight.detach().float()[targets[sl]]  # (n, C)
            maps.append(torch.einsum("nc,nchw->nhw", w, act))
            ctx.advance(sl.stop - sl.start)
        return Attribution(maps=torch.cat(maps))


def _other_layers(handle: ModelHandle, layer: str) -> list[str]:
    """Layers worth suggesting instead of ``layer``: the configured one, then the auto-detected one.

    The measured default comes from ``ModelHandle.layers`` (the private copy, never the shared model).
    """
    names = [handle.target_layer, handle.layers().default]
    return [n for n in dict.fromkeys(names) if n is not None and n != layer]
