"""``retain_freed_memory``: after the first call, the same working set costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
from service.runtime.process.heap import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
torch.manual_seed(0)
conv = torch.nn.Conv2d(16, 16, 3, padding=1)
x = torch.randn(16, 16, 128, 128, requires_grad=True)  # 16 MiB activations, like a real pass
def work():
    torch.autograd.grad(conv(torch.relu(conv(x))).sum(), x)
work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    work()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults() -> None:
    applied, retained = faults("retain")
    if applied != "True":
        pytest.skip("not glibc: nothing to tune")
    _, default = faults("default")
    pages = 5 * 16 * 2**20 // 4096  # five calls × (at least) one 16 MiB block, in 4 KiB pages
    assert default > pages  # glibc's default faults its blocks in again on every call
    # what remains is one-off growth (a new thread's arena, the heap's top): measured 0–12,288
    # faults against 100,000–170,000 without
    assert retained * 4 < default
