"""The ``saliency`` command line: ``serve``, ``openapi``, ``worker``, ``explain``, ``models``, ``layers``.

Settings come from the ``SALIENCY_*`` environment (``service.config.Settings``); ``serve``'s
``--host``/``--port`` override ``SALIENCY_HOST``/``SALIENCY_PORT``. ``explain``, ``models`` and
``layers`` run in this process (models loaded from the settings), or with ``--url`` against a
running service (``service.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from service.config import Settings, get_settings
from service.errors import SaliencyError
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


def _explain(settings: Settings, args: argparse.Namespace) -> int:
    from service.cli.explain import run

    if args.model is None:
        args.model = _first_model(settings, args)
    return run(settings, args)


def _first_model(settings: Settings, args: argparse.Namespace) -> str:
    """``--model`` left out: the first model configured (here, or on the service at ``--url``)."""
    if args.url:
        from service.cli.remote import connect

        with connect(args) as client:
            return client.models()[0].name
    from service.models.registry import DEFAULT_MODEL
    from service.models.spec import load_config

    if settings.models_config is None:
        return DEFAULT_MODEL
    return load_config(settings.models_config)[0].name


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from service.cli.tables import show_models

    return show_models(settings, args)


def _layers(settings: Settings, args: argparse.Namespace) -> int:
    from service.cli.tables import show_layers

    return show_layers(settings, args)


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("through a running service (default: in this process)")
    group.add_argument("--url", help="the service's base URL, e.g. http://127.0.0.1:8000")
    group.add_argument("--api-key", help="the API key (sent as Authorization: Bearer)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")


def build_parser(knobs: bool = True) -> argparse.ArgumentParser:
    """The parser. ``knobs``: give ``explain`` an option per request parameter (this imports the
    engine, and with it torch: ``main`` asks for them only when the command is ``explain``, so
    that ``serve`` still sets its thread settings before torch loads)."""
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

    explain = sub.add_parser(
        "explain",
        help="explain image files or folders of images, writing one output per image",
        description="Explain each image (folders: their images, recursively) and write the result under "
        "--out as NAME.METHOD.png (.overlay.png, .json, .npy). Without --url the engine runs in this "
        "process, on the models of SALIENCY_MODELS_CONFIG; with --url the service does the work (more "
        "than --job-threshold images go as jobs). Exit status: 0 all written, 1 some files failed "
        "(one line each on stderr), 2 nothing could run.",
    )
    explain.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    explain.add_argument("--model", help="model name (default: the first configured)")
    explain.add_argument("--method", default="gradcam", help="attribution method (default gradcam)")
    explain.add_argument(
        "--format", choices=["png", "overlay", "json", "npy"], default="png", help="output (default png)"
    )
    explain.add_argument("--out", default="saliency-out", help="output folder (default ./saliency-out)")
    explain.add_argument("--target", type=int, help="class index (default: the top-1 predicted class)")
    explain.add_argument("--top-k", dest="top_k", type=int, help="explain the k best classes")
    _remote_arguments(explain)
    explain.add_argument(
        "--job-threshold",
        type=_count(0),
        default=16,
        help="with --url: more images than this go as jobs (default 16)",
    )
    explain.add_argument(
        "--job-size", type=_count(1), default=64, help="with --url: images per job (default 64)"
    )
    if knobs:
        from service.cli.params import add_knob_arguments

        add_knob_arguments(explain)
    explain.set_defaults(func=_explain)

    models = sub.add_parser("models", help="list the models (a table)")
    _remote_arguments(models)
    models.set_defaults(func=_models)

    layers = sub.add_parser("layers", help="list the layers CAM methods can use on a model (a table)")
    layers.add_argument("model", help="model name")
    _remote_arguments(layers)
    layers.set_defaults(func=_layers)
    return parser


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}")
        return value

    return parse


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is no option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(knobs=_command(words) == "explain")
    args, unknown = parser.parse_known_args(words)
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
    except SaliencyError as exc:  # a broken config, an unknown model…
        print(f"saliency: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = _remote_failure(exc)
        if reason is None:
            raise
        print(f"saliency: {getattr(args, 'url', '')}: {reason}", file=sys.stderr)
        return 2


def _remote_failure(exc: Exception) -> str | None:
    """One line for an error of the service at ``--url`` (or of reaching it); ``None`` for others."""
    if "saliency_client" not in sys.modules:
        return None
    import httpx
    from saliency_client import SaliencyClientError

    from service.cli.remote import describe

    return describe(exc) if isinstance(exc, SaliencyClientError | httpx.HTTPError) else None


if __name__ == "__main__":
    raise SystemExit(main())
