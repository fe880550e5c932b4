"""y = x @ W.T for a few rows of x (a decoding step), read straight from W's 4-bit NF4 codes, in
Triton: the GPU's counterpart of nf4_matmul.c.

A decoding step reads every weight once for a handful of rows: it is bound by memory traffic,
and the 4-bit codes are a quarter of a bf16 copy's bytes. Each program dequantizes a tile of W
(BLOCK_N output features x BLOCK_K inputs) in registers, exactly as `triton_nf4.dequantize`
rounds it to the compute dtype, and multiplies it into float32 sums for all the rows at once. An
adapter can be added in the same call: scale * (x @ A.T) @ B.T, x @ A.T (rows x rank) made by
PyTorch first, its product with B.T added to each tile of y before it is stored.

`kernels.nf4_matmul.nf4_matmul_reference` is what it is held to (float32 sums: equal to a
tolerance, not bit for bit: the sums run in another order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lorakit.kernels.nf4_matmul import LoRA
from lorakit.kernels.triton_nf4 import TL_DTYPES, block_scale, constants, interpreting, round_to
from lorakit.quant.nf4 import NF4State

# Tile sizes: small output tiles give enough programs for one row (4096 outputs: 256 programs);
# tl.dot needs every side >= 16. Not yet tuned on a GPU.
BLOCK_N = 16
BLOCK_K = 128
MAX_ROWS = 32  # most rows of x one call takes (decoding steps, short prompts)


@triton.jit
def _matmul_kernel(
    x_ptr,  # (M, K) in the compute dtype, contiguous
    packed_ptr,  # W's codes: (ceil(N * K / 2),) uint8
    code_ptr,  # (16,) float32: NF4_CODE
    absmax_ptr,  # (n_blocks,) float32, or uint8 codes when DOUBLE
    scale_ptr,  # DOUBLE: (ceil(n_blocks / BLOCKSIZE2),) float32
    code8_ptr,  # DOUBLE: (256,) float32
    offset,  # DOUBLE: float32 mean of absmax
    xa_ptr,  # LORA: (M, R) float32, scale * x @ A.T
    bt_ptr,  # LORA: (R, N) float32, B.T
    y_ptr,  # (M, N) in OUT
    M,
    N,
    K,
    R,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE: tl.constexpr,
    LORA: tl.constexpr,
    DOT: tl.constexpr,  # dtype of tl.dot's operands
    OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BY_HAND: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        x = tl.load(
            x_ptr + rows[:, None] * K + k[None, :],
            mask=(rows[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        # W[n, k] is element n * K + k of the flattened weight: byte >> 1, the high nibble
        # when even. Blocks run across rows, so each element looks its block up.
        element = cols[:, None].to(tl.int64) * K + k[None, :]  # (BLOCK_N, BLOCK_K)
        inside = (cols[:, None] < N) & (k[None, :] < K)
        byte = tl.load(packed_ptr + (element >> 1), mask=inside, other=0).to(tl.int32)
        nibble = tl.where((element & 1) == 0, byte >> 4, byte & 15)
        scale = block_scale(
            element // BLOCKSIZE,
            inside,
            absmax_ptr,
            scale_ptr,
            code8_ptr,
            offset,
            BLOCKSIZE2,
            DOUBLE,
        )
        w = round_to(tl.load(code_ptr + nibble) * scale, OUT, BY_HAND)  # as dequantize rounds it
        acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)), input_precision="ieee")
    if LORA:
        r = tl.arange(0, BLOCK_R)
        xa = tl.load(
            xa_ptr + rows[:, None] * R + r[None, :],
            mask=(rows[:, None] < M) & (r[None, :] < R),
            other=0.0,
        )  # (BLOCK_M, BLOCK_R)
        bt = tl.load(
            bt_ptr + r[:, None] * N + cols[None, :],
            mask=(r[:, None] < R) & (cols[None, :] < N),
            other=0.0,
        )  # (BLOCK_R, BLOCK_N)
        acc += tl.dot(xa, bt, input_precision="ieee")
    out = round_to(acc, OUT, BY_HAND)
    tl.store(
        y_ptr + rows[:, None] * N + cols[None, :],
        out,
        mask=(rows[:, None] < M) & (cols[None, :] < N),
    )


def supports(x: Tensor, state: NF4State, dtype: torch.dtype) -> bool:
    """Whether `matmul` takes this call: a 2-D weight, at most MAX_ROWS rows, a dtype it writes,
    on CUDA (or any device under the interpreter)."""
    return (
        len(state.shape) == 2
        and x.shape[-1] == state.shape[1]
        and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
        and dtype in TL_DTYPES
        and state.packed.dtype == torch.uint8
        and (x.device.type == "cuda" or interpreting())
    )


def matmul(x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
    """x (..., in) @ W.T -> (..., out) in `dtype`: W rounded to `dtype` as dequantization
    rounds it, x cast to `dtype`, products summed in float32; plus scale * (x @ A.T) @ B.T for
    `lora` = (A (rank, in), B.T (rank, out), scale), in float32. Check `supports` first."""
    n, k = state.shape
    rows = x.reshape(-1, k).to(dtype).contiguous()  # (M, K)
    m = rows.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=x.device)
    code, _ = constants(x.device)
    double = state.double_quant
    xa = bt = y  # placeholders: not read without an adapter
    rank = 0
    if lora is not None:
        a, bt, scale = lora
        xa = (scale * (rows.float() @ a.float().T)).contiguous()  # (M, rank)
        bt, rank = bt.float().contiguous(), a.shape[0]
    # The interpreter's tl.dot is wrong for bf16 operands (triton 3.7.1): float32 there. Products
    # of bf16 or fp16 values are exact in float32, so only the order of the sums differs.
    dot = tl.float32 if interpreting() or dtype == torch.float32 else TL_DTYPES[dtype]
    _matmul_kernel[(triton.cdiv(n, BLOCK_N),)](
        rows,
        state.packed,
        code,
        state.absmax,
        state.absmax_scale if double else state.absmax,
        state.absmax_code if double else code,
        float(state.offset or 0.0),
        xa,
        bt,
        y,
        m,
        n,
        k,
        rank,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=state.blocksize2,
        DOUBLE=double,
        LORA=lora is not None,
        DOT=dot,
        OUT=TL_DTYPES[dtype],
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        BY_HAND=interpreting(),
        enable_fp_fusion=False,
    )
    return y.view(*x.shape[:-1], n)
