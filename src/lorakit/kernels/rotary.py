"""The rotary embedding in C, bf16: training's pass over (batch, t, heads, d) each way, and a
decoding step's rotation with its keys and values written into the KV cache.

Both give the values of transformers' bf16 `x * cos + rotate_half(x) * sin`, bit for bit.
`RopeFunction` is the autograd function for training (only cos and sin kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, function, i32, i64, ptr, threads


def _forward():  # noqa: ANN202
    # x, batch, t, heads, d, cos, sin, cos/sin batch stride (in rows of t), out, backward, thr
    return function("lk_rope_bf16", ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, i32, i32)


def rope_applies(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rope` takes these: bf16 on CPU, x (batch, heads, t, d) with d even, cos and sin
    (batch or 1, t, d), the library built."""
    if not bf16_cpu(x, cos, sin) or x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    b, _, t, d = x.shape
    return (
        d % 2 == 0 and cos.shape[1:] == (t, d) and cos.shape[0] in (1, b) and _forward() is not None
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool = False) -> Tensor | None:
    """The rotary embedding of bf16 x (batch, heads, t, d), laid out (batch, t, heads, d) as a
    projection's output viewed per head: x * cos + rotate_half(x) * sin for cos, sin (batch or
    1, t, d), rounded as PyTorch's bf16 operations are; with `backward`, x being the output's
    gradient, the gradient of the input. The result has x's layout; None where it does not
    apply (other dtypes or layouts, no library)."""
    if not rope_applies(x, cos, sin):
        return None
    fn = _forward()
    b, h, t, d = x.shape
    rows = x.transpose(1, 2).contiguous()  # a projection's output: already so, no copy
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(rows)
    status = fn(
        rows.data_ptr(), b, t, h, d, cos.data_ptr(), sin.data_ptr(), cos.shape[0] // b,
        out.data_ptr(), int(backward), threads(),
    )  # fmt: skip
    return out.transpose(1, 2) if status == 0 else None


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' arithmetic: x * cos + rotate_half(x) * sin, cos and sin (batch or 1, t, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    pos: int,
) -> bool:
    """One new position per row: rotate q (B, 1, H, D) in place and write the rotated k and v
    (B, 1, Hkv, D) at `pos` of the caches (B, Hkv, L, D); cos, sin (B, 1, D) with sin's first
    half negated. The values of transformers' bf16 rotary arithmetic, bit for bit. False (and
    nothing done) where it does not apply: other dtypes or layouts, no library."""
    # q, batch, heads, kv heads, head dim, k, v, cos, sin, key cache, value cache, length, pos
    fn = function("lk_rope_cache", ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64)
    b, one, heads, d = q.shape
    if (
        fn is None
        or one != 1
        or not bf16_cpu(q, k, v, cos, sin, keys, values)
        or not all(t.is_contiguous() for t in (q, k, v, cos, sin, keys, values))
        or cos.numel() != b * d
        or sin.numel() != b * d
    ):
        return False
    status = fn(
        q.data_ptr(),
        b,
        heads,
        keys.shape[1],
        d,
        k.data_ptr(),
        v.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.shape[2],
        pos,
    )
    return status == 0


class RopeFunction(torch.autograd.Function):
    """`rope` forward and backward; only cos and sin kept. Check `rope_applies` first."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001
        out = rope(x, cos, sin)
        if out is None:
            raise RuntimeError("the compiled rotary embedding refused its input")
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        dx = rope(dy, cos, sin, backward=True)
        if dx is None:
            raise RuntimeError("the compiled rotary embedding refused its gradient")
        return dx, None, None
