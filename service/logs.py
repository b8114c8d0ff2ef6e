"""Logging of every process (API and Celery workers), configured once: ``json`` or ``text``.

``SALIENCY_LOG_FORMAT=json`` (the container image's default) writes one JSON object per line,
through python-json-logger's ``OrjsonFormatter`` on the standard ``logging`` module, so every logger
(ours, uvicorn's, Celery's) goes through the same handler without being rewritten. ``text`` (the
default for a terminal) writes ``time level logger: message``. Fields passed with ``extra=`` are
keys of the JSON object; in text they follow the message as ``key=value``.

uvicorn's own access log is switched off: the edge middleware (``service.api.middleware``) logs
each request once, on the ``saliency.access`` logger, with ``request_id``, ``route`` (the
template, not the path), ``model``, ``method``, ``status``, ``duration_ms``. What a log line may
carry is chosen by the code that logs it: never a header, a body or an API key (a request's
``principal`` is the key's digest, ``service.api.auth.principal_of``).
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Literal

from pythonjsonlogger.orjson import OrjsonFormatter

LogFormat = Literal["json", "text"]

ACCESS_LOGGER = "saliency.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# the JSON keys of every line besides ``time`` (then any ``extra`` fields)
JSON_FIELDS = ("levelname", "name", "message")
JSON_RENAMES = {"levelname": "level", "name": "logger"}
# loggers that install handlers of their own: theirs go, records propagate to the root's
THIRD_PARTY = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker")
# the attributes every ``LogRecord`` has: anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """``time level logger: message`` followed by the record's ``extra`` fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        fields = " ".join(f"{k}={v}" for k, v in extras.items() if v is not None)
        return f"{head} {fields}{sep}{tail}"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields ``extra=`` put on ``record``."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        # the orjson flavour (orjson is a dependency already): a little cheaper per line than the
        # stdlib json one (benchmarks/logging_cost.py)
        return OrjsonFormatter(
            list(JSON_FIELDS),
            rename_fields=dict(JSON_RENAMES),
            timestamp="time",  # ISO 8601, UTC
        )
    return TextFormatter()


def configure_logging(level: str, fmt: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of this process to one handler on ``stream`` (stderr) in ``fmt``.

    Replaces the root logger's handlers (idempotent: calling it again reconfigures), strips the
    handlers uvicorn and Celery install on their loggers so their records reach the root once,
    and turns uvicorn's access logger off (the edge middleware writes the request line)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        for old in list(lg.handlers):
            lg.removeHandler(old)
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return handler
