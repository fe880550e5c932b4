"""y = x @ W.T for a bf16 W with float32 sums: the output head while decoding.

torch's bf16 matmul of a few rows against a 49k-token head reads the weight at a third of
memory speed on CPU; the compiled kernel prefetches it and reads it at full speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels._build import function, i32, i64, ptr, threads


def _fn():  # noqa: ANN202
    # weight, out, in, x, x is bf16, rows, y, y is bf16, threads
    return function("lk_bf16_matmul", ptr, i64, i64, ptr, i32, i64, ptr, i32, i32)


def head_supports(weight: Tensor, x: Tensor) -> bool:
    """Whether `bf16_matmul` takes this weight and input: a 2-D bf16 CPU weight whose rows are
    a multiple of 32 elements, x on the CPU."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == x.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and weight.is_contiguous()
        and _fn() is not None
    )


def bf16_matmul(x: Tensor, weight: Tensor) -> Tensor | None:
    """x (..., in) @ W.T in bf16 for a bf16 W, float32 sums; None where the kernel refuses.
    Check `head_supports` first."""
    n_out, n_in = weight.shape
    rows = x.reshape(-1, n_in)
    if rows.dtype not in (torch.float32, torch.bfloat16):
        rows = rows.float()
    rows = rows.contiguous()
    y = torch.empty(*x.shape[:-1], n_out, dtype=torch.bfloat16)
    status = _fn()(
        weight.data_ptr(),
        n_out,
        n_in,
        rows.data_ptr(),
        rows.dtype == torch.bfloat16,
        rows.shape[0],
        y.data_ptr(),
        True,
        threads(),
    )
    return y if status == 0 else None


def bf16_matmul_reference(x: Tensor, weight: Tensor) -> Tensor:
    """What `bf16_matmul` computes, in PyTorch."""
    return F.linear(x.float(), weight.float()).bfloat16()
