"""Transformer-native attributions over the attention probabilities A_l (N, heads, T, T) of each
block l (``attention_capture``): attention rollout, Chefer et al.'s transformer attribution and
LeGrad.

One shared engine (``AttentionMethod``): each chunk of ``batch_size`` rows runs one captured
forward pass of the private copy, scores its own targets on those clean logits
(``targets.choose``), and the method turns what was captured into a token relevance; maps come
back at the patch grid's resolution and the engine upsamples them bilinearly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.attention_capture import (
    Recording,
    Transformer,
    attention_blocks,
    capture_attention,
    head,
    transformer,
)
from service.explainers.base import Attribution, Method, ModelHandle, Need, RunContext, register
from service.explainers.params import ExplainParams, HeadFusion
from service.explainers.targets import choose

#: the blocks ``passes`` assumes for LeGrad before the model is seen (ViT-B/16 has 12)
NOMINAL_BLOCKS = 12


class AttentionMethod(Method):
    """Shared engine: per chunk, one captured forward (and the method's backward passes), then
    ``relevance`` gives (n, T, T) relevances R, read as a map by ``token_map``."""

    family = "attention"
    picks_targets = True
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "attention", "gradients"})

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        facts = transformer(ctx.model)
        assert facts is not None, "the attention need is measured before a method runs"
        maps, logits, chosen = [], [], []
        for sl in ctx.chunks(int(x.shape[0])):
            m, lg, t = self.chunk(ctx, facts, x[sl], targets[sl])
            maps.append(m)
            logits.append(lg)
            chosen.append(t)
        return Attribution(maps=torch.cat(maps), logits=torch.cat(logits), targets=torch.cat(chosen))

    def chunk(
        self, ctx: RunContext, facts: Transformer, x: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(maps (n, gh, gw), logits (n, classes), targets (n,)) of one chunk of rows."""
        x = x.detach().requires_grad_(True)  # the parameters need no gradient: the input builds the graph
        with capture_attention(ctx.model) as rec, torch.enable_grad():
            logits = ctx.forward(x)
            targets = choose(logits.detach(), targets)
            relevance = self.relevance(ctx, rec, logits, targets)
        ctx.advance(int(x.shape[0]))
        return token_map(relevance, facts), logits.detach(), targets

    def relevance(self, ctx: RunContext, rec: Recording, logits: Tensor, targets: Tensor) -> Tensor:
        """(n, T, T) token relevance R from the captured pass."""
        raise NotImplementedError


def token_map(r: Tensor, facts: Transformer) -> Tensor:
    """The map of relevances R (n, T, T): the class token's row over the patch columns (row 0,
    columns after the prefix tokens) or, for a model that pools by the token mean, the mean of the
    patch rows over the patch columns; reshaped to the patch grid (n, gh, gw)."""
    p, (gh, gw) = facts.tokens.prefix_tokens, facts.tokens.grid
    row = r[:, 0, p:] if facts.pooling == "token" else r[:, p:, p:].mean(dim=1)
    return row.reshape(r.shape[0], gh, gw)


def fuse_heads(a: Tensor, how: HeadFusion) -> Tensor:
    """(n, heads, T, T) → (n, T, T): the mean, max or min over heads."""
    if how == "max":
        return a.amax(dim=1)
    if how == "min":
        return a.amin(dim=1)
    return a.mean(dim=1)


def discard_lowest(a: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ⌊ratio·(T−1)⌋ entries of each row of ``a`` (n, T, T) among columns 1…T−1
    (column 0, the class token's, is always kept)."""
    k = int(ratio * (a.shape[-1] - 1))
    if k <= 0:
        return a
    rest = a[..., 1:]
    lowest = rest.topk(k, dim=-1, largest=False).indices
    return torch.cat([a[..., :1], rest.scatter(-1, lowest, 0.0)], dim=-1)


def rollout(layers: list[Tensor]) -> Tensor:
    """R = Ā_L ⋯ Ā_1 of per-block (n, T, T) matrices, Ā_l ← rows of (Ā_l + I) / 2 renormalised to sum 1."""
    eye = torch.eye(layers[0].shape[-1], device=layers[0].device, dtype=layers[0].dtype)
    r = eye.expand_as(layers[0])
    for a in layers:
        a = (a + eye) / 2
        r = (a / a.sum(dim=-1, keepdim=True)) @ r
    return r


@register
class AttentionRollout(AttentionMethod):
    """Attention rollout (Abnar & Zuidema, ACL 2020, https://arxiv.org/abs/2005.00928).

    Ā_l = the heads of A_l fused (``head_fusion``: mean, max or min); with ``discard_ratio`` r > 0
    the lowest ⌊r·(T−1)⌋ entries of each row, column 0 excepted, are set to 0 (as in Gildenblat's
    widely used ``vit-explain``, which discards over the whole matrix instead of per row);
    Ā_l ← (Ā_l + I) / 2 with rows renormalised to sum 1 (the residual connection); R = Ā_L ⋯ Ā_1.
    The map is the class token's row of R over the patch tokens (the patch rows' mean for
    token-mean models). Class-agnostic: ``target`` only selects the reported score. One forward
    pass per image; no gradient is taken.
    """

    name = "attention_rollout"
    description = "Attention rollout: attention matrices with the residual, multiplied over the blocks."
    paper = "https://arxiv.org/abs/2005.00928"
    uses: ClassVar[frozenset[str]] = frozenset({"head_fusion", "discard_ratio", "batch_size", "precision"})
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "attention"})

    def chunk(
        self, ctx: RunContext, facts: Transformer, x: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        with capture_attention(ctx.model) as rec, torch.inference_mode():
            logits = ctx.forward(x)
            relevance = self.relevance(ctx, rec, logits, targets)
        ctx.advance(int(x.shape[0]))
        return token_map(relevance, facts).clone(), logits.clone(), choose(logits.clone(), targets)

    def relevance(self, ctx: RunContext, rec: Recording, logits: Tensor, targets: Tensor) -> Tensor:
        p = ctx.params
        return rollout(
            [discard_lowest(fuse_heads(a.float(), p.head_fusion), p.discard_ratio) for a in rec.attention]
        )


@register
class TransformerAttribution(AttentionMethod):
    """Transformer attribution (Chefer, Gur & Wolf, ICCV 2021, https://arxiv.org/abs/2103.15679),
    the self-attention rule of their eq. 13–14: R = I; for l = 1 … L: Ā_l = mean over heads of
    (∂y_t/∂A_l ⊙ A_l)⁺, R ← R + Ā_l R; y_t the target's logit. The map is the class token's row
    of R over the patch tokens (the patch rows' mean for token-mean models).

    Deviation: the paper's full method weights A_l by LRP relevances propagated through the whole
    network; like the authors' later generic rule (Chefer et al., ICCV 2021b) and common practice,
    the gradient-weighted attention alone is used, which needs no LRP rules for every layer. One
    forward + backward per (image, target), the backward stopping at the first block's attention.
    """

    name = "transformer_attribution"
    description = (
        "Transformer attribution: gradient-weighted attention, positive part, accumulated over blocks."
    )
    paper = "https://arxiv.org/abs/2103.15679"

    def relevance(self, ctx: RunContext, rec: Recording, logits: Tensor, targets: Tensor) -> Tensor:
        selected = logits.gather(1, targets.view(-1, 1)).sum()
        grads = torch.autograd.grad(selected, rec.attention)
        r: Tensor | None = None
        for a, g in zip(rec.attention, grads, strict=True):
            cam = (g.float() * a.detach().float()).clamp_min(0).mean(dim=1)
            if r is None:
                r = torch.eye(cam.shape[-1], device=cam.device).expand_as(cam)
            r = r + cam @ r
        assert r is not None
        return r


@register
class LeGrad(AttentionMethod):
    """LeGrad (Bousselham et al., 2024, https://arxiv.org/abs/2404.03214).

    For each block l of the last ``legrad_layers`` (unset or more than the model has: all):
    s_l = the target's logit from the model's own final norm, pooling and head applied to block
    l's output tokens; G_l = ReLU(∂s_l/∂A_l) averaged over heads and query tokens, prefix-token
    columns dropped; the map is the mean of G_l over those blocks (the paper min-max normalises
    it afterwards; the service's rendering normalises maps itself, so the raw mean is returned).
    One forward pass, then one backward per chosen block, each from s_l to A_l only.
    """

    name = "legrad"
    description = "LeGrad: gradients of each block's own prediction with respect to its attention, averaged."
    paper = "https://arxiv.org/abs/2404.03214"
    uses: ClassVar[frozenset[str]] = frozenset({"legrad_layers", "batch_size", "precision"})

    def passes(self, params: ExplainParams) -> int:
        """One forward, one backward per block (``NOMINAL_BLOCKS`` when all; ``attribute`` corrects it)."""
        return 1 + (params.legrad_layers or NOMINAL_BLOCKS)

    def cost(self, params: ExplainParams, handle: ModelHandle) -> int:
        """One forward, one backward per chosen block of this model."""
        blocks = len(attention_blocks(handle.module))
        return 1 + min(params.legrad_layers or blocks, blocks)

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        blocks = len(attention_blocks(ctx.model))
        chosen = min(ctx.params.legrad_layers or blocks, blocks)
        ctx.total_passes = ctx.done_passes + int(x.shape[0]) * (1 + chosen)
        return super().attribute(ctx, x, targets)

    def chunk(
        self, ctx: RunContext, facts: Transformer, x: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        p = facts.tokens.prefix_tokens
        pooled_head = head(ctx.model)
        with capture_attention(ctx.model, blocks=True) as rec, torch.enable_grad():
            logits = ctx.forward(x)
            targets = choose(logits.detach(), targets)
            count = len(rec.attention)
            chosen = range(count - min(ctx.params.legrad_layers or count, count), count)
            total: Tensor | None = None
            for i, block in enumerate(chosen):
                s = pooled_head(rec.blocks[block]).float().gather(1, targets.view(-1, 1)).sum()
                (g,) = torch.autograd.grad(s, rec.attention[block], retain_graph=i < len(chosen) - 1)
                layer = g.float().clamp_min(0).mean(dim=(1, 2))[:, p:]
                total = layer if total is None else total + layer
                ctx.advance(int(x.shape[0]))
        assert total is not None
        gh, gw = facts.tokens.grid
        ctx.advance(int(x.shape[0]))
        return (total / len(chosen)).reshape(-1, gh, gw), logits.detach(), targets
