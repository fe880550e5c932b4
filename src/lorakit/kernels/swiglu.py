"""silu(g) * u of LLaMA-style MLPs in one compiled pass each way, on bf16 tensors.

The same bf16 results as PyTorch's silu then multiply, bit for bit, and as its backward; only g
and u kept for backward (PyTorch keeps silu(g) too). `SwiGLUFunction` is the autograd function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, function, i32, i64, ptr, threads


def _forward():  # noqa: ANN202
    return function("lk_swiglu", ptr, ptr, i64, ptr, i32)  # g, u, n, h, threads


def swiglu_applies(g: Tensor, u: Tensor) -> bool:
    """Whether `swiglu` takes these: two bf16 CPU tensors of one shape."""
    return _forward() is not None and bf16_cpu(g, u) and g.shape == u.shape


def swiglu(g: Tensor, u: Tensor) -> Tensor | None:
    """silu(g) * u of two bf16 tensors of one shape in one call; None where it does not apply
    (other dtypes, no library)."""
    if not swiglu_applies(g, u):
        return None
    fn = _forward()
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    status = fn(g.data_ptr(), u.data_ptr(), g.numel(), h.data_ptr(), threads())
    return h if status == 0 else None


def swiglu_backward(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor] | None:
    """The gradients of `swiglu(g, u)` with respect to g and u for the output's gradient dh,
    in one call; None where it does not apply."""
    fn = function("lk_swiglu_backward", ptr, ptr, ptr, i64, ptr, ptr, i32)  # dh g u n dg du thr
    if fn is None or not bf16_cpu(dh, g, u) or not dh.shape == g.shape == u.shape:
        return None
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    status = fn(
        dh.data_ptr(), g.data_ptr(), u.data_ptr(), g.numel(), dg.data_ptr(), du.data_ptr(),
        threads(),
    )  # fmt: skip
    return (dg, du) if status == 0 else None


def swiglu_reference(g: Tensor, u: Tensor) -> Tensor:
    """silu(g) * u in PyTorch."""
    return F.silu(g) * u


class SwiGLUFunction(torch.autograd.Function):
    """`swiglu` with `swiglu_backward` as its gradient. Check that `swiglu` applies first."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:  # noqa: ANN001
        h = swiglu(g, u)
        if h is None:
            raise RuntimeError("the compiled SwiGLU refused its input")
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):  # noqa: ANN001, ANN205
        g, u = ctx.saved_tensors
        grads = swiglu_backward(dh, g, u)
        if grads is None:
            raise RuntimeError("the compiled SwiGLU backward refused its input")
        return grads
