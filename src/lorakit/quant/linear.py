"""A frozen linear layer whose weight is stored in NF4 (see nf4.py).

What is in here:
- ``NF4Linear``: drop-in replacement for a frozen ``nn.Linear``; the 4-bit weight lives in
  buffers, so it moves with ``.to(device)`` and never shows up in ``parameters()``.
- ``_NF4Matmul``: the autograd function behind it. Forward dequantizes the weight into the
  compute dtype and multiplies; only the packed 4-bit state is saved, and backward dequantizes
  again. That is QLoRA's memory trick: no full-precision weight outlives the matmul.
- ``dequantized_weights``: dequantize each weight once for a whole generation or training
  run instead of per token / per pass, when memory allows.
- Without that cache, a no-grad call of a few rows (a decoding step) multiplies straight from
  the 4-bit codes with the compiled kernel of kernels/nf4_matmul.py where it runs (CPU), or the
  fused backend's (kernels/nf4_backend.py: Triton or bitsandbytes on CUDA).
- On CUDA, quantizing, dequantizing and those matmuls run as fused kernels
  (kernels/nf4_backend.py); every backend gives quant/nf4.py's values bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.kernels import nf4_backend
from lorakit.kernels.nf4_backend import FusedWeight
from lorakit.kernels.nf4_matmul import KernelWeight, LoRA, nf4_matmul_reference, supports
from lorakit.quant.nf4 import NF4State, dequantize_nf4

# Most rows (tokens) a no-grad call sends to the compiled 4-bit kernel (kernels/nf4_matmul.py)
# rather than dequantizing the weight (compiled too) and one bf16 matmul: decoding steps and short
# prompts. SmolLM2's 210 layers, kernel vs dequantize + matmul: 16 rows 22.5 vs 38.7 ms, 32 rows
# 47.1 vs 46.4, 64 rows 97.6 vs 65.2 (a throwaway measurement, not kept in bench/).
KERNEL_ROWS = 32


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T in ``dtype``, W dequantized on the fly; W itself never gets a gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        state: NF4State,
        dtype: torch.dtype,
        cached: Tensor | None = None,
    ) -> Tensor:
        # Save the 4-bit tensors, not the dequantized weight (~4x bigger in bf16, ~8x in fp32).
        # Going through save_for_backward lets autograd check they are not modified in place
        # before backward, and lets torch.utils.checkpoint and saved-tensor hooks see them.
        ctx.save_for_backward(state.packed, state.absmax, state.absmax_scale, state.absmax_code)
        # A weight already dequantized for the whole run (`dequantized_weights`) is reused as it
        # is, in backward too: it lives anyway, so referencing it costs nothing.
        ctx.state, ctx.x_dtype, ctx.cached = state, x.dtype, cached
        # Autocast must not re-cast what we already put in the compute dtype.
        with torch.autocast(x.device.type, enabled=False):
            weight = cached if cached is not None else nf4_backend.dequantize(state, dtype)
            return F.linear(x.to(dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.cached is not None and ctx.cached.dtype == grad_out.dtype:
            with torch.autocast(grad_out.device.type, enabled=False):
                return (grad_out @ ctx.cached).to(ctx.x_dtype), None, None, None
        packed, absmax, absmax_scale, absmax_code = ctx.saved_tensors
        state = dataclasses.replace(
            ctx.state,
            packed=packed,
            absmax=absmax,
            absmax_scale=absmax_scale,
            absmax_code=absmax_code,
        )
        with torch.autocast(grad_out.device.type, enabled=False):
            weight = nf4_backend.dequantize(state, grad_out.dtype)  # (out, in)
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        return grad_x.to(ctx.x_dtype), None, None, None


class NF4Linear(nn.Module):
    """``y = x @ W.T + b`` with W frozen in NF4 (bitsandbytes' layout) and b optional.

    Computes in the autocast dtype when autocast is on, otherwise in ``x.dtype``. The bias is a
    frozen ``nn.Parameter`` (``requires_grad=False``), as in a QLoRA base model; set
    ``requires_grad`` on it to train it.
    """

    def __init__(self, state: NF4State, bias: Tensor | None = None) -> None:
        super().__init__()
        _check_2d(state.shape)
        self.out_features, self.in_features = state.shape
        # The non-tensor part of the state; the tensors are buffers, so .to(device) moves them.
        self.weight_shape = state.shape
        self.weight_dtype = state.dtype
        self.blocksize = state.blocksize
        self.blocksize2 = state.blocksize2
        self.offset = state.offset
        # float32 tensors are kept as their int32 bit patterns: model.to(torch.bfloat16) and
        # model.half() cast every floating-point buffer, which would silently round the scales.
        self.register_buffer("packed", state.packed)
        self.register_buffer("absmax", _as_bits(state.absmax))
        self.register_buffer("absmax_scale", _as_bits(state.absmax_scale))
        self.register_buffer("absmax_code", _as_bits(state.absmax_code))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> NF4Linear:
        """Quantize a (out, in) weight (on its own device: a fused kernel on CUDA) into a new
        NF4Linear."""
        _check_2d(weight.shape)
        return cls(nf4_backend.quantize(weight, blocksize, double_quant), bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Quantize an ``nn.Linear``; the bias is copied as it is."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_weight(linear.weight.detach(), bias, blocksize, double_quant)

    @property
    def state(self) -> NF4State:
        """The NF4State of the weight, built from the current buffers (so on their device)."""
        packed, absmax, scale = self.packed, self.absmax, self.absmax_scale
        if self.__dict__.get("in_blocks"):  # as_blocks: the flat tensors are their first values
            numel, blocks = self.weight_shape.numel(), self._blocks()
            packed = packed.reshape(-1)[: (numel + 1) // 2]
            absmax = absmax.reshape(-1)[:blocks]
            if scale is not None:
                scale = scale.reshape(-1)[: -(-blocks // self.blocksize2)]
        return NF4State(
            packed=packed,
            absmax=_from_bits(absmax),
            shape=self.weight_shape,
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            offset=self.offset,
            absmax_scale=_from_bits(scale),
            absmax_code=_from_bits(self.absmax_code),
            blocksize2=self.blocksize2,
        )

    def _blocks(self) -> int:
        return -(-self.weight_shape.numel() // self.blocksize)

    def as_blocks(self) -> None:
        """Keep the 4-bit weight as frozen parameters whose rows are whole super-blocks
        (`blocksize2` blocks: 16,384 weights, 8 KB of codes, 256 block scales and one scale of
        the scales at the defaults), the last one padded: what FSDP2 (training.sharding) shards
        over the ranks, cutting along rows, so that a shard never splits a block. The codes stay
        in bitsandbytes' layout; `state` reads the first values. Irreversible; the compiled
        decoding kernel and the weight cache stay off (a shard is not the whole weight)."""
        if self.__dict__.get("in_blocks"):
            return
        per, rows = self.blocksize2, -(-self._blocks() // self.blocksize2)

        def rows_of(t: Tensor, width: int) -> nn.Parameter:
            flat = torch.zeros(rows * width, dtype=t.dtype, device=t.device)
            flat[: t.numel()] = t.reshape(-1)
            return nn.Parameter(flat.view(rows, width), requires_grad=False)

        blocked = {
            "packed": rows_of(self.packed, per * self.blocksize // 2),
            "absmax": rows_of(self.absmax, per),
        }
        if self.absmax_scale is not None:
            blocked["absmax_scale"] = rows_of(self.absmax_scale, 1)
        for name, param in blocked.items():
            del self._buffers[name]
            self.register_parameter(name, param)
        self.__dict__["in_blocks"] = True
        self.__dict__.pop("_kernel_weight", None)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight in ``dtype`` (default: the dtype it was quantized from); from
        the compiled kernel where it runs (CPU, float32 or bf16: 10x+ faster than PyTorch's
        gathers, the same values) or the fused backend (CUDA), else from dequantize_nf4."""
        dtype = dtype or self.weight_dtype
        if self.__dict__.get("in_blocks"):  # gathered by FSDP for this pass: the fused backend's
            return nf4_backend.dequantize(self.state, dtype)
        kernel = self._kernel(self.packed.device)
        if kernel is not None and (weight := kernel.dequantize(dtype)) is not None:
            return weight
        return dequantize_nf4(self.state, dtype)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def forward(self, x: Tensor) -> Tensor:
        dtype = self._compute_dtype(x)
        cached = self.__dict__.get("_cached_weight")
        if cached is not None and cached.dtype != dtype:
            cached = None
        if cached is not None and not (torch.is_grad_enabled() and x.requires_grad):
            y = F.linear(x.to(dtype), cached)  # decoding: the weight dequantized once
        elif torch.is_grad_enabled():
            y = _NF4Matmul.apply(x, self.state, dtype, cached)
        elif (y := self.decode(x)) is None:
            # No grad, more rows than a decoding step: the compiled dequantization. Not in
            # training: at 1.1B without the weight cache it raised the step's peak RSS by
            # ~0.7 GB for a speed within noise (bench/train_throughput.py --random-1b).
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(dtype), self.dequantized_weight(dtype))
        # Added outside the autograd function so that a bias made trainable gets its gradient.
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def decode(self, x: Tensor, lora: LoRA | None = None) -> Tensor | None:
        """A decoding step (no grad, eval mode, at most KERNEL_ROWS rows) straight from the
        4-bit codes with the compiled kernel, `lora` added in the same call; None (and nothing
        computed) where the kernel does not run or a cached dequantized weight is there."""
        if torch.is_grad_enabled() or x.numel() > KERNEL_ROWS * x.shape[-1]:
            return None
        call = self.decode_call(lora, bias=False)  # without the bias, as F.linear's weight
        return None if call is None else call(x)

    def decode_call(self, lora: LoRA | None = None, bias: bool = True) -> KernelCall | None:
        """The kernel's call for decoding steps (x of at most KERNEL_ROWS rows, no grad), with
        `lora` and the bias added, or None where the kernel does not run (training mode: a
        no-grad pass of reentrant checkpointing keeps autograd's path) or a cached dequantized
        weight is there. It holds as long as the layer's buffers and cache stay as they are."""
        if (
            self.training
            or "_cached_weight" in self.__dict__
            or (kernel := self._kernel(self.packed.device)) is None
        ):
            return None
        return KernelCall(self, kernel, lora, self.bias if bias else None)

    def _kernel(self, device: torch.device) -> KernelWeight | FusedWeight | None:
        """The prepared call for this weight: the fused backend's (CUDA, or forced by
        LORAKIT_NF4_BACKEND), else the compiled CPU kernel's, or None where neither runs;
        prepared again if the buffers moved (`.to(device)`) or the backend changed."""
        if self.__dict__.get("in_blocks"):
            return None
        name = nf4_backend.backend(device)
        key = (device, self.packed.data_ptr(), name)
        cached = self.__dict__.get("_kernel_weight")
        if cached is None or cached[0] != key:
            state = self.state
            if name != "torch":
                kernel = FusedWeight(state, name)
            else:
                kernel = KernelWeight(state) if supports(state, device) else None
            cached = (key, kernel)
            self.__dict__["_kernel_weight"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.offset is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 blocksize={self.blocksize}{dq}"
        )


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One NF4 layer's decoding step through the kernel: x @ W.T, plus the adapter `lora`
    (in the same call) and `bias`, in the layer's compute dtype. Its parts are open so that
    projections reading the same input can be run as one `kernels.nf4_matmul.KernelGroup`."""

    layer: NF4Linear
    kernel: KernelWeight | FusedWeight
    lora: LoRA | None
    bias: Tensor | None
    # x -> a float32 term added to the float32 product before it is rounded, as the kernel adds
    # `lora` (lora.layer: the per-row adapters of a batch mixing several)
    extra: Callable[[Tensor], Tensor] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        dtype = self.layer._compute_dtype(x)
        wide = self.out_dtype(dtype)
        y = self.kernel(x, wide, self.lora)
        if y is None:  # the kernel refused (no memory for its buffers): the same in PyTorch
            y = nf4_matmul_reference(x, self.layer.state, wide, self.lora)
        return self.finish(x, y, dtype)

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What the kernel should return: float32 where an extra term is still to come."""
        return torch.float32 if self.extra is not None else dtype

    def finish(self, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The kernel's output `y` for input `x`: the extra term added, rounded to `dtype`,
        then the bias."""
        if self.extra is not None:
            y = y + self.extra(x)
        y = y.to(dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def decodes_from_codes(model: nn.Module, device: torch.device) -> bool:
    """Whether every NF4 layer of the model can decode with the compiled CPU 4-bit kernel.
    (Not the GPU's fused kernels: whether they beat a bf16 copy is not measured yet, so on
    CUDA the weight cache rule stays "when it fits".)"""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return bool(layers) and all(isinstance(m._kernel(device), KernelWeight) for m in layers)


def release_kernels(model: nn.Module) -> None:
    """Drop each NF4 layer's prepared kernel call: its float32 block scales are 1/16 byte a
    weight (0.4 GB for a 7B model), which a training step, dequantizing in PyTorch, never
    uses. The next no-grad forward prepares them again (block scales only: well under 1 s)."""
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.__dict__.pop("_kernel_weight", None)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device. CPU: Linux's MemAvailable (free pages plus the page cache it
    can drop), else free pages; free pages alone swing by gigabytes with recent file reads, and
    decisions made on them (weight cache on or off) changed from one run to the next."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def dequantized_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What `dequantized_weights(model, dtype)` would hold: every NF4 weight in `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(
        m.in_features * m.out_features * size for m in model.modules() if isinstance(m, NF4Linear)
    )


def use_weight_cache(
    model: nn.Module, dtype: torch.dtype, device: torch.device, setting: str = "auto"
) -> bool:
    """The rule for keeping the frozen base dequantized while generating or serving
    (`dequantized_weights`; training decides in training.memory). "on" / "off": as set.
    "auto": never where the compiled kernel decodes from the 4-bit codes (it is faster than the
    dequantized copy: BENCHMARKS.md, generation), else when the copy takes under half of the
    device's free memory."""
    if setting in ("on", "off"):
        return setting == "on"
    if decodes_from_codes(model, device):
        return False
    return dequantized_bytes(model, dtype) < free_memory(device) / 2


@contextmanager
def dequantized_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, NF4 layers use a weight dequantized once instead of once per use.

    Token-by-token decoding would otherwise dequantize every weight for every token, and
    training twice per forward/backward pass. It costs the model's size in `dtype` for as long
    as the block lasts (NF4 stays the stored format; gradients are the same).
    """
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    try:
        for layer in layers:
            layer.__dict__["_cached_weight"] = layer.dequantized_weight(dtype)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_cached_weight", None)


def _check_2d(shape: torch.Size) -> None:
    if len(shape) != 2:
        raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(shape)}")


def _as_bits(t: Tensor | None) -> Tensor | None:
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _from_bits(t: Tensor | None) -> Tensor | None:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t
