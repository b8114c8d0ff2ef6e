"""The evaluation's picture: the deletion and insertion curves of every method and of the random
map, the AUCs in the legend (``POST /v1/models/{model}/evaluate`` with ``format=png``).

Drawn with matplotlib's object API on an Agg canvas (no pyplot: no global figure state, safe in
worker threads). The picture's size is fixed (``WIDTH_IN`` × ``HEIGHT_IN`` at ``DPI``), so its
bytes are bounded whatever the request: ``MAX_PNG_BYTES``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 4.2, 100
#: RGBA pixels of the canvas: an upper bound of its PNG
MAX_PNG_BYTES = int(WIDTH_IN * DPI) * int(HEIGHT_IN * DPI) * 4 + 4096


def curves_png(
    curves: Sequence[tuple[str, dict[str, list[float]], dict[str, float]]],
    random: dict[str, list[float]],
    random_aucs: dict[str, float],
    *,
    title: str,
) -> bytes:
    """``curves``: (method, its curves by kind, its AUCs by kind); one panel per kind."""
    kinds = [k for k in ("deletion", "insertion") if k in random]
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=False):
        for method, values, aucs in curves:
            xs = [k / (len(values[kind]) - 1) for k in range(len(values[kind]))]
            ax.plot(xs, values[kind], linewidth=1.6, label=f"{method} (AUC {aucs[kind]:.3f})")
        xs = [k / (len(random[kind]) - 1) for k in range(len(random[kind]))]
        ax.plot(xs, random[kind], "k--", linewidth=1.2, label=f"random map (AUC {random_aucs[kind]:.3f})")
        verb = "deleted" if kind == "deletion" else "inserted"
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} is better)")
        ax.set_xlabel(f"fraction of pixels {verb}")
        ax.set_ylabel("target probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
