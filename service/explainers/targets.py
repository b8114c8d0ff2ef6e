"""Which classes an explanation is for: one ``Targets`` value from the edge to the engine.

A request names explicit classes or asks for each image's ``top_k`` predicted classes. The API
and the job service build the value once (``Targets.resolve``), checking it against the model's
class count there; it then travels unchanged through the executor, the batcher (``select``,
``concat``) and jobs (``as_dict`` / ``from_dict`` in the job spec) to ``engine.explain``.

Inside the engine the targets of a flat batch of (image, target) pairs are a tensor of class
indices in which ``PREDICTED`` marks a row whose class the method's own clean pass chooses (its
top-1 class): ``choose`` does that, and range-checks the explicit ones against the logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.errors import InvalidParameter, TargetOutOfRange

#: a row target that the method's clean pass replaces with the row's top-1 predicted class
PREDICTED = -1


@dataclass(frozen=True)
class Targets:
    """Explicit classes for each image (``classes``, one row of K per image), or each image's
    ``top_k`` best predicted classes (``classes`` is ``None``)."""

    top_k: int = 1
    classes: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.classes is None and self.top_k < 1:
            raise InvalidParameter(f"top_k must be ≥ 1 (got {self.top_k})", field="top_k")
        if self.classes is not None:
            widths = {len(row) for row in self.classes}
            if len(widths) > 1 or widths == {0}:
                raise InvalidParameter(
                    "give the same number (≥ 1) of targets for every image", field="target"
                )
            negative = [c for row in self.classes for c in row if c < 0]
            if negative:
                raise TargetOutOfRange(f"target {negative[0]} is negative", field="target")

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def top(cls, k: int = 1) -> Targets:
        """Each image's ``k`` best predicted classes."""
        return cls(top_k=k)

    @classmethod
    def given(cls, rows: Sequence[Sequence[int]] | Sequence[int] | Tensor) -> Targets:
        """Explicit classes: one row per image (a flat sequence: one class per image)."""
        try:
            t = torch.as_tensor(rows, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidParameter(
                "give the same number (≥ 1) of targets for every image", field="target"
            ) from None
        if t.dim() == 1:
            t = t.view(-1, 1)
        if t.dim() != 2 or t.shape[1] < 1:
            raise InvalidParameter("give one or more targets for each image", field="target")
        return cls(top_k=1, classes=tuple(tuple(int(c) for c in row) for row in t.tolist()))

    @classmethod
    def resolve(cls, *, target: int | None, top_k: int, images: int, num_classes: int) -> Targets:
        """A request's targets (the same class for every image, or the top k), checked against
        the model's ``num_classes``: the one place a request's targets are range-checked."""
        targets = cls.top(top_k) if target is None else cls.given([[target]] * images)
        return targets.check(num_classes)

    # --- facts ---------------------------------------------------------------------------------
    @property
    def explicit(self) -> bool:
        return self.classes is not None

    @property
    def per_image(self) -> int:
        """K: targets explained per image."""
        return self.top_k if self.classes is None else len(self.classes[0])

    @property
    def kind(self) -> tuple[str, int]:
        """What two requests must share to be batched together: top-k with the same k, or
        explicit targets with the same count per image."""
        return ("explicit", self.per_image) if self.explicit else ("top", self.top_k)

    def check(self, num_classes: int) -> Targets:
        """``InvalidParameter`` for a ``top_k`` above ``num_classes``; ``TargetOutOfRange`` for a
        class outside ``[0, num_classes)``. Returns ``self``."""
        if self.classes is None:
            if self.top_k > num_classes:
                raise InvalidParameter(
                    f"top_k must be in [1, {num_classes}] (got {self.top_k})", field="top_k"
                )
            return self
        check_range(torch.tensor(self.classes, dtype=torch.int64), num_classes)
        return self

    def check_images(self, n: int) -> None:
        """``InvalidParameter`` unless explicit targets have one row for each of ``n`` images."""
        if self.classes is not None and len(self.classes) != n:
            raise InvalidParameter(f"need one or more targets for each of the {n} images", field="target")

    # --- the batcher's and the job runner's cuts -----------------------------------------------
    def select(self, rows: slice) -> Targets:
        """The targets of a contiguous range of images."""
        return self if self.classes is None else Targets(classes=self.classes[rows])

    @classmethod
    def concat(cls, parts: Iterable[Targets]) -> Targets:
        """The targets of consecutive groups of images, all of one ``kind``."""
        parts = list(parts)
        if parts[0].classes is None:
            return parts[0]
        return cls(classes=tuple(row for p in parts for row in p.classes or ()))

    # --- forms ---------------------------------------------------------------------------------
    def rows(self, n: int) -> Tensor:
        """(n, K) int64 for the engine: the explicit classes, or ``PREDICTED`` (top-1 only)."""
        self.check_images(n)
        if self.classes is None:
            if self.top_k != 1:
                raise ValueError("top-k targets are chosen from the logits (choose_top_k)")
            return torch.full((n, 1), PREDICTED, dtype=torch.int64)
        return torch.tensor(self.classes, dtype=torch.int64)

    def echo(self) -> dict[str, Any]:
        """``target`` and ``top_k`` as the request's ``parameters`` echo them."""
        if self.classes is None:
            return {"target": None, "top_k": self.top_k}
        first = self.classes[0]
        return {"target": first[0] if len(first) == 1 else list(first), "top_k": 1}

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in a job spec."""
        return {
            "top_k": self.top_k,
            "classes": None if self.classes is None else [list(r) for r in self.classes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Targets:
        classes = data.get("classes")
        if classes is None:
            return cls.top(int(data["top_k"]))
        return cls.given(classes)


def choose(logits: Tensor, targets: Tensor) -> Tensor:
    """The targets of clean rows, given their logits (M, classes): ``PREDICTED`` rows get their
    top-1 class; explicit ones are range-checked (``TargetOutOfRange``)."""
    predicted = targets == PREDICTED
    if bool(predicted.all()):
        return logits.argmax(dim=1)
    check_range(targets[~predicted], logits.shape[1])
    if bool(predicted.any()):
        return torch.where(predicted, logits.argmax(dim=1), targets)
    return targets


def choose_top_k(logits: Tensor, targets: Targets) -> Tensor:
    """(N, K) targets from the logits (N, classes) of an engine's separate scoring pass."""
    n, num_classes = logits.shape
    if targets.classes is None:
        targets.check(num_classes)
        return logits.topk(targets.top_k, dim=1).indices
    rows = targets.rows(n).to(logits.device)
    check_range(rows, num_classes)
    return rows


def check_range(targets: Tensor, num_classes: int) -> None:
    """``TargetOutOfRange`` unless every class index is in ``[0, num_classes)``."""
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        raise TargetOutOfRange(f"target {int(targets[bad][0])} is outside [0, {num_classes})", field="target")
