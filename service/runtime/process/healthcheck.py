"""Container health checks: ``python -m service.runtime.process.healthcheck api|worker``.

- ``api``: ``GET /readyz`` on the local server answers 200 (models loaded and warmed up).
- ``worker``: this host's Celery worker (``saliency@<hostname>``) answers a ping over the broker.

Exit status 0 when healthy, 1 otherwise (what Docker's ``HEALTHCHECK`` and compose expect).
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from service.config import Settings, get_settings


def check_api(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def check_worker(settings: Settings, node: str, timeout: float) -> tuple[bool, str]:
    from service.runtime.jobs.celery_app import make_celery

    app = make_celery(settings)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    except Exception as exc:
        return False, f"broker unavailable: {exc!r}"
    finally:
        app.close()
    ok = any(node in reply for reply in replies)
    return ok, f"{node}: {'pong' if ok else 'no reply'}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.runtime.process.healthcheck", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    api = sub.add_parser("api", help="GET /readyz answers 200")
    api.add_argument("--url", help="default: http://127.0.0.1:$SALIENCY_PORT/readyz")
    api.add_argument("--timeout", type=float, default=5.0)
    worker = sub.add_parser("worker", help="the Celery worker on this host answers a ping")
    worker.add_argument("--node", help="default: saliency@<hostname>")
    worker.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    settings = get_settings()
    if args.what == "api":
        ok, message = check_api(args.url or f"http://127.0.0.1:{settings.port}/readyz", args.timeout)
    else:
        ok, message = check_worker(settings, args.node or f"saliency@{socket.gethostname()}", args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
