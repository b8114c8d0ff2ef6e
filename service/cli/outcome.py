"""What explaining one file came to, whichever way it ran."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

from service.cli.inputs import Source

T = TypeVar("T")

#: reports how many images are done (fractions while a job runs)
Report = Callable[[float], None]


@dataclass
class Outcome:
    """One file: the output's bytes and the class explained, or why it failed (one line)."""

    source: Source
    data: bytes | None = None
    target: str | None = None
    reason: str | None = None
    written: Path | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def target_text(index: int, label: str, score: float) -> str:
    return f"{label} ({index}) p={score:.3f}"


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk
