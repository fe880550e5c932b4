"""The compute precision: which dtype a device computes in, and autocast to it."""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the hardware computes it fast (AVX512-BF16/AMX CPUs, recent GPUs), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """bf16/fp16 autocast on `device`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def resolve_device(name: str) -> torch.device:
    """The device a --device setting names (auto: a CUDA GPU if one is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LorakitError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise LorakitError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)
