"""Capturing a vision transformer's attention probabilities on the private attribution copy.

Two kinds of self-attention module are understood:

* timm's ``Attention`` and ``EvaAttention`` (ViT, DeiT, EVA): with ``fused_attn`` off they compute
  ``attn = attn_drop(softmax(q kᵀ · scale))`` and then ``attn @ v``; the output of ``attn_drop``
  is the tensor the block uses, so a forward hook there records A_l (and a gradient taken with
  respect to it is ∂y/∂A_l). ``fused_attn`` is switched off only while ``capture_attention`` runs,
  and restored in its ``finally`` (the private copy is cached and shared by later calls).
* torchvision's ``VisionTransformer``, whose ``EncoderBlock`` calls an ``nn.MultiheadAttention``
  with ``need_weights=False`` (a fused kernel that never forms A). A forward hook on the module
  replaces its output by an explicit computation, numerically the same (the in-projection,
  softmax(q kᵀ / √d), ``attn @ v``, the out-projection), whose A is the tensor recorded.

``capturable`` measures a model once (``ModelHandle.offers``): the token facts and pooling are
known, every block yields A shaped (N, heads, T, T) over the prefix and patch tokens, the captured
forward reproduces the model's logits, and the model's own final norm, pooling and head applied to
the last block's output (``head``, what LeGrad uses) reproduce them too. Windowed attention (Swin)
fails the shape check: its batch dimension counts windows. Every hook and flag lives inside
``capture_attention``'s ``try/finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.explainers.layers import Tokens, token_facts

Pooling = Literal["token", "mean"]
#: tolerance of the equivalence checks, relative to the largest logit magnitude
RTOL = 1e-4


class NotCapturable(RuntimeError):
    """An attention module is called in a way the explicit computation does not reproduce."""


@dataclass(frozen=True)
class Transformer:
    """What the attention methods must know of a model: its tokens and how its head pools them."""

    tokens: Tokens
    pooling: Pooling  # "token": the class token (row 0); "mean": the mean of the patch tokens


@dataclass
class Recording:
    """What one captured forward pass saw, in execution order."""

    attention: list[Tensor] = field(default_factory=list)  # A_l, (N, heads, T, T)
    blocks: list[Tensor] = field(default_factory=list)  # block l's output tokens (N, T, D)


def transformer(model: nn.Module) -> Transformer | None:
    """The model's token facts and pooling, or ``None`` when either is not one the methods know
    (timm's ``global_pool`` "token" or "avg" without an attention pool; torchvision's class token)."""
    tokens = token_facts(model)
    if tokens is None:
        return None
    if _is_torchvision_vit(model):
        return Transformer(tokens, "token")
    pool = getattr(model, "global_pool", None)
    if getattr(model, "attn_pool", None) is not None or getattr(model, "pool_include_prefix", False):
        return None
    if pool == "token" and tokens.prefix_tokens >= 1:
        return Transformer(tokens, "token")
    if pool == "avg":
        return Transformer(tokens, "mean")
    return None


def _is_torchvision_vit(model: nn.Module) -> bool:
    return hasattr(model, "conv_proj") and hasattr(model, "encoder") and hasattr(model, "heads")


def head(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The model's own final norm, pooling and classifier applied to a block's output tokens."""
    if _is_torchvision_vit(model):
        encoder: Any = model.encoder
        heads: Any = model.heads
        return lambda t: heads(encoder.ln(t[:, 0]))
    norm: Any = model.norm
    forward_head: Any = model.forward_head
    return lambda t: forward_head(norm(t))


def _timm_sites(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]


def _mha_sites(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that hold the attention modules (each attention module's parent)."""
    modules = dict(model.named_modules())
    sites = {id(m) for m in _timm_sites(model)} | {id(m) for m in _mha_sites(model)}
    return [modules[name.rpartition(".")[0]] for name, m in modules.items() if id(m) in sites]


@contextmanager
def capture_attention(model: nn.Module, *, blocks: bool = False) -> Iterator[Recording]:
    """Record every block's attention probabilities A_l on each forward pass of ``model`` (the
    private copy), and with ``blocks`` each attention block's output tokens. The recorded tensors
    are the ones the forward pass uses, so gradients with respect to them are exact."""
    rec = Recording()
    timm_sites = _timm_sites(model)
    saved = [(m, m.fused_attn) for m in timm_sites]
    handles = []

    def keep_attention(_m: nn.Module, _i: object, out: Tensor) -> None:
        rec.attention.append(out)

    def keep_block(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            rec.blocks.append(out)

    def explicit(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: object) -> object:
        assert isinstance(m, nn.MultiheadAttention)
        out, attn = explicit_attention(m, args, kwargs)
        rec.attention.append(attn)
        return out, None

    try:
        for m in timm_sites:
            setattr(m, "fused_attn", False)  # noqa: B010  (timm declares it Final; a plain attribute at run time)
            attn_drop: Any = m.attn_drop
            handles.append(attn_drop.register_forward_hook(keep_attention))
        for mha in _mha_sites(model):
            handles.append(mha.register_forward_hook(explicit, with_kwargs=True))
        if blocks:
            for block in attention_blocks(model):
                handles.append(block.register_forward_hook(keep_block))
        yield rec
    finally:
        for h in handles:
            h.remove()
        for m, flag in saved:
            setattr(m, "fused_attn", flag)  # noqa: B010


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def explicit_attention(
    m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """``m(x, x, x, need_weights=False)`` computed explicitly: (output (N, T, E), A (N, h, T, T)).

    Only the self-attention torchvision's ``EncoderBlock`` runs is reproduced (batch first, one
    packed in-projection, no masks, no extra key/value biases, eval mode); ``NotCapturable``
    otherwise."""
    call = dict(zip(_MHA_ARGS, args, strict=False)) | kwargs
    query = call.get("query")
    if not isinstance(query, Tensor):
        raise NotCapturable("a MultiheadAttention call without a query tensor")
    q: Tensor = query
    if (
        call.get("key") is not q
        or call.get("value") is not q
        or call.get("key_padding_mask") is not None
        or call.get("attn_mask") is not None
        or call.get("is_causal", False)
        or not m.batch_first
        or not m._qkv_same_embed_dim
        or m.bias_k is not None
        or m.add_zero_attn
        or (m.training and m.dropout > 0)
    ):
        raise NotCapturable("a MultiheadAttention call other than plain batch-first self-attention")
    n, t, e = q.shape
    h = m.num_heads
    d = e // h
    qkv = F.linear(q, m.in_proj_weight, m.in_proj_bias).view(n, t, 3, h, d).permute(2, 0, 3, 1, 4)
    qh, kh, vh = qkv.unbind(0)
    attn = ((qh * d**-0.5) @ kh.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ vh).transpose(1, 2).reshape(n, t, e)
    return m.out_proj(out), attn


def capturable(model: nn.Module, probe: Tensor) -> bool:
    """Whether the attention methods can run on ``model`` (the private copy), measured on
    ``probe`` (two or more images): see the module docstring."""
    facts = transformer(model)
    if facts is None or not (_timm_sites(model) or _mha_sites(model)):
        return False
    gh, gw = facts.tokens.grid
    shape = (int(probe.shape[0]), facts.tokens.prefix_tokens + gh * gw)
    try:
        with torch.no_grad():
            plain = model(probe)
            with capture_attention(model, blocks=True) as rec:
                captured = model(probe)
            pooled = head(model)(rec.blocks[-1]) if rec.blocks else None
    except (NotCapturable, RuntimeError, TypeError, AttributeError, ValueError, IndexError):
        return False
    if not isinstance(plain, Tensor) or not rec.attention or pooled is None:
        return False
    if len(rec.blocks) != len(rec.attention):
        return False
    for a in rec.attention:
        if a.dim() != 4 or (a.shape[0], a.shape[2], a.shape[3]) != (shape[0], shape[1], shape[1]):
            return False
    tol = RTOL * max(1.0, float(plain.abs().max()))
    return bool(
        captured.shape == plain.shape
        and pooled.shape == plain.shape
        and (captured - plain).abs().max() <= tol
        and (pooled - plain).abs().max() <= tol
    )
