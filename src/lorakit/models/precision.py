"""The compute precision: which dtype a device computes in, and autocast to it."""

from __future__ import annotations

import torch


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
