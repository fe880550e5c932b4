"""bitsandbytes' CUDA kernels on lorakit's NF4 tensors, when bitsandbytes is installed.

Our NF4 layout is bitsandbytes' bit for bit (quant/nf4.py), so an `NF4State` and a
`bitsandbytes.functional.QuantState` are the same tensors under other names: `quant_state`
relabels ours as theirs (nothing is copied), `from_quant_state` theirs as ours. Then
`dequantize_4bit` dequantizes our weights and `matmul_4bit` multiplies a decoding step's rows
straight from our codes. bitsandbytes stays optional: nothing here is imported unless a
caller asks for this backend (kernels/nf4_backend.py), and CPU users never need it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from lorakit.quant.nf4 import NF4_CODE, NF4State, check_quantizable

# Block sizes bitsandbytes' 4-bit kernels take (0.45 and later); 256 values per scale when
# double-quantized.
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def available() -> bool:
    """Whether bitsandbytes can be imported (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def supports(state: NF4State, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' kernels take this state (its block sizes and dtypes)."""
    return (
        state.blocksize in BLOCKSIZES
        and state.blocksize2 == 256
        and state.packed.dtype == torch.uint8
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


@functools.cache
def _code(device: torch.device) -> Tensor:
    """NF4_CODE on `device`, copied there once (read-only)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32).to(device)


def quant_state(state: NF4State, dtype: torch.dtype | None = None):  # noqa: ANN201
    """bitsandbytes' QuantState for our state (the same tensors); `dtype` is the dtype its
    dequantization gives (default: the state's own)."""
    from bitsandbytes.functional import QuantState

    device = state.packed.device
    nested = None
    if state.double_quant:
        nested = QuantState(
            absmax=state.absmax_scale,
            code=state.absmax_code,
            blocksize=state.blocksize2,
            dtype=torch.float32,
        )
    return QuantState(
        absmax=state.absmax,
        shape=state.shape,
        code=_code(device),
        blocksize=state.blocksize,
        quant_type="nf4",
        dtype=dtype or state.dtype,
        # torch.full, not torch.tensor: a fill kernel, where a copy from the host would wait
        # for the GPU on every call.
        offset=None
        if nested is None
        else torch.full((), state.offset, dtype=torch.float32, device=device),
        state2=nested,
    )


def from_quant_state(packed: Tensor, qs) -> NF4State:  # noqa: ANN001
    """Our NF4State for a bitsandbytes (packed, QuantState) pair: the same tensors, relabelled.
    bitsandbytes keeps packed as (n_bytes, 1) and the double-quant offset as a 0-d tensor."""
    nested = qs.state2 is not None
    return NF4State(
        packed=packed.view(torch.uint8).reshape(-1),
        absmax=qs.absmax,
        shape=qs.shape,
        dtype=qs.dtype,
        blocksize=qs.blocksize,
        offset=qs.offset.item() if nested else None,
        absmax_scale=qs.state2.absmax if nested else None,
        absmax_code=qs.state2.code if nested else None,
        blocksize2=qs.state2.blocksize if nested else 256,
    )


def dequantize(state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """bitsandbytes' `dequantize_4bit` of our state: on CUDA, `quant.nf4.dequantize_nf4`'s
    values bit for bit (code * absmax in float32, rounded once, as ours)."""
    from bitsandbytes.functional import dequantize_4bit

    out = dequantize_4bit(state.packed.view(-1, 1), quant_state(state, dtype))
    return out.reshape(state.shape)  # its CPU kernel gives (1, n) for a 1-D shape


def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """bitsandbytes' `quantize_4bit` as our state. On CUDA it rounds exactly to nearest like
    `quant.nf4.quantize_nf4`; its native CPU kernel approximates the 8-bit double
    quantization (tests/test_nf4.py, test_double_quant_equals_bnb)."""
    from bitsandbytes.functional import quantize_4bit

    check_quantizable(weight, blocksize)
    packed, qs = quantize_4bit(
        weight.detach(), blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return from_quant_state(packed, qs)


def matmul(x: Tensor, state: NF4State, dtype: torch.dtype) -> Tensor:
    """x (..., in) @ W.T in `dtype` with bitsandbytes' 4-bit matmul (its GEMV for one row), no
    grad: a decoding step straight from the codes."""
    import bitsandbytes

    with torch.no_grad():
        return bitsandbytes.matmul_4bit(
            x.to(dtype), state.packed.view(-1, 1).t(), quant_state(state, dtype)
        )
