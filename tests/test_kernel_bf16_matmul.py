"""kernels.bf16_matmul: the decoding output head's x @ W.T for a bf16 W equals a bf16 linear
layer's (bf16_matmul_reference), and what it does not take it declines."""

import pytest
import torch
from conftest import needs_kernel

from lorakit.kernels.bf16_matmul import bf16_matmul, bf16_matmul_reference, head_supports
from lorakit.kernels.nf4_matmul import bf16_products


@needs_kernel
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 10])  # 10: a group of 8 rows, then 2
def test_bf16_head_kernel_equals_a_bf16_linear(rows, x_dtype):
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(1000, 192, generator=g) * 0.05).bfloat16()
    x = torch.randn(2, rows, 192, generator=g).to(x_dtype)
    assert head_supports(weight, x)
    # float32 x is rounded to bf16 where the products run in bf16 (AVX512-BF16)
    used = x.bfloat16() if bf16_products() else x
    exact = used.double() @ weight.double().T
    got = bf16_matmul(x, weight)
    assert got.shape == (2, rows, 1000) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact.bfloat16().double(), rtol=1e-2, atol=1e-3)
    # float32 sums in another order than PyTorch's: a bf16 step apart at most
    reference = bf16_matmul_reference(used, weight)
    torch.testing.assert_close(got, reference, rtol=2**-7, atol=1e-3)


def test_what_the_head_kernel_does_not_take():
    weight = torch.randn(64, 96).bfloat16()
    x = torch.randn(1, 96)
    assert not head_supports(weight.float(), x)  # bf16 weights only
    assert not head_supports(weight[:, :80], x)  # rows not a multiple of 32, and not contiguous
    assert not head_supports(weight.contiguous()[None], x)  # 2-D only
    assert not head_supports(weight, x.to("meta"))


@needs_kernel
def test_a_call_the_head_kernel_refuses_gives_none():
    weight = torch.randn(64, 96).bfloat16()
    assert bf16_matmul(torch.randn(0, 96), weight) is None  # no rows: a nonzero status
