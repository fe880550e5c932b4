"""NF4 (4-bit NormalFloat) quantization in bitsandbytes' layout, in pure PyTorch.

What is in here:
- ``NF4_CODE``: the 16 NF4 values (QLoRA, Dettmers et al. 2023), exactly bitsandbytes' table.
- ``dynamic_code()``: the 256-value signed 8-bit dynamic code used for double quantization.
- ``NF4State``: a frozen dataclass holding everything needed to dequantize one tensor.
- ``quantize_nf4`` / ``dequantize_nf4``; ``double_quantize`` (the scales' 8-bit step alone).

Layout (same as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``): the tensor
is flattened, cut into blocks of ``blocksize`` (the last block may be shorter), each block is
divided by its absolute maximum (``absmax``) and every value is rounded to the nearest NF4 code
(ties go to the lower code). Two 4-bit codes share a byte, the first element in the high nibble.
With double quantization, ``absmax - mean(absmax)`` is itself quantized blockwise (blocks of
256) to the 8-bit dynamic code, with one float32 scale per 256 blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero. These decimal strings round to the same float32 values bitsandbytes uses.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Elements per chunk in quantize_nf4 and dequantize_nf4: bounds their temporaries to about
# 1 MB each however large the tensor is (an embedding matrix, say). Small enough to stay in
# cache and for the allocator to reuse memory instead of mapping fresh pages on every call.
_CHUNK = 1 << 18


@functools.cache
def dynamic_code() -> Tensor:
    """The signed 8-bit dynamic code: ``bitsandbytes.functional.create_dynamic_map(signed=True)``.

    Seven decades (1e-6 .. 1) with 1, 2, 4, ..., 64 linearly spaced values each, both signs, plus
    0 and 1: 256 sorted float32 values. Built with the same float32 torch ops as bitsandbytes so
    every value is bit-identical. Cached: treat the returned tensor as read-only.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-device constants: NF4 rounding bounds, 8-bit code bounds, and the NF4 byte table."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    dyn = dynamic_code()
    # Rounding to nearest = bucketize against the midpoints (bitsandbytes' reference does the
    # same; a value exactly on a midpoint goes to the lower code).
    nf4_bounds = (code[:-1] + code[1:]) / 2
    dyn_bounds = (dyn[:-1] + dyn[1:]) / 2
    # byte -> (value of high nibble, value of low nibble), 8 bytes per row. Viewed as one int64
    # per byte so that dequantizing is a 1-D gather, ~4x faster on CPU than gathering rows.
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # (256, 2) float32
    byte_table = pairs.contiguous().view(torch.int64).reshape(256)
    return nf4_bounds.to(device), dyn_bounds.to(device), byte_table.to(device)


@dataclass(frozen=True)
class NF4State:
    """A quantized tensor: the packed codes plus everything needed to dequantize them."""

    packed: Tensor  # (ceil(numel / 2),) uint8, two codes per byte, first element in the high nibble
    absmax: Tensor  # (n_blocks,) float32 block scales; uint8 codes when double-quantized
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (the default for dequantization)
    blocksize: int = 64  # elements per block (the last block may be shorter)
    offset: float | None = None  # double quant: mean of absmax, subtracted before quantizing it
    absmax_scale: Tensor | None = None  # double quant: (ceil(n_blocks / 256),) float32 scales
    absmax_code: Tensor | None = None  # double quant: the 256-value code absmax indexes into
    blocksize2: int = 256  # double quant: absmax values per scale

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> NF4State:
        move = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **move)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor: codes, scales and the float32 offset.

        The 256-value code table is not counted: it is a constant of the format (like NF4_CODE)
        that one model needs once, not once per tensor.
        """
        tensors = (self.packed, self.absmax, self.absmax_scale)
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + (4 if self.offset is not None else 0)

    @property
    def bits_per_parameter(self) -> float:
        """4 + 32/64 = 4.5 without double quant; 4 + 8/64 + 32/(64*256) ~ 4.127 with it."""
        return self.nbytes * 8 / self.numel


def _scale_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Divide each block of a 1-D float32 tensor by its absmax; return (scaled, absmax).

    Mirrors bitsandbytes' reference op by op so the rounding is identical: full blocks are
    multiplied by ``1 / absmax``, the shorter last block is divided by its absmax.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    return scaled, absmax


def _unscale_blocks_(values: Tensor, scales: Tensor, blocksize: int) -> Tensor:
    """In place: multiply each block of the 1-D float32 ``values`` by its scale (``scales`` may
    run on past the blocks: a shard's padded rows, `NF4Linear.as_blocks`)."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < n:
        values[full:].mul_(scales[full // blocksize])
    return values


def check_quantizable(weight: Tensor, blocksize: int) -> None:
    """Raise ValueError for what no NF4 quantizer takes: not floating point, empty, an odd or
    non-positive block size."""
    if not weight.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number (e.g. 64), got {blocksize}")


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize a float tensor (any shape, any device) to NF4 in bitsandbytes' layout.

    Gives the same bytes as ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)``; see tests/test_nf4.py for the one
    documented difference (bitsandbytes' native CPU kernel for the 8-bit double quantization
    approximates nearest rounding; we round exactly to nearest, like its CUDA kernel).
    """
    check_quantizable(weight, blocksize)
    nf4_bounds, _, _ = _tables(weight.device)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    step = max(1, _CHUNK // blocksize) * blocksize  # whole blocks per chunk, so an even count
    packed, absmax = [], []
    for start in range(0, n, step):
        scaled, chunk_absmax = _scale_blocks(flat[start : start + step].float(), blocksize)
        if scaled.numel() % 2:  # pad like bitsandbytes: the spare low nibble holds the code of 0
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.bucketize(scaled, nf4_bounds, out_int32=True).to(torch.uint8)
        packed.append((codes[0::2] << 4) | codes[1::2])
        absmax.append(chunk_absmax)
    state = NF4State(torch.cat(packed), torch.cat(absmax), weight.shape, weight.dtype, blocksize)
    return double_quantize(state) if double_quant else state


def double_quantize(state: NF4State) -> NF4State:
    """The same state with its float32 block scales double-quantized (QLoRA section 3): they
    cost 0.5 bit/parameter at blocksize 64; centring them and storing 8-bit codes brings that
    down to ~0.127. Shared by every quantizer (the fused GPU kernels make the 4-bit codes and
    the float32 scales, then call this), so the 8-bit codes are the same whoever made the rest."""
    _, dyn_bounds, _ = _tables(state.absmax.device)
    offset = state.absmax.mean()
    scaled, absmax_scale = _scale_blocks(state.absmax - offset, state.blocksize2)
    codes = torch.bucketize(scaled, dyn_bounds, out_int32=True).to(torch.uint8)
    return dataclasses.replace(
        state,
        absmax=codes,
        offset=offset.item(),
        absmax_scale=absmax_scale,
        absmax_code=dynamic_code().to(state.absmax.device, copy=True),
    )


def block_absmax(state: NF4State) -> Tensor:
    """The float32 per-block scales (undoing double quantization if it was used)."""
    if not state.double_quant:
        return state.absmax
    values = torch.index_select(state.absmax_code, 0, state.absmax.int())
    return _unscale_blocks_(values, state.absmax_scale, state.blocksize2).add_(state.offset)


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor of ``state.shape`` in ``dtype`` (default: the original dtype).

    Equals ``bitsandbytes.functional.dequantize_4bit`` bit for bit: code * absmax is computed in
    float32 and rounded once to ``dtype``, as bitsandbytes does. (Multiplying in bfloat16
    directly was measured no faster on CPU and off by one bf16 ulp in ~27% of the values.)
    """
    _, _, byte_table = _tables(state.packed.device)
    absmax = block_absmax(state)
    n, blocksize = state.numel, state.blocksize
    out = torch.empty(n, dtype=dtype or state.dtype, device=state.packed.device)
    # Work in chunks through two small reused scratch buffers: the float32 values of a chunk
    # stay in cache and only the output is allocated at full size (measured 2-4x faster on CPU
    # than whole-tensor temporaries for a 28M-element matrix, as fast for 1M-element layers).
    step = max(1, _CHUNK // blocksize) * blocksize
    index = torch.empty(min(step, n + 1) // 2, dtype=torch.int32, device=out.device)
    pairs = torch.empty(index.shape, dtype=torch.int64, device=out.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        packed = state.packed[start // 2 : (stop + 1) // 2]
        m = packed.numel()
        # One gather per byte yields both of its float32 values: (m,) int64 -> (2 m,) float32.
        torch.index_select(byte_table, 0, index[:m].copy_(packed), out=pairs[:m])
        values = pairs[:m].view(torch.float32)[: stop - start]
        out[start:stop] = _unscale_blocks_(values, absmax[start // blocksize :], blocksize)
    return out.view(state.shape)
