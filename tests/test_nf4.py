"""Tests for lorakit.quant.nf4: the code tables, the byte layout, round-trip error and size, and
(marked ``oracle``) bit-for-bit agreement with bitsandbytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import lorakit.quant.nf4 as nf4
from lorakit.kernels.bnb_nf4 import from_quant_state
from lorakit.quant.nf4 import (
    NF4_CODE,
    block_absmax,
    dequantize_nf4,
    dynamic_code,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Includes numels that are not a multiple of 64 (and one that is odd) and a single-block tensor.
SHAPES = [(48, 576), (7, 9), (3, 100, 5), (100_003,)]
# Widest gap between neighbouring values of the 8-bit dynamic code (near +-1: 0.9 / 64).
DYNAMIC_MAX_GAP = 0.9 / 64 + 1e-6


def randn(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def expected_nbytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return math.ceil(numel / 2) + 4 * blocks
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


# ---- code tables -------------------------------------------------------------------------


def test_nf4_code_is_the_normal_quantile_construction():
    # QLoRA's recipe (bitsandbytes create_normal_map): 8 positive and 7 negative quantiles of
    # N(0, 1) between 1 - delta and 1/2, plus an exact zero, normalised to [-1, 1].
    normal = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    expected = values / values.abs().max()
    torch.testing.assert_close(
        torch.tensor(NF4_CODE, dtype=torch.float64), expected, atol=1e-6, rtol=0
    )
    assert (NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]) == (-1.0, 0.0, 1.0)


def test_dynamic_code_structure():
    code = dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert code[127] == 0.0 and code[255] == 1.0  # 127 negatives, zero, 128 positives incl. 1
    torch.testing.assert_close(code[:127], -code[128:255].flip(0), atol=0, rtol=0)
    assert code[128] == pytest.approx(0.55e-6, rel=1e-5)  # smallest magnitude: decade 1e-6


# ---- layout ------------------------------------------------------------------------------


def test_packing_first_element_in_high_nibble():
    codes = torch.arange(64) % 16  # the block holds -1.0 and 1.0, so its absmax is exactly 1
    weight = torch.tensor(NF4_CODE)[codes]
    state = quantize_nf4(weight, double_quant=False)
    assert state.packed.dtype == torch.uint8 and state.packed.shape == (32,)
    assert state.packed[0].item() == 0x01 and state.packed[1].item() == 0x23
    assert torch.equal(state.packed, ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8))
    assert torch.equal(state.absmax, torch.ones(1))
    assert torch.equal(dequantize_nf4(state), weight)  # code values survive exactly


def test_odd_numel_pads_low_nibble_with_the_code_of_zero():
    weight = torch.tensor([1.0, -1.0, 1.0])
    state = quantize_nf4(weight, double_quant=False)
    assert state.packed.tolist() == [0xF0, 0xF7]  # 7 is the code of 0.0, as bitsandbytes pads
    assert torch.equal(dequantize_nf4(state), weight)


def test_midpoints_round_to_the_lower_code():
    code = torch.tensor(NF4_CODE)
    midpoints = (code[:-1] + code[1:]) / 2  # float32, as used for rounding
    weight = torch.cat([midpoints, torch.ones(1)])  # absmax 1: no rescaling
    state = quantize_nf4(weight, blocksize=16, double_quant=False)
    codes = torch.stack([state.packed >> 4, state.packed & 15], dim=1).flatten()
    assert codes.tolist() == list(range(15)) + [15]


def test_blocks_and_short_last_block():
    weight = randn((100,))  # one block of 64, then a block of 36
    state = quantize_nf4(weight, double_quant=False)
    expected = torch.stack([weight[:64].abs().max(), weight[64:].abs().max()])
    assert torch.equal(state.absmax, expected)
    assert state.packed.numel() == 50


def test_chunking_does_not_change_the_result(monkeypatch):
    weight = randn((40_000 + 37,), torch.bfloat16)  # many chunks, short last block, odd numel
    whole = quantize_nf4(weight)
    expected = dequantize_nf4(whole)
    monkeypatch.setattr(nf4, "_CHUNK", 1000)  # rounds down to 960 = 15 blocks per chunk
    chunked = quantize_nf4(weight)
    for name in ("packed", "absmax", "absmax_scale"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert whole.offset == chunked.offset
    assert torch.equal(dequantize_nf4(whole), expected)


def test_all_zero_weight():
    state = quantize_nf4(torch.zeros(4, 64))
    out = dequantize_nf4(state)
    assert torch.equal(out, torch.zeros(4, 64))


@pytest.mark.parametrize("bad", [torch.ones(8, dtype=torch.int64), torch.ones(0)])
def test_rejects_bad_tensors(bad):
    with pytest.raises(ValueError):
        quantize_nf4(bad)


@pytest.mark.parametrize("blocksize", [0, -64, 63])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(128), blocksize=blocksize)


# ---- round trip, size ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_shape_dtype_and_error_bound(shape, dtype):
    weight = randn(shape, dtype)
    state = quantize_nf4(weight, double_quant=False)
    out = dequantize_nf4(state)
    assert out.shape == weight.shape and out.dtype == dtype
    assert dequantize_nf4(state, torch.float32).dtype == torch.float32
    # Rounding to nearest: the error is at most half the widest code gap times the block scale
    # (plus the final rounding to dtype).
    half_gap = max(b - a for a, b in zip(NF4_CODE[:-1], NF4_CODE[1:], strict=True)) / 2
    scale = state.absmax.repeat_interleave(64)[: weight.numel()].view(shape)
    err = (dequantize_nf4(state, torch.float32) - weight.float()).abs()
    assert torch.all(err <= half_gap * scale * (1 + 1e-6))


def test_round_trip_error_on_standard_normal():
    weight = randn((512, 1024))
    for double_quant in (False, True):
        err = (dequantize_nf4(quantize_nf4(weight, double_quant=double_quant)) - weight).abs()
        # Measured 0.0728 for both (bitsandbytes: the same to 1e-5, see the oracle test).
        assert 0.070 < err.mean().item() < 0.075


def test_double_quant_absmax_is_close_to_float_absmax():
    weight = randn((256, 1024))
    plain, double = quantize_nf4(weight, double_quant=False), quantize_nf4(weight)
    assert double.absmax.dtype == torch.uint8 and double.absmax_scale.dtype == torch.float32
    assert double.offset == pytest.approx(plain.absmax.mean().item())
    # 8-bit codes of (absmax - offset) / scale: off by at most half the widest code gap * scale.
    scale = double.absmax_scale.repeat_interleave(256)[: plain.absmax.numel()]
    assert torch.all((block_absmax(double) - plain.absmax).abs() <= DYNAMIC_MAX_GAP / 2 * scale)


def test_bits_per_parameter():
    weight = torch.zeros(1024, 4096)
    double, plain = quantize_nf4(weight), quantize_nf4(weight, double_quant=False)
    assert plain.bits_per_parameter == 4.5  # 4 + 32/64
    assert double.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert round(double.bits_per_parameter, 3) == 4.127
    for shape, double_quant in [((7, 9), True), ((100_003,), True), ((100_003,), False)]:
        state = quantize_nf4(torch.ones(shape), double_quant=double_quant)
        assert state.nbytes == expected_nbytes(math.prod(shape), double_quant)


def test_state_is_frozen_and_moves():
    state = quantize_nf4(randn((64, 64)))
    with pytest.raises(AttributeError):
        state.blocksize = 32
    moved = state.to("cpu")
    assert moved.offset == state.offset and torch.equal(moved.packed, state.packed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    weight = randn((300, 577), torch.bfloat16)
    cpu = quantize_nf4(weight)
    gpu = quantize_nf4(weight.cuda())
    assert gpu.packed.is_cuda
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(dequantize_nf4(gpu).cpu(), dequantize_nf4(cpu))
    assert torch.equal(dequantize_nf4(cpu.to("cuda")).cpu(), dequantize_nf4(cpu))


# ---- oracle: bitsandbytes ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(request):
    # bitsandbytes' CPU fallback torch.compiles its dequantize once per shape (~2 s each here);
    # the eager code is what we compare with anyway. Our own code never uses torch.compile.
    if request.node.get_closest_marker("oracle") is None:
        yield
        return
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(weight: torch.Tensor, double_quant: bool):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    return bnbf.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )


@pytest.mark.oracle
def test_code_tables_equal_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.oracle
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bnb_output_exactly(shape, dtype, double_quant):
    """Exact, not 1 ulp: like bitsandbytes we form code * absmax in float32 (absmax first
    decoded as code8 * scale + offset in float32) and round once to the output dtype."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, qs = bnb_quantize(randn(shape, dtype), double_quant)
    expected = bnbf.dequantize_4bit(packed, qs)
    ours = dequantize_nf4(from_quant_state(packed, qs))
    assert ours.dtype == expected.dtype
    # bitsandbytes' CPU kernel returns (1, n) for a 1-D shape; compare the values.
    assert torch.equal(ours, expected.reshape(shape))


@pytest.mark.oracle
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_equals_bnb(shape, dtype):
    weight = randn(shape, dtype)
    packed, qs = bnb_quantize(weight, double_quant=False)
    ours = quantize_nf4(weight, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, qs.absmax)
    assert (ours.shape, ours.dtype, ours.blocksize) == (qs.shape, qs.dtype, qs.blocksize)


def bnb_reference_quantize_blockwise(values: torch.Tensor, blocksize: int):
    """bitsandbytes' own pure-PyTorch quantize_blockwise (its "default" backend kernel), which
    the native CPU kernel registered for the same op otherwise shadows."""
    pytest.importorskip("bitsandbytes")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(keys, values, dynamic_code(), blocksize)


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(48, 576), (3, 100, 5), (1000, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_equals_bnb(shape, dtype):
    """Offset, scales and the 4-bit bytes are identical. The 8-bit absmax codes are identical
    to bitsandbytes' pure-PyTorch reference (exact nearest rounding, as its CUDA kernel does).

    bitsandbytes' native CPU kernel (0.50) differs: it rounds the value to a grid of step
    2/65535 and looks its code up in a 65536-entry table, so a value within ~1.5e-5 of a
    midpoint can get a worse code (near 0, where codes are 1e-6 apart, even two codes away).
    Measured on these shapes: 0.1-0.5% of the blocks. We bound how often, and by how much.
    """
    weight = randn(shape, dtype)
    packed, qs = bnb_quantize(weight, double_quant=True)
    ours = quantize_nf4(weight)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.offset == qs.offset.item()
    assert torch.equal(ours.absmax_scale, qs.state2.absmax)
    assert torch.equal(ours.absmax_code, qs.state2.code)

    plain_absmax = quantize_nf4(weight, double_quant=False).absmax
    reference_codes, reference_scale = bnb_reference_quantize_blockwise(
        plain_absmax - qs.offset, 256
    )
    assert torch.equal(ours.absmax, reference_codes)
    assert torch.equal(ours.absmax_scale, reference_scale)

    assert (ours.absmax != qs.absmax).float().mean().item() < 0.01
    # Their code is never worse than nearest by more than one grid step (in absmax units).
    scale = ours.absmax_scale.repeat_interleave(256)[: plain_absmax.numel()]
    ours_err = (block_absmax(ours) - plain_absmax).abs()
    theirs_err = (block_absmax(from_quant_state(packed, qs)) - plain_absmax).abs()
    assert torch.all(theirs_err <= ours_err + (2 / 65535) * scale * (1 + 1e-4) + 1e-6)


@pytest.mark.oracle
def test_round_trip_error_matches_bnb():
    weight = randn((1024, 2048), seed=1)
    for double_quant in (False, True):
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, qs = bnb_quantize(weight, double_quant)
        theirs = (bnbf.dequantize_4bit(packed, qs) - weight).abs().mean().item()
        ours = (dequantize_nf4(quantize_nf4(weight, double_quant=double_quant)) - weight).abs()
        assert ours.mean().item() == pytest.approx(theirs, rel=0.01)
        assert 0.070 < theirs < 0.075
