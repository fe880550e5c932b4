"""Which implementation runs NF4 (de)quantization and decoding matmuls for a tensor: our Triton
kernels (triton_nf4.py, triton_nf4_matmul.py), bitsandbytes' (bnb_nf4.py), or the PyTorch
reference (quant/nf4.py), which every other one equals bit for bit.

The rule (`backend`): CUDA tensors take Triton where it imports, else bitsandbytes where it
imports, else PyTorch; every other device keeps what it had (PyTorch, and the compiled CPU
kernels that NF4Linear calls itself). `LORAKIT_NF4_BACKEND=torch|triton|bnb` forces one for
testing and benchmarks (`auto`, the default, is the rule); forced Triton runs CPU tensors only
under TRITON_INTERPRET=1. A state a backend does not take (an odd block size, say) goes to
PyTorch. In `auto`, a backend that fails at run time (a GPU its compiler does not know) is
dropped with one warning and PyTorch takes over; a forced one raises.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.kernels import bnb_nf4
from lorakit.kernels.nf4_matmul import LoRA
from lorakit.quant.nf4 import NF4State, check_quantizable, dequantize_nf4, quantize_nf4

ENV = "LORAKIT_NF4_BACKEND"
BACKENDS = ("torch", "triton", "bnb")
_dropped: set[str] = set()  # backends that failed at run time in `auto` (warned once)


@functools.cache
def _triton() -> ModuleType | None:
    """lorakit.kernels.triton_nf4, imported at first need (importing triton takes a while),
    or None where triton does not import."""
    try:
        return importlib.import_module("lorakit.kernels.triton_nf4")
    except ImportError:
        return None


def _setting() -> str:
    setting = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if setting not in ("auto", *BACKENDS):
        raise LorakitError(f"{ENV}={setting!r} is not a backend; use auto, torch, triton or bnb")
    return setting


def backend(device: torch.device) -> str:
    """ "torch", "triton" or "bnb": what runs NF4 tensors on `device` (see the module docstring)."""
    setting = _setting()
    if setting == "auto":
        if device.type != "cuda":
            return "torch"
        if "triton" not in _dropped and _triton() is not None:
            return "triton"
        return "bnb" if "bnb" not in _dropped and bnb_nf4.available() else "torch"
    if setting == "triton":
        module = _triton()
        if module is None:
            raise LorakitError(f"{ENV}=triton but triton does not import; pip install triton")
        if device.type != "cuda" and not module.interpreting():
            raise LorakitError(
                f"{ENV}=triton runs {device.type} tensors only under TRITON_INTERPRET=1"
            )
    if setting == "bnb" and not bnb_nf4.available():
        raise LorakitError(f"{ENV}=bnb but bitsandbytes is not installed; pip install bitsandbytes")
    return setting


def _fused(name: str, run, fallback):  # noqa: ANN001, ANN202
    """run() on backend `name`; in `auto`, where it fails, warn once, drop the backend and
    return fallback() (PyTorch)."""
    try:
        return run()
    except Exception as error:
        if _setting() != "auto":
            raise
        _dropped.add(name)
        warnings.warn(
            f"lorakit: the {name} NF4 kernels failed ({type(error).__name__}: {error}); "
            f"using PyTorch's (set {ENV}=torch to skip them)",
            RuntimeWarning,
            stacklevel=3,
        )
        return fallback()


def dequantize(state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """`dequantize_nf4(state, dtype)` by the backend of the state's device: the same values."""
    dtype = dtype or state.dtype
    name = backend(state.packed.device)
    reference = functools.partial(dequantize_nf4, state, dtype)
    if name == "triton" and (triton := _triton()).supports(state, dtype):
        return _fused(name, functools.partial(triton.dequantize, state, dtype), reference)
    if name == "bnb" and bnb_nf4.supports(state, dtype):
        return _fused(name, functools.partial(bnb_nf4.dequantize, state, dtype), reference)
    return reference()


def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """`quantize_nf4(weight, blocksize, double_quant)` by the backend of the weight's device."""
    check_quantizable(weight, blocksize)  # bad input raises here, not as a failed backend
    name = backend(weight.device)
    reference = functools.partial(quantize_nf4, weight, blocksize, double_quant)
    if name == "triton":
        run = functools.partial(_triton().quantize, weight, blocksize, double_quant)
        return _fused(name, run, reference)
    if name == "bnb" and blocksize in bnb_nf4.BLOCKSIZES:
        run = functools.partial(bnb_nf4.quantize, weight, blocksize, double_quant)
        return _fused(name, run, reference)
    return reference()


def _matmul(name: str, x: Tensor, state: NF4State, dtype: torch.dtype, lora: LoRA | None):
    """x @ W.T (+ the adapter) in `dtype` straight from the codes on backend `name`, or None
    where it does not take the call."""
    if name == "triton":
        from lorakit.kernels import triton_nf4_matmul

        if triton_nf4_matmul.supports(x, state, dtype):
            return triton_nf4_matmul.matmul(x, state, dtype, lora)
        return None
    if name == "bnb" and bnb_nf4.supports(state, dtype) and len(state.shape) == 2:
        y = bnb_nf4.matmul(x, state, dtype)
        return y if lora is None else y + _lora(x, lora).to(y.dtype)
    return None


def _lora(x: Tensor, lora: LoRA) -> Tensor:
    a, bt, scale = lora
    return scale * (x.float() @ a.float().T) @ bt.float()


class FusedWeight:
    """One NF4 weight's calls on a fused backend, with the interface of the compiled CPU
    kernel's `nf4_matmul.KernelWeight` (which NF4Linear uses on CPU): `dequantize(dtype)` and
    `(x, dtype, lora)` -> x @ W.T (+ the adapter) for a decoding step."""

    def __init__(self, state: NF4State, name: str) -> None:
        self.state, self.name = state, name

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.state, dtype)

    def __call__(self, x: Tensor, dtype: torch.dtype, lora: LoRA | None = None) -> Tensor:
        """x (..., in) @ W.T -> (..., out) in `dtype`, plus scale * (x @ A.T) @ B.T for `lora`
        = (A, B.T, scale): from the codes where the backend has a matmul for this call, else
        dequantized first."""

        def dequantized() -> Tensor:
            y = F.linear(x.to(dtype), self.dequantize(dtype))
            return y if lora is None else y + _lora(x, lora).to(dtype)

        run = functools.partial(_matmul, self.name, x, self.state, dtype, lora)
        y = _fused(self.name, run, dequantized)
        return dequantized() if y is None else y
