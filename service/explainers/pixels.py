"""The pixel image behind a model input.

The engine receives normalised inputs x = (p − mean) / std, p the pixel image in [0, 1] (the
registry's preprocessing, ``ModelHandle.mean``/``std``). Methods defined on pixels (Blur IG blurs
them, Guided IG walks from black along them, XRAI segments them) convert with the handle's
statistics. A model configured without them has the registry's default (ImageNet's); one that
takes raw [0, 1] inputs is configured with mean 0 and std 1, where p = x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.explainers.base import ModelHandle


def pixel_stats(handle: ModelHandle, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The handle's mean and std, each shaped (C, 1, 1), float32 on ``device`` (one value: every channel)."""
    mean = torch.tensor(handle.mean, dtype=torch.float32, device=device)
    std = torch.tensor(handle.std, dtype=torch.float32, device=device)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


def to_pixels(x: Tensor, handle: ModelHandle) -> Tensor:
    """p = x · std + mean of (M, C, H, W) normalised inputs."""
    mean, std = pixel_stats(handle, x.shape[1], x.device)
    return x * std.to(x.dtype) + mean.to(x.dtype)


def to_input(p: Tensor, handle: ModelHandle) -> Tensor:
    """x = (p − mean) / std of (M, C, H, W) pixel images."""
    mean, std = pixel_stats(handle, p.shape[1], p.device)
    return (p - mean.to(p.dtype)) / std.to(p.dtype)
