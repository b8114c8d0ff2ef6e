"""The 30-second soak (``make soak-short``): valid and hostile traffic at concurrency 16 against a
real server on 127.0.0.1. Not a timing test: it fails only on a 5xx other than 503/504 with
``Retry-After``, on a status a case did not expect, on a lost job, or on an unhealthy server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_thirty_seconds_of_mixed_and_hostile_traffic() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "30", "--concurrency", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "5xx other than 503/504 with Retry-After: 0" in out
    assert "unexpected statuses: 0" in out
    assert "lost 0" in out
    assert "server healthy after: True" in out
