"""kernels.rotary: the rotary embedding in bf16, transformers' arithmetic bit for bit (and
rope_reference's), forward and backward for training and a decoding step's rotation with its
KV-cache write; and what it does not take it declines."""

import pytest
import torch
from conftest import needs_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorakit.kernels.rotary import rope, rope_applies, rope_cache, rope_reference


def _projected(b: int, t: int, heads: int, d: int, cos_batch: int, seed: int):  # noqa: ANN202
    """x (b, heads, t, d) viewed from a projection's (b, t, heads * d), and cos, sin."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, heads * d, generator=gen).bfloat16().view(b, t, heads, d)
    cos, sin = (torch.randn(cos_batch, t, d, generator=gen).bfloat16() for _ in "cs")
    return x.transpose(1, 2), cos, sin


@needs_kernel
@pytest.mark.parametrize(
    "b, t, heads, d, cos_batch",
    [(1, 512, 9, 64, 1), (2, 7, 4, 128, 2), (2, 7, 4, 64, 1), (1, 5, 2, 6, 1)],
)  # many rows (threads); batches with and without their own positions; a head too small to vector
def test_rope_is_transformers_bit_for_bit_both_ways(b, t, heads, d, cos_batch):
    x, cos, sin = _projected(b, t, heads, d, cos_batch, seed=t + d)
    assert rope_applies(x, cos, sin)
    leaf = x.detach().requires_grad_(True)
    want = rope_reference(leaf, cos, sin)
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    want.backward(dy)
    got = rope(x, cos, sin)
    assert got.shape == x.shape and torch.equal(got, want.detach())
    assert torch.equal(got, apply_rotary_pos_emb(x, x, cos, sin)[0])
    assert torch.equal(rope(dy, cos, sin, backward=True), leaf.grad)


@needs_kernel
def test_what_rope_does_not_take():
    x, cos, sin = _projected(1, 6, 2, 8, 1, seed=0)
    assert rope(x.float(), cos.float(), sin.float()) is None  # bf16 only
    assert rope(x.transpose(1, 2), cos, sin) is None  # (batch, heads, t, d) only
    assert rope(x, cos[:, :3], sin[:, :3]) is None  # positions of another length
    odd, cos5, sin5 = _projected(1, 6, 2, 5, 1, seed=0)
    assert not rope_applies(odd, cos5, sin5)  # an odd head size has no halves to rotate
    assert rope(odd, cos5, sin5) is None


def _decoding_step(head_dim: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(head_dim)
    b, heads, kv_heads, length = 3, 9, 3, 20
    q = torch.randn(b, 1, heads, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(b, 1, kv_heads, head_dim, generator=g).bfloat16() for _ in "kv")
    angles = torch.rand(b, 1, head_dim // 2, generator=g) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    caches = [torch.zeros(b, kv_heads, length, head_dim, dtype=torch.bfloat16) for _ in "kv"]
    return q, k, v, cos, sin, caches


def _folded(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: what rope_cache takes."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 30])
def test_rope_cache_is_transformers_rotary_to_the_bit(head_dim):
    q, k, v, cos, sin, (keys, values) = _decoding_step(head_dim)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rotated, pos = q.clone(), 7
    assert rope_cache(rotated, k, v, cos, _folded(sin), keys, values, pos)
    assert torch.equal(rotated.transpose(1, 2), ref_q)
    assert torch.equal(keys[:, :, pos : pos + 1], ref_k)
    assert torch.equal(values[:, :, pos : pos + 1], v.transpose(1, 2))
    assert not keys[:, :, :pos].any() and not keys[:, :, pos + 1 :].any()  # nothing else


@needs_kernel
def test_what_rope_cache_does_not_take():
    q, k, v, cos, sin, (keys, values) = _decoding_step(64)
    folded = _folded(sin)
    assert not rope_cache(q.float(), k, v, cos, folded, keys, values, 7)  # bf16 only
    assert not rope_cache(q, k, v, cos, folded, keys, values, keys.shape[2])  # past the cache
    assert not rope_cache(q, k, v, cos, folded, keys.transpose(2, 3), values, 7)  # layout
    assert not keys.any() and not values.any()  # nothing written
