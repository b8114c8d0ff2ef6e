"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis for the module's tests (the CI's, or one started for them; see ``redis_server``)."""
    with redis_server() as url:
        yield url
