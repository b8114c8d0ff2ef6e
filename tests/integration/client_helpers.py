"""Helpers of the client and CLI tests: a real uvicorn server on 127.0.0.1, in a thread of the test
process (torch is imported once), serving the tiny test model of ``jobs_helpers``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx
import uvicorn
from helpers import free_port, until
from starlette.types import ASGIApp

CLIENT_TEST_KEY = "client-test-key-0123456789"


@contextlib.contextmanager
def live_server(app: ASGIApp, *, ready_path: str | None = "/readyz") -> Iterator[str]:
    """``app`` served by uvicorn at a free port of 127.0.0.1 until the block ends; the base URL.
    Waits (bounded) until ``ready_path`` answers 200; stops the server and its thread after."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert thread.is_alive(), "the test server exited"
        if not server.started:
            return False
        if ready_path is None:
            return True
        try:
            return httpx.get(base + ready_path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        until(ready, "the test server to be ready", timeout=120, every=0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
