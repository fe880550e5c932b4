"""kernels.nf4_matmul: products read straight from the 4-bit codes equal dequantizing first
(nf4_matmul_reference), alone, in groups and with an adapter; the dequantization's bits are
quant.nf4's; and what the kernel does not take it declines."""

import pytest
import torch
from conftest import needs_kernel

from lorakit.kernels import nf4_matmul as K
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4


@needs_kernel
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: one group of 8 rows, then 3
@pytest.mark.parametrize("n_in", [256, 1280])  # 1280: x of many rows is cut into input tiles
def test_kernel_equals_dequantize_then_matmul(double_quant, blocksize, rows, n_in):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, n_in, generator=g) * 0.05
    state = quantize_nf4(weight, blocksize, double_quant)
    assert K.supports(state, torch.device("cpu"))
    x = torch.randn(2, rows, n_in, generator=g)
    exact = x.double() @ dequantize_nf4(state, torch.float64).T
    got = K.nf4_matmul(x, state, torch.float32)
    assert got.shape == (2, rows, 96)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, K.nf4_matmul_reference(x, state, torch.float32))
    in_bf16 = K.nf4_matmul(x, state, torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(in_bf16, got.bfloat16())
    # bf16 activations: the products may run in bf16 (AVX512-BF16), float32 sums.
    xb = x.bfloat16()
    exact_b = xb.double() @ dequantize_nf4(state, torch.float64).T
    low = K.nf4_matmul(xb, state, torch.bfloat16).double()
    assert (low - exact_b).abs().max() < 1e-2 * exact_b.abs().max()


@needs_kernel
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("rows", [1, 2, 8, 11])  # 1 and 2 outputs at a time; 8 rows, then 3
@pytest.mark.parametrize("n_out", [80, 81])  # 81: a tile ends in a single output
def test_bf16_products_are_exact_products_of_the_bf16_dequantized_weight(blocksize, rows, n_out):
    """With bf16 activations the products run in bf16 where the CPU has AVX512-BF16: each weight
    is its bf16 dequantized value (code * scale in float32, rounded once: dequantize_nf4's bits),
    times x, summed in float32 (float32 products elsewhere). Only the float32 sums and the bf16
    result may differ from that; a lane paired with the wrong element of x, a scale of the
    wrong block or output, or a code rounded before its scale would be off by more."""
    g = torch.Generator().manual_seed(blocksize + rows + n_out)
    state = quantize_nf4(torch.randn(n_out, 1280, generator=g) * 0.05, blocksize, True)
    weight = dequantize_nf4(state, torch.bfloat16 if K.bf16_products() else torch.float64)
    x = torch.randn(rows, 1280, generator=g).bfloat16()
    exact = x.double() @ weight.double().T
    got = K.nf4_matmul(x, state, torch.bfloat16)
    torch.testing.assert_close(got.double(), exact.bfloat16().double(), rtol=1e-2, atol=1e-4)
    assert (got.double() - exact).abs().max() < 5e-3 * exact.abs().max()  # bf16 rounding


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n_out", [96, 90])  # 90: outputs left over after whole vectors
def test_an_adapter_added_in_the_kernel_call_equals_the_lora_formula(rows, n_out):
    g = torch.Generator().manual_seed(0)
    state = quantize_nf4(torch.randn(n_out, 128, generator=g) * 0.05)
    a, b = torch.randn(8, 128, generator=g), torch.randn(n_out, 8, generator=g) * 0.1
    lora = (a, b.t().contiguous(), 2.0)
    x = torch.randn(1, rows, 128, generator=g)
    w = dequantize_nf4(state, torch.float64)
    exact = x.double() @ w.T + 2.0 * (x.double() @ a.double().T) @ b.double().T
    got = K.nf4_matmul(x, state, torch.float32, lora)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, K.nf4_matmul_reference(x, state, torch.float32, lora))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_call_equals_each_weights_call(dtype):
    g = torch.Generator().manual_seed(1)
    weights = [
        K.KernelWeight(quantize_nf4(torch.randn(n_out, 256, generator=g) * 0.05))
        for n_out in (96, 32, 64)
    ]
    lora = (torch.randn(4, 256, generator=g), torch.randn(4, 32, generator=g), 0.5)  # A, B.T
    loras = [None, lora, None]
    x = torch.randn(3, 1, 256, generator=g).to(dtype)
    group = K.KernelGroup(list(zip(weights, loras, strict=True)))
    got = group(x, dtype)
    for y, k, lo in zip(got, weights, loras, strict=True):
        assert y.dtype == dtype and y.shape == (3, 1, k.shape[0])
        assert torch.equal(y, k(x, dtype, lo))


@needs_kernel
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_kernel_dequantizes_to_the_same_bits(double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    state = quantize_nf4(torch.randn(96, 640, generator=g) * 0.05, blocksize, double_quant)
    kernel = K.KernelWeight(state)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(kernel.dequantize(dtype), dequantize_nf4(state, dtype))
    assert kernel.dequantize(torch.float16) is None  # PyTorch's path does that one


def test_shapes_the_kernel_does_not_take():
    cpu = torch.device("cpu")
    rows_split = quantize_nf4(torch.randn(4, 96), 64)  # a block would span two rows
    assert not K.supports(rows_split, cpu)
    assert not K.supports(quantize_nf4(torch.randn(2, 3, 64), 64), cpu)  # 3-D
    assert not K.supports(quantize_nf4(torch.randn(4, 64), 64), torch.device("meta"))


@needs_kernel
def test_a_call_the_kernel_refuses_gives_none():
    """No rows: the C function's status is nonzero, and the wrappers say None."""
    kernel = K.KernelWeight(quantize_nf4(torch.randn(32, 64)))
    empty = torch.randn(0, 64)
    assert kernel(empty, torch.float32) is None
    assert K.KernelGroup([(kernel, None), (kernel, None)])(empty, torch.float32) is None
