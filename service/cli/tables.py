"""``saliency models`` and ``saliency layers MODEL``: what ``GET /v1/models`` and
``GET /v1/models/{model}/layers`` answer, as tables, from this process or from ``--url``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from service.cli.progress import table


def models_table(infos: Sequence[dict[str, Any]]) -> Table:
    rows = []
    for m in infos:
        error = m.get("error") or {}
        rows.append(
            [
                m["name"],
                m.get("source"),
                m.get("architecture"),
                m.get("num_classes"),
                "×".join(str(v) for v in m.get("input_size") or []),
                m.get("device"),
                m.get("target_layer"),
                len(m.get("methods") or []),
                "yes" if m.get("ready") else f"no: {error.get('detail', '')}".rstrip(": "),
            ]
        )
    columns = [
        "name",
        "source",
        "architecture",
        "classes",
        "input",
        "device",
        "target layer",
        "methods",
        "ready",
    ]
    return table("models", columns, rows)


def layers_table(model: str, layers: Sequence[dict[str, Any]]) -> Table:
    rows = [
        [
            layer["name"],
            layer.get("type"),
            layer.get("layout"),
            "×".join(str(v) for v in layer.get("shape") or []),
            layer.get("prefix_tokens", 0),
            "default" if layer.get("default") else "",
        ]
        for layer in layers
    ]
    return table(
        f"layers of {model}", ["name", "type", "layout", "shape [C, h, w]", "prefix tokens", ""], rows
    )
