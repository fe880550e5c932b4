"""Tests for lorakit.kernels.bnb_nf4: an NF4State relabelled as bitsandbytes' QuantState gives
bitsandbytes' kernels our tensors, and they give quant.nf4's values. Marked ``oracle``; skipped
where bitsandbytes is not installed. On a CUDA machine the tensors are on the GPU."""

from __future__ import annotations

import pytest
import torch

from lorakit.kernels import bnb_nf4
from lorakit.quant.nf4 import block_absmax, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.oracle
bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 9), (48, 576), (3, 100, 5), (1001,)]


@pytest.fixture(autouse=True)
def _eager():
    # bitsandbytes' CPU fallback torch.compiles its dequantize once per shape (~2 s each).
    with torch._dynamo.config.patch(disable=True):
        yield


def randn(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).to(DEVICE)


def test_quant_state_is_our_tensors_relabelled():
    state = quantize_nf4(randn((48, 576)))
    qs = bnb_nf4.quant_state(state)
    assert qs.nested and qs.quant_type == "nf4" and qs.blocksize == 64
    assert qs.absmax is state.absmax and qs.state2.absmax is state.absmax_scale
    assert qs.state2.code is state.absmax_code and qs.state2.blocksize == 256
    assert torch.equal(qs.code.cpu(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert qs.offset.dtype == torch.float32 and qs.offset.item() == state.offset
    assert qs.shape == state.shape and qs.dtype == state.dtype
    assert bnb_nf4.quant_state(state, torch.float16).dtype == torch.float16
    back = bnb_nf4.from_quant_state(state.packed.view(-1, 1), qs)
    assert torch.equal(back.packed, state.packed) and back.offset == state.offset
    plain = bnb_nf4.quant_state(quantize_nf4(randn((64,)), double_quant=False))
    assert not plain.nested and plain.offset is None


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_dequantizes_our_state_to_our_values(shape, dtype, double_quant):
    state = quantize_nf4(randn(shape, dtype), double_quant=double_quant)
    for out in [None, *DTYPES]:
        theirs, ours = bnb_nf4.dequantize(state, out), dequantize_nf4(state, out)
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
        assert torch.equal(theirs, ours), out


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bnb_quantize_gives_our_state(dtype, double_quant):
    """The same bytes and float32 scales. With double quantization, bitsandbytes' CPU kernel
    rounds some 8-bit scale codes differently (tests/test_nf4.py, test_double_quant_equals_bnb:
    under 1% of the blocks); its CUDA kernel rounds exactly to nearest, like ours."""
    weight = randn((48, 576), dtype)
    theirs, ours = (
        bnb_nf4.quantize(weight, double_quant=double_quant),
        quantize_nf4(weight, double_quant=double_quant),
    )
    assert torch.equal(theirs.packed, ours.packed)
    assert (theirs.shape, theirs.dtype, theirs.blocksize) == (ours.shape, ours.dtype, 64)
    if not double_quant or DEVICE == "cuda":
        assert torch.equal(theirs.absmax, ours.absmax)
        assert theirs.offset == ours.offset
        return
    assert theirs.offset == ours.offset and torch.equal(theirs.absmax_scale, ours.absmax_scale)
    assert (theirs.absmax != ours.absmax).float().mean().item() < 0.01
    scale = ours.absmax_scale.repeat_interleave(256)[: ours.absmax.numel()]
    close = (block_absmax(theirs) - block_absmax(ours)).abs() <= 2 * (0.9 / 64) * scale
    assert close.all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_bnb_matmul_from_our_codes(dtype, rows):
    state = quantize_nf4(randn((40, 128), seed=1))
    x = randn((rows, 128), dtype, seed=2)
    y = bnb_nf4.matmul(x, state, dtype)
    expected = x.float() @ dequantize_nf4(state, dtype).float().T
    assert y.dtype == dtype and y.shape == (rows, 40)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=rtol)


def test_supports():
    state = quantize_nf4(randn((64, 64)))
    assert bnb_nf4.supports(state, torch.bfloat16)
    assert not bnb_nf4.supports(state, torch.float64)
    assert not bnb_nf4.supports(quantize_nf4(randn((64, 64)), blocksize=100), torch.float32)
    assert bnb_nf4.available()
