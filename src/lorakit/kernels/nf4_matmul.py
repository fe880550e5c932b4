"""y = x @ W.T read straight from W's 4-bit NF4 codes (nf4_matmul.c), and W dequantized in C.

Each new token reads every weight once, so decoding is bound by memory traffic; from the 4-bit
codes that is a quarter of a bf16 copy's. `KernelWeight` prepares one weight's call once (a
decoding step calls each layer hundreds of times a second); `KernelGroup` runs several weights
over the same input (q, k, v; gate, up) in one call. An adapter can be added in the same call.
`nf4_matmul_reference` is the same product in PyTorch, what the tests hold the kernel to.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels._build import f32, function, i32, i64, library, ptr, threads
from lorakit.quant.nf4 import NF4_CODE, NF4State, block_absmax, dequantize_nf4

_CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
# A (rank, in), B transposed (rank, out), scale; for a batch mixing adapters (lora.rows), also
# spans (rows, 2) int64 and row scales (rows,) float32: A and B hold the batch's adapters side by
# side, row i takes only their rows spans[i, 0] .. spans[i, 1] at scale row_scales[i]
LoRA = tuple[Tensor, Tensor, float] | tuple[Tensor, Tensor, float, Tensor, Tensor]


class _Weight(ctypes.Structure):
    """nf4_matmul.c's nf4_weight: what stays the same from call to call."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("code", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("n_out", ctypes.c_int64),
        ("n_in", ctypes.c_int64),
        ("bs", ctypes.c_int64),
    ]


_WEIGHT = ctypes.POINTER(_Weight)


def _matmul():  # noqa: ANN202
    # weight, x, x is bf16, rows, y, y is bf16, threads, adapter A, B.T, rank, scale, spans,
    # row scales, and whether the products may run in bf16
    return function(
        "lk_nf4_matmul", _WEIGHT, ptr, i32, i64, ptr, i32, i32, ptr, ptr, i64, f32, ptr, ptr, i32
    )


def _matmul_n():  # noqa: ANN202
    # n, weights, x, x is bf16, rows, outputs, y is bf16, threads, adapters' A, B.T, ranks,
    # scales, spans, row scales, whether the products may run in bf16
    return function(
        "lk_nf4_matmul_n", i64, ptr, ptr, i32, i64, ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32
    )


def bf16_products() -> bool:
    """Whether the kernel multiplies bf16 activations in bf16 here (AVX512-BF16)."""
    lib = library()
    return lib is not None and lib.lk_nf4_bf16() == 1


def supports(state: NF4State, device: torch.device) -> bool:
    """Whether `nf4_matmul` can run this weight (a 2-D CPU weight whose rows hold whole
    blocks of a multiple of 32 elements) on this machine."""
    return (
        device.type == "cpu"
        and state.packed.device.type == "cpu"
        and state.packed.dtype == torch.uint8
        and state.absmax.dtype == (torch.uint8 if state.double_quant else torch.float32)
        and len(state.shape) == 2
        and state.blocksize % 32 == 0
        and state.shape[1] % state.blocksize == 0
        and library() is not None
    )


class KernelWeight:
    """One weight's kernel arguments, prepared once: per call only the activations' pointers
    are new. The block scales are kept in float32 (double quantization undone once): 1/16 of a
    bit per weight more."""

    def __init__(self, state: NF4State) -> None:
        assert supports(state, state.packed.device)
        self.call, self.shape = _matmul(), state.shape
        # Held here for as long as the pointers in the structure are used.
        self.tensors = [state.packed.contiguous(), block_absmax(state).float().contiguous()]
        packed, scales = (t.data_ptr() for t in self.tensors)
        self.weight = _Weight(packed, _CODE.data_ptr(), scales, *state.shape, state.blocksize)
        self.ref = ctypes.byref(self.weight)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied layer has other buffers: it prepares its own call when used

    def __call__(self, x: Tensor, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor | None:
        """x (..., in) @ W.T -> (..., out) in `dtype`, accumulated in float32; plus
        scale * (x @ A.T) @ B.T for `lora` = (A, B.T, scale), float32 contiguous A and B.T.
        None where the kernel refuses (no rows, no memory): `nf4_matmul_reference` then."""
        n_out, n_in = self.shape
        rows = _activations(x, n_in)
        y = torch.empty(*x.shape[:-1], n_out, dtype=_out_dtype(dtype))
        a = b = spans = row_scales = None
        rank, scale = 0, 0.0
        if lora is not None:
            a, b, scale = lora[:3]
            assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
            assert a.shape[1] == n_in and b.shape == (a.shape[0], n_out)
            a, b, rank = a.data_ptr(), b.data_ptr(), a.shape[0]
            if len(lora) == 5:
                if (lora := _per_row(lora, rows.shape[0])) is None:
                    return None
                spans, row_scales = lora[3].data_ptr(), lora[4].data_ptr()
        status = self.call(
            self.ref,
            rows.data_ptr(),
            rows.dtype == torch.bfloat16,
            rows.shape[0],
            y.data_ptr(),
            y.dtype == torch.bfloat16,
            threads(),
            a,
            b,
            rank,
            scale,
            spans,
            row_scales,
            x.dtype == dtype == torch.bfloat16,  # nothing of x lost in bf16 products
        )
        if status != 0:
            return None
        return y if y.dtype == dtype else y.to(dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor | None:
        """The (out, in) weight in `dtype` (float32 or bf16; None for others): the values of
        quant.nf4.dequantize_nf4, an order of magnitude faster than its PyTorch gathers."""
        fn = function("lk_nf4_dequantize", _WEIGHT, ptr, i32, i32)  # out, bf16, threads
        if dtype not in (torch.float32, torch.bfloat16) or fn is None:
            return None
        out = torch.empty(self.shape, dtype=dtype)
        status = fn(self.ref, out.data_ptr(), dtype == torch.bfloat16, threads())
        return out if status == 0 else None


class KernelGroup:
    """Several weights over the same activations in one call, each with its own adapter (or
    None): q, k and v, or gate and up. Per call the C side does what KernelWeight's calls
    would; what it saves is their Python and ctypes cost, most of a small matmul's time."""

    def __init__(self, parts: list[tuple[KernelWeight, LoRA | None]]) -> None:
        assert library() is not None and len({k.shape[1] for k, _ in parts}) == 1
        for _, lora in parts:
            assert lora is None or all(
                t.dtype == torch.float32 and t.is_contiguous() for t in lora[:2]
            )
        self.parts, self.call, n = parts, _matmul_n(), len(parts)
        self.n_in = parts[0][0].shape[1]
        self.weights = (ctypes.c_void_p * n)(*[ctypes.addressof(k.weight) for k, _ in parts])
        self.a = (ctypes.c_void_p * n)(*[lo[0].data_ptr() if lo else None for _, lo in parts])
        self.b = (ctypes.c_void_p * n)(*[lo[1].data_ptr() if lo else None for _, lo in parts])
        self.ranks = (ctypes.c_int64 * n)(*[lo[0].shape[0] if lo else 0 for _, lo in parts])
        self.scales = (ctypes.c_float * n)(*[lo[2] if lo else 0.0 for _, lo in parts])
        self.spans = (ctypes.c_void_p * n)()
        self.row_scales = (ctypes.c_void_p * n)()
        self.outs = (ctypes.c_void_p * n)()

    def __call__(self, x: Tensor, dtype: torch.dtype) -> list[Tensor] | None:
        """x (..., in) -> each weight's (..., out) in `dtype`, as KernelWeight(x, dtype, lora);
        None where the kernel refuses."""
        rows = _activations(x, self.n_in)
        keep = []  # a mixed batch's spans and scales for these rows, alive through the call
        for i, (_, lo) in enumerate(self.parts):
            if lo is not None and len(lo) == 5:
                if (lo := _per_row(lo, rows.shape[0])) is None:
                    return None
                keep.append(lo)
                self.spans[i], self.row_scales[i] = lo[3].data_ptr(), lo[4].data_ptr()
        out_dtype = _out_dtype(dtype)
        ys = [torch.empty(*x.shape[:-1], k.shape[0], dtype=out_dtype) for k, _ in self.parts]
        for i, y in enumerate(ys):
            self.outs[i] = y.data_ptr()
        status = self.call(
            len(ys),
            self.weights,
            rows.data_ptr(),
            rows.dtype == torch.bfloat16,
            rows.shape[0],
            self.outs,
            out_dtype == torch.bfloat16,
            threads(),
            self.a,
            self.b,
            self.ranks,
            self.scales,
            self.spans,
            self.row_scales,
            x.dtype == dtype == torch.bfloat16,
        )
        if status != 0:
            return None
        return ys if out_dtype == dtype else [y.to(dtype) for y in ys]


def _per_row(lora: LoRA, rows: int) -> LoRA | None:
    """A mixed batch's adapters with a span and scale for each of `rows` kernel rows: as they
    are, or repeated for each token of a batch row (a short prompt: (batch, tokens) rows, row
    after row); None where the rows are neither."""
    a, bt, scale, spans, row_scales = lora
    if rows != spans.shape[0]:
        if rows % spans.shape[0]:
            return None
        tokens = rows // spans.shape[0]
        spans, row_scales = (t.repeat_interleave(tokens, dim=0) for t in (spans, row_scales))
    ok = spans.dtype == torch.int64 and row_scales.dtype == torch.float32
    return (a, bt, scale, spans.contiguous(), row_scales.contiguous()) if ok else None


def _activations(x: Tensor, n_in: int) -> Tensor:
    """x as contiguous (rows, in) float32 or bf16, the two dtypes the kernel reads."""
    rows = x.reshape(-1, n_in)
    if rows.dtype not in (torch.float32, torch.bfloat16):
        rows = rows.float()
    return rows.contiguous()


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def nf4_matmul(
    x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None = None
) -> Tensor | None:
    """x (..., in) @ W.T (+ the adapter) in `dtype`, accumulated in float32; None where the
    kernel refuses. Check `supports` first."""
    return KernelWeight(state)(x, dtype, lora)


def nf4_matmul_reference(
    x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None = None
) -> Tensor:
    """What `nf4_matmul` computes, in PyTorch: dequantize, then multiply (float32 sums)."""
    y = F.linear(x.float(), dequantize_nf4(state, torch.float32))
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if lora is not None and len(lora) == 5:  # each row its own adapter's columns and scale
        if (fitted := _per_row(lora, rows)) is None:
            raise ValueError(f"a mixed batch's adapters cover {len(lora[3])} rows, not {rows}")
        a, bt, _, spans, row_scales = fitted
        cols = torch.arange(a.shape[0])
        mask = (cols >= spans[:, :1]) & (cols < spans[:, 1:])  # (rows, sum of ranks)
        t = (x.reshape(-1, x.shape[-1]).float() @ a.T) * (mask * row_scales[:, None])
        y = y + (t @ bt).view(y.shape)
    elif lora is not None:
        a, bt, scale = lora
        y = y + scale * (x.float() @ a.T) @ bt
    return y.to(dtype)
