"""The model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018, §3, cascading randomisation).

On a *private deep copy* of the model, the parameterised blocks are re-initialised from the
output back to the input, one block at a time; after each, the method explains the same image
and target again, and ``spearman[i]`` is the rank correlation between the original map and the
map after randomising ``layers[0..i]``. A map that does not fall with it does not depend on what
the model learned. The served model is never touched: not its parameters, buffers, flags or hooks.

Blocks: the model's top-level children that hold parameters, in registration order (the order a
feed-forward classifier runs them), a lone wrapper descended into, and ``Sequential`` /
``ModuleList`` stages expanded one level (ResNet's ``layer4`` becomes ``layer4.1``, ``layer4.0``;
EfficientNet's ``blocks`` its stages): a handful to a few dozen, not every convolution.
Re-initialisation: each module's own ``reset_parameters`` (its constructor's initialisation;
BatchNorm back to the identity with fresh statistics), seeded; parameters of a module without
one are redrawn from a normal distribution of their own standard deviation.

Deviation from the paper: the rank correlation is on the raw map (the paper shows both the
absolute and the signed map); a map that is constant after randomisation (Grad-CAM whose ReLU
left nothing) correlates 0 with anything, not NaN.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from service.errors import InvalidParameter
from service.explainers import ExplainParams, ModelHandle, Targets, explain

CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class Sanity:
    layers: list[str]  # randomised blocks, output first
    spearman: list[float]  # after randomising layers[0..i]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parameterised blocks of ``module``, input to output (see the module docstring)."""
    prefix = ""
    children = [(n, c) for n, c in module.named_children() if _has_params(c)]
    while len(children) == 1 and any(True for _ in children[0][1].children()):
        name, only = children[0]
        prefix += name + "."
        children = [(n, c) for n, c in only.named_children() if _has_params(c)]
    out: list[tuple[str, nn.Module]] = []
    for name, child in children:
        if isinstance(child, nn.Sequential | nn.ModuleList):
            out.extend((f"{prefix}{name}.{n}", c) for n, c in child.named_children() if _has_params(c))
        else:
            out.append((prefix + name, child))
    return out


def block_count(module: nn.Module) -> int:
    """How many randomisation steps the check takes on ``module`` (its cost in explanations)."""
    if isinstance(module, torch.jit.ScriptModule):
        return 0
    return len(blocks(module))


def randomise(block: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``block`` in place, reproducibly from ``seed``."""
    devices = [p.device for p in block.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for m in block.modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            for p in own:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 else 0.01)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two maps (average ranks for ties); 0 when either is constant."""
    ra = _average_ranks(a.detach().double().flatten().cpu().numpy())
    rb = _average_ranks(b.detach().double().flatten().cpu().numpy())
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average (as ``scipy.stats.rankdata``)."""
    v = np.nan_to_num(v, nan=-np.inf)
    order = np.argsort(v, kind="stable")
    s = v[order]
    starts = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.nonzero(starts)[0], len(s)]
    average = 0.5 * (bounds[:-1] + bounds[1:] - 1) + 1.0
    out = np.empty(len(v), dtype=np.float64)
    out[order] = average[group]
    return out


def sanity(
    handle: ModelHandle,
    x: Tensor,
    method: str,
    params: ExplainParams,
    target: int,
    original: Tensor,
    *,
    seed: int,
    cancel: CancelFn | None = None,
) -> Sanity:
    """Cascading randomisation of a private copy for one image ``x`` (1, C, H, W) and ``target``;
    ``original``: the method's map on the served model (H, W), ``params`` as it ran (resolved)."""
    if isinstance(handle.module, torch.jit.ScriptModule) or handle.fresh is not None:
        raise InvalidParameter(
            f"the sanity check needs a private copy of the model's weights; model {handle.name!r} "
            "cannot be copied (TorchScript or torch.export)",
            field="metrics",
        )
    with handle.lock:  # nothing else changes the model meanwhile; the copy is ours alone
        private = copy.deepcopy(handle.module).eval()
    twin = handle.twin(private, f"{handle.name} (randomised)")
    targets = Targets.given([[target]])
    names: list[str] = []
    rho: list[float] = []
    for i, (name, block) in enumerate(reversed(blocks(private))):
        randomise(block, seed + i)
        twin.drop_copies()  # the next explanation copies the model as randomised so far
        m = explain(twin, x, method, params, targets=targets, cancel=cancel).maps[0, 0]
        names.append(name)
        rho.append(round(spearman(original, m), 6))
    return Sanity(layers=names, spearman=rho)
