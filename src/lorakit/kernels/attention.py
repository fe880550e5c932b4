"""Attention pieces in C, bf16: one new query's attention over a KV cache (decoding), and the
causal softmax of training's per-example attention (models.packed_attention)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, f32, function, i32, i64, ptr, threads


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, t: int, mask: Tensor | None, scale: float
) -> Tensor | None:
    """One new position per row: q (B, H, 1, D) over the first t positions of the bf16 caches
    keys, values (B, Hkv, L, D), `mask` (B, >= t) bool or None -> (B, 1, H, D) in bf16; None
    where it does not apply (other dtypes or layouts, a head size not a multiple of 32)."""
    # q, batch, heads, kv heads, head dim, k, v, cache length, positions, mask, mask stride,
    # scale, out, threads
    fn = function(
        "lk_decode_attention", ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, f32, ptr, i32
    )
    b, heads, one, d = q.shape
    if (
        fn is None
        or one != 1
        or not bf16_cpu(q, keys, values)
        or d % 32
        or not (keys.is_contiguous() and values.is_contiguous())
        or (mask is not None and (mask.dtype != torch.bool or mask.stride(-1) != 1))
    ):
        return None
    q = q.contiguous()
    out = torch.empty(b, 1, heads, d, dtype=torch.bfloat16)
    status = fn(
        q.data_ptr(),
        b,
        heads,
        keys.shape[1],
        d,
        keys.data_ptr(),
        values.data_ptr(),
        keys.shape[2],
        t,
        None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0),
        scale,
        out.data_ptr(),
        threads(),
    )
    return out if status == 0 else None


def decode_attention_reference(
    q: Tensor, keys: Tensor, values: Tensor, t: int, mask: Tensor | None, scale: float
) -> Tensor:
    """What `decode_attention` computes, in PyTorch (float32 scores and softmax)."""
    b, heads, _, d = q.shape
    k = keys[:, :, :t].float().repeat_interleave(heads // keys.shape[1], dim=1)
    v = values[:, :, :t].float().repeat_interleave(heads // keys.shape[1], dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # (B, H, 1, t)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :t], float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, 1, D)
    return out.transpose(1, 2).bfloat16()


def causal_softmax(scores: Tensor, window: int | None) -> Tensor | None:
    """Softmax in place over the last dim of bf16 scores (..., G * n, n), row r being query
    position r % n: later keys (and keys `window` or more positions back) get 0 and are not
    computed. Returns scores, or None where it does not apply (other dtypes, no library)."""
    fn = function("lk_causal_softmax_bf16", ptr, i64, i64, i64, i32)  # s, rows, n, window, thr
    if fn is None or not bf16_cpu(scores) or not scores.is_contiguous():
        return None
    n = scores.shape[-1]
    status = fn(scores.data_ptr(), scores.numel() // n, n, window or 0, threads())
    return scores if status == 0 else None


def causal_softmax_reference(scores: Tensor, window: int | None) -> Tensor:
    """What `causal_softmax` computes, in PyTorch (float32 inside), not in place."""
    n = scores.shape[-1]
    query = torch.arange(scores.shape[-2])[:, None] % n
    key = torch.arange(n)[None, :]
    hidden = key > query
    if window:
        hidden |= key <= query - window
    return scores.float().masked_fill(hidden, float("-inf")).softmax(-1).to(scores.dtype)
