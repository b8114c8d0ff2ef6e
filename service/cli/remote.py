"""``saliency explain --url``: through the service, with ``saliency_client``.

A few images are explained one request each; more than ``job_threshold`` go as jobs of at most
``job_size`` images, polled with progress, then fetched image by image (PNG, overlay, npy) or
at once (JSON, split by ``image_index``). A job refused for one of its images (the server names
it: ``images.<i>``) is submitted again without it, that file reported failed.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
from saliency_client import Client, ExplainResult, JobFailed, ProblemError, SaliencyClientError

from service.cli.inputs import Source
from service.cli.outcome import Outcome, Report, target_text

_IMAGE_FIELD = re.compile(r"^images\.(\d+)$")


def connect(args: argparse.Namespace) -> Client:
    """The client of ``--url``, ``--api-key`` and ``--timeout``."""
    return Client(args.url, api_key=args.api_key, timeout=args.timeout)


def describe(exc: Exception) -> str:
    """One line saying why a request failed."""
    if isinstance(exc, ProblemError):
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in exc.errors)
        return f"{exc.status} {exc.detail}" + (f" ({fields})" if fields and fields not in exc.detail else "")
    if isinstance(exc, JobFailed):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


#: problem types of a request, not of its image: every file would get them, so the run stops
REQUEST_PROBLEMS = frozenset(
    {
        "invalid-parameter",
        "unknown-method",
        "unknown-layer",
        "method-not-applicable",
        "target-out-of-range",
        "too-heavy",
        "unknown-model",
        "unauthorized",
        "not-acceptable",
    }
)


def about_the_request(exc: ProblemError) -> bool:
    """The service refused the request itself (parameters, model, key), not one image of it."""
    if exc.status in (401, 403):
        return True
    fields = [str(e.get("field", "")) for e in exc.errors]
    return exc.code in REQUEST_PROBLEMS and not any(f == "image" or f.startswith("images") for f in fields)


class RemoteRunner:
    """Explains files with one model and method on the service at the client's URL."""

    def __init__(
        self,
        client: Client,
        model: str,
        method: str,
        fmt: str,
        params: dict[str, Any],
        *,
        job_threshold: int = 16,
        job_size: int = 64,
        poll_interval: float | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.method = method
        self.fmt = fmt
        self.params = params
        self.job_threshold = job_threshold
        self.job_size = job_size
        self.poll_interval = poll_interval
        client.model(model)  # unknown model, wrong key, unreachable: fail before any file

    def run(self, sources: list[Source], report: Report) -> Iterator[Outcome]:
        if len(sources) <= self.job_threshold:
            for source in sources:
                yield self._one(source)
            return
        done = 0
        for start in range(0, len(sources), self.job_size):
            chunk = sources[start : start + self.job_size]
            yield from self._job(chunk, report, done)
            done += len(chunk)

    # --------------------------------------------------------------------------------------------
    def _one(self, source: Source) -> Outcome:
        """One file, one request. A refusal of the request itself (``about_the_request``) is
        raised: it ends the run."""
        try:
            data = source.path.read_bytes()
            r = self.client.explain(self.model, data, method=self.method, format=self.fmt, **self.params)
        except ProblemError as exc:
            if about_the_request(exc):
                raise
            return Outcome(source, reason=describe(exc))
        except (SaliencyClientError, httpx.HTTPError, OSError) as exc:
            return Outcome(source, reason=describe(exc))
        return Outcome(source, data=self._bytes(r), target=_target(r))

    def _bytes(self, r: ExplainResult) -> bytes:
        if r.format == "json":
            return json.dumps(r.raw, separators=(",", ":")).encode()
        if r.format == "npy":
            assert r.array is not None
            buf = io.BytesIO()
            np.save(buf, r.array, allow_pickle=False)
            return buf.getvalue()
        assert r.image is not None
        return r.image

    def _job(self, chunk: list[Source], report: Report, done: int) -> Iterator[Outcome]:
        pending: list[tuple[Source, bytes]] = []
        for source in chunk:
            try:
                pending.append((source, source.path.read_bytes()))
            except OSError as exc:
                yield Outcome(source, reason=describe(exc))
        while pending:
            try:
                job = self.client.submit_job(
                    self.model, [d for _, d in pending], method=self.method, format=self.fmt, **self.params
                )
                break
            except ProblemError as exc:
                bad = {int(m.group(1)) for e in exc.errors if (m := _IMAGE_FIELD.match(str(e.get("field"))))}
                bad &= set(range(len(pending)))
                if not bad and about_the_request(exc):
                    raise
                if not bad:
                    for source, _ in pending:
                        yield Outcome(source, reason=describe(exc))
                    return
                for i in sorted(bad):
                    message = next(
                        str(e.get("message")) for e in exc.errors if e.get("field") == f"images.{i}"
                    )
                    yield Outcome(pending[i][0], reason=f"{exc.status} {message}")
                pending = [p for i, p in enumerate(pending) if i not in bad]
            except (SaliencyClientError, httpx.HTTPError) as exc:
                for source, _ in pending:
                    yield Outcome(source, reason=describe(exc))
                return
        else:
            return
        sources = [s for s, _ in pending]
        try:
            job = self.client.wait(
                job,
                progress=lambda j: report(done + j.progress * len(sources)),
                poll_interval=self.poll_interval,
            )
        except (SaliencyClientError, httpx.HTTPError) as exc:
            for source in sources:
                yield Outcome(source, reason=describe(exc))
            return
        yield from self._results(job.id, sources)

    def _results(self, job_id: str, sources: list[Source]) -> Iterator[Outcome]:
        if self.fmt == "json":
            try:
                r = self.client.result(job_id, format="json")
            except (SaliencyClientError, httpx.HTTPError) as exc:
                for source in sources:
                    yield Outcome(source, reason=describe(exc))
                return
            assert r.raw is not None
            head = {k: v for k, v in r.raw.items() if k != "explanations"}
            for i, source in enumerate(sources):
                entries = [e for e in r.raw.get("explanations", []) if e.get("image_index") == i]
                body = {**head, "explanations": entries}
                t = entries[0]["target"] if entries else None
                target = None if t is None else target_text(t["index"], t["label"], t["score"])
                yield Outcome(source, data=json.dumps(body, separators=(",", ":")).encode(), target=target)
            return
        for i, source in enumerate(sources):
            try:
                r = self.client.result(job_id, format=self.fmt, index=i)
            except (SaliencyClientError, httpx.HTTPError) as exc:
                yield Outcome(source, reason=describe(exc))
                continue
            yield Outcome(source, data=self._bytes(r), target=_target(r))


def _target(r: ExplainResult) -> str | None:
    t = r.target
    return None if t is None else target_text(t.index, t.label, t.score)
