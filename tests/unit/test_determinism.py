"""Same operands, same bits: the CPU BLAS must not pick its code path by memory alignment.

Without ``MKL_CBWR`` (set by ``import service``), this exact operation — the input gradient of
a 1×1 convolution on a 1×1 map, as in mobilenet_v3's squeeze-excitation blocks — gave a
different last bit in about 4 % of calls here, and same-seed explanations then differed.
"""

from __future__ import annotations

import os

import torch

import service  # noqa: F401


def test_mkl_reproducibility_mode_is_set() -> None:
    assert os.environ.get("MKL_CBWR")


def test_convolution_input_gradient_is_bit_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(144, 576, 1, 1, generator=g).contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 576, 1, 1, generator=g).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(1, 144, 1, 1, generator=g)
    conv_backward = torch.ops.aten.convolution_backward
    args = ([144], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])
    reference = conv_backward(gy, x, w, *args)[0]
    padding = []
    differing = 0
    for i in range(5000):
        padding.append(torch.empty(i % 37 + 1))  # move the allocator's next addresses around
        differing += not torch.equal(conv_backward(gy, x, w, *args)[0], reference)
    assert differing == 0
