"""What the per-request log line costs: the edge middleware around a trivial ASGI app, with the
request line off, in ``text``, in ``json`` (python-json-logger's orjson formatter, what the service
uses), with python-json-logger's stdlib-json formatter, and in JSON written by a hand-made orjson
formatter (the floor a formatter could reach), side by side
in one process. The handler writes to ``os.devnull``. Prints µs per request and the ratio to
"off".

    .venv/bin/python benchmarks/logging_cost.py                   # 20 000 requests per variant
    .venv/bin/python benchmarks/logging_cost.py --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from typing import Any

import orjson
from pythonjsonlogger.json import JsonFormatter

from service.api.middleware import EdgeMiddleware
from service.logs import ACCESS_LOGGER, JSON_FIELDS, JSON_RENAMES, configure_logging, extra_fields
from service.metrics import Metrics


class OrjsonFormatter(logging.Formatter):
    """The floor: the record's fields straight to orjson, no configuration."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        return orjson.dumps(body).decode()


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def requests(n: int) -> float:
    edge = EdgeMiddleware(app, max_body_bytes=lambda _s: 1 << 20, metrics=Metrics())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Any) -> None:
        return None

    started = time.perf_counter()
    for _ in range(n):
        scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [], "state": {}}
        await edge(scope, receive, send)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per variant")
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        variants: dict[str, Any] = {
            "off": None,
            "text": "text",
            "json": "json",
            "json (stdlib)": "stdlib",
            "orjson floor": "orjson",
        }
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
            for name, fmt in variants.items():
                handler = configure_logging("info", "text" if fmt == "text" else "json", sink)
                if fmt == "orjson":
                    handler.setFormatter(OrjsonFormatter())
                elif fmt == "stdlib":
                    handler.setFormatter(
                        JsonFormatter(list(JSON_FIELDS), rename_fields=dict(JSON_RENAMES), timestamp="time")
                    )
                logging.getLogger(ACCESS_LOGGER).disabled = fmt is None
                seconds = asyncio.run(requests(args.requests))
                best[name] = min(best.get(name, float("inf")), seconds)
        logging.getLogger(ACCESS_LOGGER).disabled = False
    base = best["off"]
    print(f"{args.requests} requests through the edge middleware, best of {args.rounds}")
    print(f"{'variant':<15}{'µs/request':>12}{'vs off':>9}")
    for name, seconds in best.items():
        print(f"{name:<15}{seconds / args.requests * 1e6:>12.1f}{seconds / base:>8.2f}×")


if __name__ == "__main__":
    main()
