"""Tests for lorakit.kernels.triton_nf4 and triton_nf4_matmul: the fused NF4 kernels equal the
PyTorch reference (quant.nf4) bit for bit, and the 4-bit matmul equals dequantize + matmul.

On a CUDA machine they run the compiled kernels on the GPU; elsewhere the same kernels on CPU
tensors in Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets before triton loads).
Shapes stay small: the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from lorakit.kernels import triton_nf4
from lorakit.kernels import triton_nf4_matmul as tmm
from lorakit.quant.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd numels, numels that are not a multiple of 64, one block, one element, several programs.
SHAPES = [(7, 9), (24, 200), (3, 100, 5), (1,), (2049,)]
if DEVICE == "cuda":
    SHAPES += [(4096, 4096), (1000, 3001)]


def randn(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).to(DEVICE)


def assert_same_state(ours, ref) -> None:
    for name in ("packed", "absmax", "absmax_scale", "absmax_code"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (ours.shape, ours.dtype, ours.blocksize) == (ref.shape, ref.dtype, ref.blocksize)
    assert ours.offset == ref.offset


def test_runs_where_it_should():
    assert triton_nf4.interpreting() == (DEVICE == "cpu")


# ---- dequantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_the_reference_bit_for_bit(shape, dtype, double_quant):
    state = quantize_nf4(randn(shape, dtype), double_quant=double_quant)
    for out in [None, *DTYPES]:
        ours, ref = triton_nf4.dequantize(state, out), dequantize_nf4(state, out)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert torch.equal(ours, ref), (out, (ours != ref).sum().item())


def test_dequantize_rounds_bf16_to_nearest_even():
    # Values whose float32 product sits exactly halfway between two bf16 numbers, and just
    # above: truncation (what the interpreter's own cast does) would get them wrong.
    absmax = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], device=DEVICE)
    weight = torch.tensor(NF4_CODE[-1:], device=DEVICE).repeat(3 * 64) * absmax.repeat_interleave(
        64
    )
    state = quantize_nf4(weight, double_quant=False)
    assert torch.equal(state.absmax, absmax)  # the block maxima are the values themselves
    ours = triton_nf4.dequantize(state, torch.bfloat16)
    assert torch.equal(ours, dequantize_nf4(state, torch.bfloat16))
    assert ours[::64].tolist() == [1.0, 1.015625, 1.0078125]


# ---- quantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_the_reference_bit_for_bit(shape, dtype, double_quant):
    weight = randn(shape, dtype, seed=1)
    ours = triton_nf4.quantize(weight, double_quant=double_quant)
    assert_same_state(ours, quantize_nf4(weight, double_quant=double_quant))


@pytest.mark.parametrize("blocksize", [32, 64, 100, 256])
def test_quantize_block_sizes_zero_blocks_and_midpoints(blocksize):
    # A zero block in the middle, a zero short last block, and exact midpoints between codes
    # (they round to the lower code).
    code = torch.tensor(NF4_CODE)
    midpoints = ((code[:-1] + code[1:]) / 2).repeat(20)[: 2 * blocksize]
    weight = torch.cat(
        [midpoints, torch.zeros(blocksize), randn((3 * blocksize,)).cpu(), torch.zeros(7)]
    ).to(DEVICE)
    for double_quant in (False, True):
        ours = triton_nf4.quantize(weight, blocksize=blocksize, double_quant=double_quant)
        ref = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        assert_same_state(ours, ref)
        assert torch.equal(triton_nf4.dequantize(ours), dequantize_nf4(ref))


def test_quantize_rejects_what_the_reference_rejects():
    with pytest.raises(ValueError, match="blocksize"):
        triton_nf4.quantize(randn((64,)), blocksize=63)
    with pytest.raises(ValueError, match="floating-point"):
        triton_nf4.quantize(torch.ones(8, dtype=torch.int64, device=DEVICE))


# ---- 4-bit matmul ----------------------------------------------------------------------------

TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "n_out", "n_in", "double_quant"),
    [
        (1, 40, 72, True),  # one row; 72 inputs: blocks run across rows of W
        (5, 33, 200, False),  # odd output count, a partial K tile
        (17, 16, 128, True),  # more rows than one 16-row tile
    ],
)
def test_matmul_equals_dequantize_then_matmul(rows, n_out, n_in, double_quant, dtype, with_lora):
    state = quantize_nf4(randn((n_out, n_in), seed=2), double_quant=double_quant)
    x = randn((rows, n_in), dtype, seed=3)
    lora = None
    if with_lora:
        lora = (randn((4, n_in), seed=4) / 4, randn((4, n_out), seed=5), 0.5)
    assert tmm.supports(x, state, dtype)
    y = tmm.matmul(x, state, dtype, lora)
    expected = x.float() @ dequantize_nf4(state, dtype).float().T
    if lora is not None:
        expected += lora[2] * (x.float() @ lora[0].T) @ lora[1]
    assert y.dtype == dtype and y.shape == (rows, n_out)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol)


def test_matmul_keeps_leading_dimensions_and_refuses_many_rows():
    state = quantize_nf4(randn((24, 64), seed=6))
    x = randn((2, 3, 64), seed=7)
    y = tmm.matmul(x, state, torch.float32)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ dequantize_nf4(state).T, rtol=1e-5, atol=1e-5)
    assert not tmm.supports(randn((tmm.MAX_ROWS + 1, 64)), state, torch.float32)
    assert not tmm.supports(randn((2, 32)), state, torch.float32)  # wrong width
