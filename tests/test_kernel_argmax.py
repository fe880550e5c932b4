"""kernels.argmax: greedy decoding's argmax over bf16 logits is PyTorch's (argmax_reference),
the first of equals included, and what it does not take it declines."""

import torch
from conftest import needs_kernel

from lorakit.kernels.argmax import argmax, argmax_reference


@needs_kernel
def test_argmax_is_torchs():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 49152, generator=g) * 3).bfloat16()
    logits[3, 100] = logits[3, 7000] = 50  # ties: the first
    logits[5] = -torch.rand(49152, generator=g).bfloat16() - 1  # all negative
    logits[6] = float("-inf")  # all -inf: the first
    logits[6, 9] = -1e30
    got = argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, argmax_reference(logits))
    assert torch.equal(got, logits.argmax(-1))


@needs_kernel
def test_what_argmax_does_not_take():
    logits = torch.randn(2, 10)
    assert argmax(logits) is None  # float32: PyTorch's argmax
    assert argmax(logits[0].bfloat16()) is None  # (B, V) only
    assert argmax(torch.randn(2, 0).bfloat16()) is None  # nothing to choose from
