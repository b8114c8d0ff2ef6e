"""Shared fixtures. Tests get the marker of the folder they live in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import service  # noqa: F401  (sets MKL_CBWR before torch's first computation)

ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if folder in {"unit", "api", "integration"}:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
