"""Eigen-CAM: the first principal component of the target layer's activations."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from service.explainers.base import Attribution, Method, Need, RunContext, register
from service.explainers.cam import distinct_images
from service.explainers.figures import CAM_HEATMAP
from service.explainers.hooks import capture


@register
class EigenCam(Method):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, https://arxiv.org/abs/2008.00299).

    The activations A (C, h, w) are read as h·w observations of C features; the map is their
    projection onto the first right-singular vector v₁ of that matrix, map = ReLU(Ã v₁) at layer
    resolution. Class-agnostic: every target of an image gets the same map (computed once).
    Forward passes only.

    Where the paper leaves it open we follow pytorch-grad-cam and say so: the observations are
    centred (each channel's spatial mean subtracted: a principal component, as the name says) and
    the projection is ReLU'd. The sign of a singular vector is arbitrary (pytorch-grad-cam keeps
    whatever LAPACK returns); here it is fixed: v₁ is oriented so its loadings sum to ≥ 0, which
    is the same as making the map correlate positively with the total activation Σ_k A_k.

    Shown by default as the paper's figures: the map in jet over the photo, min–max scaled.
    """

    name = "eigencam"
    family = "cam"
    description = "Eigen-CAM: activations projected on their first principal component (class-agnostic)."
    paper = "https://arxiv.org/abs/2008.00299"
    uses: ClassVar[frozenset[str]] = frozenset({"layer", "batch_size", "precision"})
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "layer"})
    rendering = CAM_HEATMAP

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        assert ctx.layer is not None
        images, image_of = distinct_images(x)
        maps: list[Tensor] = []
        for sl in ctx.chunks(images.shape[0]):
            with capture(ctx.model, ctx.layer) as cap, torch.inference_mode():
                ctx.forward(images[sl])
                act = ctx.as_map(cap.get()).float()
            maps.append(first_component(act))
            ctx.advance(sl.stop - sl.start)
        ctx.advance(x.shape[0] - images.shape[0])  # the targets that shared an image's pass
        return Attribution(maps=torch.cat(maps)[image_of])


def first_component(act: Tensor) -> Tensor:
    """(n, C, h, w) activations → (n, h, w) ReLU'd projection on the oriented first principal axis."""
    n, c, h, w = act.shape
    obs = act.reshape(n, c, h * w).transpose(1, 2)  # (n, h·w, C)
    obs = obs - obs.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(obs, full_matrices=False)
    v = vh[:, 0, :]  # (n, C)
    v = torch.where(v.sum(dim=1, keepdim=True) < 0, -v, v)
    return torch.relu(torch.einsum("npc,nc->np", obs, v)).reshape(n, h, w)
