"""Greedy decoding's argmax over bf16 logits in C, without a float32 copy."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, function, i64, ptr


def argmax(logits: Tensor) -> Tensor | None:
    """(B, V) bf16 logits -> (B,) index of each row's largest value (the first of equals), or
    None where it does not apply (other dtypes, no library)."""
    fn = function("lk_argmax_bf16", ptr, i64, i64, ptr)  # x, rows, n, out (int64)
    if fn is None or not bf16_cpu(logits) or logits.dim() != 2 or logits.shape[1] == 0:
        return None
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    status = fn(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
    return out if status == 0 else None


def argmax_reference(logits: Tensor) -> Tensor:
    """The same in PyTorch: float32 argmax (the first of equals)."""
    return logits.float().argmax(-1)
