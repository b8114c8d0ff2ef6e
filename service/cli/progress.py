"""The terminal side: a progress bar with images/s and ETA, tables (``rich``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    """Images per second, as rich estimates the task's speed."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("– img/s" if speed is None else f"{speed:.2f} img/s", style="progress.data.speed")


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, header: bool = True
) -> Table:
    """A table whose cells wrap rather than being cut (names stay whole in narrow terminals)."""
    t = Table(title=title, title_justify="left", show_header=header)
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def show(t: Table) -> None:
    """Print ``t`` to stdout: wrapped to a terminal's width; piped, as wide as it needs."""
    console = Console()
    if not console.is_terminal:
        needed = Console(width=10_000).measure(t).maximum
        console = Console(width=max(console.width, needed))
    console.print(t)
