"""``saliency models`` and ``saliency layers MODEL``: what ``GET /v1/models`` and
``GET /v1/models/{model}/layers`` answer, as tables, from this process or from ``--url``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from service.cli.progress import show, table
from service.config import Settings


def show_models(settings: Settings, args: argparse.Namespace) -> int:
    """``saliency models``: the models here (all loaded from the settings) or at ``--url``."""
    if args.url:
        from service.cli.remote import connect

        with connect(args) as client:
            infos = [m.raw for m in client.models()]
    else:
        from service.models.registry import ModelRegistry

        infos = ModelRegistry.from_settings(settings).infos()
    show(models_table(infos))
    return 0


def show_layers(settings: Settings, args: argparse.Namespace) -> int:
    """``saliency layers MODEL``: its layers here (only it loaded) or at ``--url``."""
    if args.url:
        from service.cli.remote import connect

        with connect(args) as client:
            layers = [layer.raw for layer in client.layers(args.model)]
    else:
        from service.models.registry import ModelRegistry

        layers = ModelRegistry.from_settings(settings, only=[args.model]).get(args.model).layers()
    show(layers_table(args.model, layers))
    return 0


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
