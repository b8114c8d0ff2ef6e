"""Fixtures for tests through the HTTP interface.

The test models are a randomly initialised torchvision ResNet-18 with 10 classes at 3×64×64,
registered through a real TOML config file (weights saved as a state_dict, labels from a text
file): ``tiny`` (stretch) and ``tiny_crop`` (center_crop), sharing the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import encode, make_settings, sample_image, wait_ready, write_tiny_config
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def app(tiny_config: Path) -> FastAPI:
    return create_app(make_settings(tiny_config))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return encode(sample_image())
