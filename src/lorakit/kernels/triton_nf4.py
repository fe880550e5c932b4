"""NF4 dequantization and quantization as fused Triton kernels, for CUDA tensors.

`dequantize` turns the 4-bit codes and the (double-quantized) block scales into bf16, fp16 or
fp32 in one pass: each byte is read once, each output element written once, with no float32
temporaries in between, where `quant.nf4.dequantize_nf4` chains a gather, a multiply per scale
level and a cast, each its own kernel. `quantize` makes the 4-bit codes and the float32 block
scales in one pass over the weight; the small 8-bit step over the scales stays in PyTorch
(`quant.nf4.double_quantize`, 1/64 of the data).

Both equal the PyTorch reference bit for bit (tests/test_triton_nf4.py holds them to it on CPU
with TRITON_INTERPRET=1, and on a GPU where there is one). What that takes:
- the same float32 operations in the same order: code * absmax, absmax = code8 * scale + offset
  as a multiply then an add (launched with ``enable_fp_fusion=False``: a fused multiply-add
  rounds once where the reference rounds twice), x * (1 / absmax) with an exactly rounded
  division (`div_rn`; Triton's ``/`` on float32 is an approximation on GPUs);
- one rounding from float32 to the output dtype, to nearest even. GPUs round so in one
  instruction; the interpreter truncates fp32 -> bf16 (triton 3.7.1 and 3.9), so under it the
  rounding is done by hand on the bits (`round_to`), which gives what the GPU instruction gives.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lorakit.quant.nf4 import NF4_CODE, NF4State, check_quantizable, double_quantize

BYTES_PER_PROGRAM = 1024  # dequantize: packed bytes per program (2048 outputs)
BLOCKS_PER_PROGRAM = 16  # quantize: NF4 blocks per program

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Triton decides at @triton.jit time, so when this module is imported, whether its kernels run
# in the CPU interpreter: TRITON_INTERPRET=1 must be set before that.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def supports(state: NF4State, dtype: torch.dtype) -> bool:
    """Whether these kernels run this state: on CUDA (or any device under the interpreter),
    uint8 codes, an output dtype they write."""
    device = state.packed.device
    return (
        (device.type == "cuda" or interpreting())
        and state.packed.dtype == torch.uint8
        and dtype in TL_DTYPES
    )


@triton.jit
def round_to(x, dtype: tl.constexpr, by_hand: tl.constexpr):
    """float32 -> dtype, rounded to nearest even; bf16 on the bits if by_hand (the interpreter:
    see the module docstring). A quiet NaN, what arithmetic makes, stays NaN."""
    if by_hand and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def block_scale(
    block,
    inside,
    absmax_ptr,
    scale_ptr,
    code8_ptr,
    offset,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE: tl.constexpr,
):
    """The float32 scale of NF4 block(s) `block` (0 where not `inside`): absmax itself, or with
    double quantization code8[absmax] * scale[block // BLOCKSIZE2] + offset (as
    quant.nf4.block_absmax)."""
    if DOUBLE:
        code = tl.load(code8_ptr + tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32))
        return code * tl.load(scale_ptr + block // BLOCKSIZE2, mask=inside, other=0.0) + offset
    return tl.load(absmax_ptr + block, mask=inside, other=0.0)


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # (ceil(n / 2),) uint8
    code_ptr,  # (16,) float32: NF4_CODE
    absmax_ptr,  # (n_blocks,) float32, or uint8 codes when DOUBLE
    scale_ptr,  # DOUBLE: (ceil(n_blocks / BLOCKSIZE2),) float32
    code8_ptr,  # DOUBLE: (256,) float32, the dynamic code
    offset,  # DOUBLE: float32 mean of absmax
    out_ptr,  # (n,) OUT
    n,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE: tl.constexpr,
    OUT: tl.constexpr,
    BYTES: tl.constexpr,
    BY_HAND: tl.constexpr,
):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    inside = 2 * byte < n
    packed = tl.load(packed_ptr + byte, mask=inside, other=0).to(tl.int32)
    # Both elements of a byte are in one block: blocks hold an even number of elements.
    block = (2 * byte) // BLOCKSIZE
    scale = block_scale(block, inside, absmax_ptr, scale_ptr, code8_ptr, offset, BLOCKSIZE2, DOUBLE)
    first = tl.load(code_ptr + (packed >> 4)) * scale  # the high nibble is the first element
    second = tl.load(code_ptr + (packed & 15)) * scale
    values = round_to(tl.interleave(first, second), OUT, BY_HAND)  # (2 * BYTES,)
    element = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + element, values, mask=element < n)


@triton.jit
def _quantize_kernel(
    x_ptr,  # (n,) float32, bf16 or fp16
    bounds_ptr,  # (15,) float32: midpoints between neighbouring NF4 codes
    packed_ptr,  # (ceil(n / 2),) uint8, out
    absmax_ptr,  # (n_blocks,) float32, out
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    SPAN: tl.constexpr,  # BLOCKSIZE rounded up to a power of two (tl.arange needs one)
    BLOCKS: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    within = tl.arange(0, SPAN)  # (SPAN,)
    element = block[:, None] * BLOCKSIZE + within[None, :]  # (BLOCKS, SPAN)
    inside = (within[None, :] < BLOCKSIZE) & (element < n)
    x = tl.load(x_ptr + element, mask=inside, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)  # (BLOCKS,)
    # As quant.nf4._scale_blocks: a full block is multiplied by 1 / absmax, the shorter last
    # block divided by its absmax, which is stored clamped to 1e-38 (a zero full block keeps 0).
    last = (block + 1) * BLOCKSIZE > n
    # 1e-38 is below float32's normal range: a bare literal would become a float64.
    clamped = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), clamped)
    scaled = x * inverse[:, None]
    if (tl.program_id(0) + 1) * BLOCKS * BLOCKSIZE > n:  # holds the last block: divide there
        scaled = tl.where(last[:, None], tl.math.div_rn(x, clamped[:, None]), scaled)
    # A zero block is zeros (x is 0 wherever absmax is), whatever the GPU's division does with
    # the subnormal 1e-38 (libdevice's division may flush it to zero).
    scaled = tl.where(absmax[:, None] > 0, scaled, x)
    # Round to the nearest code, a midpoint to the lower one: count the midpoints below
    # (torch.bucketize's rule, which the reference uses).
    codes = tl.zeros((BLOCKS, SPAN), dtype=tl.int32)
    for i in tl.static_range(15):
        codes += (scaled > tl.load(bounds_ptr + i)).to(tl.int32)
    # The padding past n was loaded as 0.0: the spare low nibble holds the code of 0.
    first, second = tl.split(tl.reshape(codes, (BLOCKS, SPAN // 2, 2)))
    byte_value = ((first << 4) | second).to(tl.uint8)  # (BLOCKS, SPAN // 2)
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, SPAN // 2)[None, :]
    byte_inside = (tl.arange(0, SPAN // 2)[None, :] < BLOCKSIZE // 2) & (2 * byte < n)
    tl.store(packed_ptr + byte, byte_value, mask=byte_inside)
    tl.store(absmax_ptr + block, tl.where(last, clamped, absmax), mask=block < n_blocks)


@functools.cache
def constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """NF4_CODE and its 15 rounding midpoints (the reference's, bit for bit) on `device`; made
    once per device (a copy to the GPU per call would cost more than a small layer's kernel).
    Read-only."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    return code.to(device), ((code[:-1] + code[1:]) / 2).to(device)


def dequantize(state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """`quant.nf4.dequantize_nf4` in one kernel: the same values, bit for bit."""
    dtype = dtype or state.dtype
    device = state.packed.device
    n = state.numel
    out = torch.empty(state.shape, dtype=dtype, device=device)
    code, _ = constants(device)
    double = state.double_quant
    grid = (triton.cdiv(state.packed.numel(), BYTES_PER_PROGRAM),)
    _dequantize_kernel[grid](
        state.packed,
        code,
        state.absmax,
        state.absmax_scale if double else state.absmax,
        state.absmax_code if double else code,
        float(state.offset or 0.0),
        out,
        n,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=state.blocksize2,
        DOUBLE=double,
        OUT=TL_DTYPES[dtype],
        BYTES=BYTES_PER_PROGRAM,
        BY_HAND=interpreting(),
        enable_fp_fusion=False,
    )
    return out


def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """`quant.nf4.quantize_nf4` with the 4-bit pass in one kernel: the same state, bit for bit."""
    check_quantizable(weight, blocksize)
    flat = weight.detach().reshape(-1).contiguous()
    n = flat.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    _, bounds = constants(flat.device)
    _quantize_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        flat,
        bounds,
        packed,
        absmax,
        n,
        n_blocks,
        BLOCKSIZE=blocksize,
        SPAN=triton.next_power_of_2(blocksize),
        BLOCKS=BLOCKS_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    state = NF4State(packed, absmax, weight.shape, weight.dtype, blocksize)
    return double_quantize(state) if double_quant else state
