"""kernels.swiglu: silu(g) * u in one compiled pass each way, PyTorch's bf16 arithmetic and
autograd's gradients bit for bit (swiglu_reference), and what it does not take it declines."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel

from lorakit.kernels.swiglu import swiglu, swiglu_backward, swiglu_reference


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and a.dtype == b.dtype


@needs_kernel
@pytest.mark.parametrize("shape", [(5,), (3, 7, 33), (2, 512, 1536)])  # tails; many threads
def test_swiglu_kernel_is_pytorchs_bf16_arithmetic_bit_for_bit(shape):
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(shape, generator=gen) * 4).bfloat16()
    u = torch.randn(shape, generator=gen).bfloat16()
    dh = torch.randn(shape, generator=gen).bfloat16()
    # where e^-g overflows or nearly does, and the infinities
    extremes = torch.tensor([-100.0, -88.5, 88.5, 100.0, float("inf"), -float("inf")])
    g.view(-1)[: min(g.numel(), 6)] = extremes[: g.numel()].bfloat16()
    g1, u1 = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    h = swiglu_reference(g1, u1)
    h.backward(dh)
    assert _same(swiglu(g, u), h.detach())
    assert _same(h.detach(), F.silu(g) * u)
    dg, du = swiglu_backward(dh, g, u)
    assert _same(dg, g1.grad)
    assert _same(du, u1.grad)


@needs_kernel
def test_what_swiglu_does_not_take():
    g = torch.randn(4, 8)
    assert swiglu(g, g) is None  # float32
    assert swiglu(g.bfloat16(), g[:, :4].bfloat16()) is None  # shapes differ
    b = g.bfloat16()
    assert swiglu_backward(b, b, b[:, :4]) is None
    assert swiglu_backward(g, b, b) is None
