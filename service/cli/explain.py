"""``saliency explain PATH...``: every image of the paths explained, one output file each.

Outputs go under ``--out`` as ``<name>.<method>.png`` (``.overlay.png``, ``.json``, ``.npy``),
a folder's images keeping their place relative to it. A progress bar (stderr) shows images/s and
the ETA; a summary table (stdout) ends the run; each file that failed gets one line on stderr
saying why, and the exit status is 1 (2: nothing could run at all, e.g. an unknown model).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
from rich.console import Console
from saliency_client import Client, SaliencyClientError

from service.cli.inputs import Source, expand
from service.cli.outcome import Outcome, Report
from service.cli.params import given
from service.cli.progress import progress_bar, show, table
from service.cli.remote import describe
from service.config import Settings
from service.errors import SaliencyError

SUFFIX = {"png": ".png", "overlay": ".overlay.png", "json": ".json", "npy": ".npy"}


class Runner(Protocol):
    @property
    def method(self) -> str: ...

    def run(self, sources: list[Source], report: Report) -> Iterator[Outcome]: ...


def say(console: Console, line: str) -> None:
    """One line as it is: no markup, no highlighting, never wrapped."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def output_path(out: Path, source: Source, method: str, fmt: str) -> Path:
    return out / source.stem.parent / f"{source.stem.name}.{method}{SUFFIX[fmt]}"


def run(settings: Settings, args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    sources, missing = expand(args.paths, skip=Path(args.out))
    if not sources and not missing:
        say(err, f"saliency: no images in {' '.join(args.paths)}")
        return 2
    params = given(args)
    client: Client | None = None
    try:
        if args.url:
            from service.cli.remote import RemoteRunner, connect

            client = connect(args)
            runner: Runner = RemoteRunner(
                client,
                args.model,
                args.method,
                args.format,
                params,
                job_threshold=args.job_threshold,
                job_size=args.job_size,
            )
        else:
            from service.cli.local import LocalRunner

            runner = LocalRunner(settings, args.model, args.method, args.format, params)
        outcomes = [Outcome(Source(path, path), reason=why) for path, why in missing]
        started = time.perf_counter()
        outcomes += _explain(runner, sources, Path(args.out), args.format, err)
        wall = time.perf_counter() - started
    except SaliencyError as exc:
        say(err, f"saliency: {exc.message}")
        return 2
    except (SaliencyClientError, httpx.HTTPError) as exc:
        say(err, f"saliency: {args.url}: {describe(exc)}")
        return 2
    finally:
        if client is not None:
            client.close()
    failed = [o for o in outcomes if not o.ok]
    written = len(outcomes) - len(failed)
    rows = [
        ["model", args.model],
        ["method", runner.method],
        ["format", args.format],
        ["where", args.url or "this process"],
        ["images", len(outcomes)],
        ["written", written],
        ["failed", len(failed)],
        ["time", f"{wall:.1f} s"],
        ["images/s", f"{len(sources) / wall:.2f}" if wall > 0 else "–"],
        ["output", args.out],
    ]
    show(table("saliency explain", ["", ""], rows, header=False))
    for o in failed:
        say(err, f"saliency: {o.source.path}: {o.reason}")
    return 1 if failed else 0


def _explain(runner: Runner, sources: list[Source], out: Path, fmt: str, err: Console) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with progress_bar(err) as bar:
        task = bar.add_task(f"{runner.method}", total=len(sources))

        def report(done: float) -> None:
            bar.update(task, completed=max(done, len(outcomes)))

        try:
            for outcome in runner.run(sources, report):
                _write(outcome, output_path(out, outcome.source, runner.method, fmt))
                outcomes.append(outcome)
                bar.update(task, completed=max(len(outcomes), bar.tasks[0].completed))
        except BaseException:
            bar.update(task, visible=False)  # a run that cannot go on ends on one line saying why
            raise
    return outcomes


def _write(outcome: Outcome, path: Path) -> None:
    """The outcome's bytes to ``path`` (a failure to write becomes the file's failure)."""
    if outcome.data is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(outcome.data)
        outcome.written = path
    except OSError as exc:
        outcome.reason = f"cannot write {path}: {exc.strerror or exc}"
    outcome.data = None
