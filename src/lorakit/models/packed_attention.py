"""Attention over packed rows that skips the blocks between different examples.

A packed row holds several examples; the block-diagonal mask keeps them apart, but a kernel
given a mask still computes every (query, key) pair of the row. Attending example by example
with the causal flag computes only sum(L_i^2) / 2 pairs instead of T^2: for 512-token rows of
~170-token examples, a sixth. The result is the same as the masked attention (tested).

On CPU each example's attention is computed by `SegmentAttention` (explicit scores with bf16
matmuls, a compiled causal softmax that skips the hidden keys, probabilities recomputed in
backward so nothing of size L^2 is kept): at 100-300
tokens it runs 2-3x faster than the CPU flash kernel, whose backward is the slow part. Longer
examples and features it lacks (dropout, logit softcapping, attention sinks) go to sdpa.

On a GPU the saved arithmetic is not worth a kernel launch per example: there one masked sdpa
call per layer does the whole batch (`bench/step_profile.py` on an H200, SmolLM2-135M's shape,
16 rows of 512 tokens: 4.9-6.0 s a step example by example, 0.21 s masked).

`enable_packed_attention(model)` registers the function with transformers' attention registry
and switches a model that uses sdpa to it; a forward pass then uses it when given
`segments=...` (from `segments_of`) and falls back to plain sdpa otherwise (generation,
unpacked batches, or models whose attention does not forward extra keyword arguments).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorakit.kernels.attention import causal_softmax

PACKED = "lorakit_packed"
Segments = list[list[tuple[int, int]]]  # per row: (start, end) of each example, padding last


def attends_by_example(model: nn.Module, device: torch.device) -> bool:
    """Whether a forward pass of `model` on `device` should be given `segments=`."""
    return device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == PACKED


def segments_of(seq_ids: torch.Tensor) -> Segments:
    """(B, T) example index per token (-1 = padding) -> per row the runs of equal index."""
    out: Segments = []
    for row in seq_ids.tolist():
        runs, start = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                runs.append((start, t))
                start = t
        out.append(runs)
    return out


EXPLICIT_MAX = 512  # longest example given to SegmentAttention; beyond it flash is faster


@functools.lru_cache(maxsize=8)
def _mask(size: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal (and sliding-window) mask; its top-left n x n corner serves any n <= size."""
    hidden = torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)
    if window is not None:
        hidden |= torch.ones_like(hidden).tril_(-window)  # keys window or more tokens back
    return torch.zeros(size, size, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def _probabilities(q_scaled, k, window: int | None) -> torch.Tensor:  # noqa: ANN001
    """Attention probabilities (Hkv, G*L, L) in q's dtype."""
    hk, gl, _ = q_scaled.shape
    n = k.shape[1]
    s = torch.bmm(q_scaled, k.transpose(1, 2))
    if causal_softmax(s, window) is not None:  # bf16 on CPU: the hidden keys skipped
        return s
    size = max(EXPLICIT_MAX, 1 << (n - 1).bit_length())
    s.view(hk, gl // n, n, n).add_(_mask(size, window, s.dtype, s.device)[:n, :n])
    return torch.softmax(s, dim=-1)


BUCKET = 16  # SegmentAttention pads each example to a multiple of this many tokens


def _padded(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., L, D) -> contiguous (..., n, D), zeros after the first L rows."""
    if t.shape[-2] == n:
        return t.contiguous()
    out = t.new_zeros(*t.shape[:-2], n, t.shape[-1])
    out[..., : t.shape[-2], :] = t
    return out


class SegmentAttention(torch.autograd.Function):
    """Causal attention within one example: q (Hkv, G, L, D), query heads grouped by the key/value
    head they share; k, v (Hkv, L, D) -> (Hkv, G, L, D). Probabilities are recomputed in backward.

    L is padded with zeros up to a multiple of BUCKET. The causal mask hides the padded keys from
    every real query, and the padded queries' rows are dropped, so the result is unchanged. What
    it buys is few distinct matmul shapes: oneDNN builds a primitive for each new one and keeps
    1024, and examples of every length from 1 to 512 tokens times 7 matmuls per example kept
    evicting them (the dense layers' too), rebuilding at a cost of ~1/3 of the matmul's time."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, window: int | None):  # noqa: ANN001
        hk, groups, n, dim = q.shape
        size = -(-n // BUCKET) * BUCKET
        with torch.autocast(q.device.type, enabled=False):
            q_scaled = q.new_zeros(hk, groups, size, dim)
            torch.mul(q, scale, out=q_scaled[:, :, :n])
            q_scaled = q_scaled.view(hk, groups * size, dim)
            k, v = _padded(k, size), _padded(v, size)
            out = torch.bmm(_probabilities(q_scaled, k, window), v)
        ctx.save_for_backward(q_scaled, k, v)
        ctx.scale, ctx.window, ctx.n = scale, window, n
        return out.view(hk, groups, size, -1)[:, :, :n]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q_scaled, k, v = ctx.saved_tensors
        n, (hk, size, _) = ctx.n, k.shape
        grad_out = _padded(grad_out, size).view(hk, -1, grad_out.shape[-1])
        p = _probabilities(q_scaled, k, ctx.window)
        grad_v = torch.bmm(p.transpose(1, 2), grad_out)[:, :n]
        grad_p = torch.bmm(grad_out, v.transpose(1, 2))
        grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
        grad_q = torch.bmm(grad_s, k).mul_(ctx.scale).view(hk, -1, size, k.shape[-1])[:, :, :n]
        grad_k = torch.bmm(grad_s.transpose(1, 2), q_scaled)[:, :n]
        return grad_q, grad_k, grad_v, None, None


def _explicit_ok(query, kwargs: dict) -> bool:  # noqa: ANN001
    return (
        query.device.type == "cpu"
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and not kwargs.get("output_attentions")
    )


def _segment(module, q, k, v, explicit: bool, **kwargs):  # noqa: ANN001
    """One example's causal attention: (1, H, L, D) inputs -> (1, L, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, window = q.shape[2], kwargs.get("sliding_window")
    if not explicit or (n > EXPLICIT_MAX and (window is None or window >= n)):
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
    scale = kwargs.get("scaling") or dim**-0.5
    grouped = q[0].view(kv_heads, heads // kv_heads, n, dim)
    v = v[0].to(q.dtype)
    out = SegmentAttention.apply(grouped, k[0].to(q.dtype), v, scale, window)
    return out.reshape(heads, n, v.shape[-1]).transpose(0, 1)[None]


def packed_attention(module, query, key, value, attention_mask, segments=None, **kwargs):  # noqa: ANN001
    """transformers attention interface: (B, H, T, D) inputs -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        segments is None
        or query.device.type != "cpu"
        or query.shape[2] != key.shape[2]
        or len(segments) != query.shape[0]
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    explicit = _explicit_ok(query, kwargs)
    rows = []
    # split/unbind, not slicing: each slice's backward would fill a zero tensor of the whole
    # input's size, once per example
    for runs, *row in zip(segments, *(t.unbind(0) for t in (query, key, value)), strict=True):
        lengths = [e - s for s, e in runs]
        pieces = zip(*(t[None].split(lengths, dim=2) for t in row), strict=True)
        parts = [_segment(module, q, k, v, explicit, **kwargs) for q, k, v in pieces]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0), None


def enable_packed_attention(model: nn.Module) -> bool:
    """Switch a model on sdpa attention to `packed_attention`; False if it stays as it was."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers too old for pluggable attention
        return False
    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(PACKED)
    except (AttributeError, ValueError):
        return False
    return model.config._attn_implementation == PACKED
