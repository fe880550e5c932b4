"""LlamaRMSNorm in one compiled pass each way, bf16 in and out, float32 inside.

weight * bf16(x * rsqrt(mean(x^2) + eps)): the arithmetic of transformers' LlamaRMSNorm (and
Mistral's, Qwen2's, Qwen3's), eight PyTorch operations forward and more backward. The backward
is for LoRA training, the weight frozen. `RMSNormFunction` is the autograd function over both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, f32, function, i32, i64, ptr, threads


def _forward():  # noqa: ANN202
    return function("lk_rms_norm", ptr, i64, i64, ptr, f32, ptr, i32)  # x rows n w eps out thr


def rms_norm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` takes these: bf16 on CPU, a weight of x's last dimension."""
    return _forward() is not None and bf16_cpu(x, weight) and weight.shape == x.shape[-1:]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """LlamaRMSNorm of bf16 x with a bf16 weight in one call, or None where it does not apply
    (other dtypes, no library)."""
    if not rms_norm_applies(x, weight):
        return None
    fn = _forward()
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    status = fn(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, out.data_ptr(), threads())
    return out if status == 0 else None


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """The gradient of `rms_norm(x, weight, eps)` with respect to x for the output's gradient
    dy (the weight frozen), in one call; None where it does not apply."""
    # dy, x, rows, n, weight, eps, dx, threads
    fn = function("lk_rms_norm_backward", ptr, ptr, i64, i64, ptr, f32, ptr, i32)
    if fn is None or not bf16_cpu(dy, x, weight) or dy.shape != x.shape:
        return None
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    dx = torch.empty_like(x)
    n = x.shape[-1]
    status = fn(
        dy.data_ptr(), x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, dx.data_ptr(),
        threads(),
    )  # fmt: skip
    return dx if status == 0 else None


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm's arithmetic in PyTorch."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm` with `rms_norm_backward` as its gradient; only x is kept for backward. Check
    that `rms_norm` applies before using it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        out = rms_norm(x, weight, eps)
        if out is None:
            raise RuntimeError("the compiled RMSNorm refused its input")
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        dx = rms_norm_backward(dy, x, weight, ctx.eps)
        if dx is None:
            raise RuntimeError("the compiled RMSNorm backward refused its input")
        return dx, None, None
