"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis for the module's tests (the CI's, or one started for them; see ``redis_server``)."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real uvicorn server on 127.0.0.1 (in a thread of this process) serving ``tiny`` (a random
    ResNet-18 at 32×32, see ``jobs_helpers``) with the local job backend and the API key
    ``CLIENT_TEST_KEY``; its base URL and the models config. Shared by the client and CLI tests."""
    from client_helpers import CLIENT_TEST_KEY, live_server
    from jobs_helpers import write_tiny_config

    from service.app import create_app
    from service.config import Settings

    config = write_tiny_config(tmp_path_factory.mktemp("tiny-service"))
    settings = Settings(
        models_config=config,
        device="cpu",
        warmup=False,
        torch_threads=1,
        api_keys=CLIENT_TEST_KEY,
        jobs_backend="local",
    )
    with live_server(create_app(settings)) as url:
        yield url, config
