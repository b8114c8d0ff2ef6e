"""The ``saliency`` command line: ``serve``, ``openapi``, ``worker``.

Settings come from the ``SALIENCY_*`` environment (``service.config.Settings``); ``serve``'s
``--host``/``--port`` override ``SALIENCY_HOST``/``SALIENCY_PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from service.config import Settings, get_settings
from service.errors import ConfigError
from service.logs import configure_logging

# OpenMP threads that sleep when idle instead of spinning: a web process also decodes and renders
# on other threads, and spinning torch threads starve them (measured on a busy 2-core machine:
# concurrency-8 throughput 0.7× → 1.25× of concurrency 1). Set before torch loads; an explicit
# OMP_WAIT_POLICY in the environment wins.
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _retain_heap(settings: Settings) -> None:
    """Process-wide allocator setting of the serving processes (not of tests or library use)."""
    if settings.retain_heap:
        from service.runtime.process.heap import retain_freed_memory

        retain_freed_memory()


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import uvicorn

    from service.app import create_app
    from service.models.spec import load_config

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    if settings.models_config is not None:
        load_config(settings.models_config)  # a broken config fails here, before the server starts
    _retain_heap(settings)
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **uvicorn_options(settings))
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options besides the address: its log records go through ``configure_logging``'s
    handler, and its access log is off (the edge middleware logs every request once)."""
    return {
        "log_level": settings.log_level,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 5,
    }


def _openapi(settings: Settings, args: argparse.Namespace) -> int:
    from service.app import create_app

    spec = create_app(settings).openapi()
    sys.stdout.write(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    _retain_heap(settings)
    from service.runtime.jobs.celery_app import run_worker

    result = run_worker(settings, list(args.worker_args))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliency", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument("--host", help="listen address (default: SALIENCY_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: SALIENCY_PORT or 8000)")
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="kept for compatibility: every request is logged once anyway (SALIENCY_LOG_FORMAT)",
    )
    serve.set_defaults(func=_serve)

    openapi = sub.add_parser("openapi", help="print the OpenAPI document (JSON) to stdout")
    openapi.set_defaults(func=_openapi)

    worker = sub.add_parser("worker", help="run a Celery worker for jobs (SALIENCY_JOBS_BACKEND=celery)")
    worker.add_argument("worker_args", nargs=argparse.REMAINDER, help="passed on to the Celery worker")
    worker.set_defaults(func=_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `saliency worker --pool threads`: options for Celery, which REMAINDER misses
        if args.command != "worker":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.worker_args = [*unknown, *args.worker_args]
    try:
        settings = get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SALIENCY_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"saliency: invalid settings: {problems}", file=sys.stderr)
        return 2
    try:
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"saliency: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
