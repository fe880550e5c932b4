"""kernels.attention: a decoding step's attention over the KV cache equals sdpa's (and
decode_attention_reference), training's causal softmax equals the masked softmax (and
causal_softmax_reference); what they do not take they decline."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel

from lorakit.kernels.attention import (
    causal_softmax,
    causal_softmax_reference,
    decode_attention,
    decode_attention_reference,
)
from lorakit.models.packed_attention import _mask


def _cache(batch: int, head_dim: int, length: int = 300, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 9, 1, head_dim, generator=g).bfloat16()  # 9 heads over 3 kv heads
    k, v = (torch.randn(batch, 3, length, head_dim, generator=g).bfloat16() for _ in "kv")
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("batch", [1, 8])  # 8: enough work for the threads
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_equals_sdpa(batch, head_dim):
    q, k, v = _cache(batch, head_dim, seed=head_dim)
    t = 257
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[0, :40] = False  # a left-padded row
    got = decode_attention(q, k, v, t, mask, 0.1)
    full = [x[:, :, :t].double().repeat_interleave(3, dim=1) for x in (k, v)]
    exact = F.scaled_dot_product_attention(
        q.double(), *full, attn_mask=mask[:, None, None, :], scale=0.1
    ).transpose(1, 2)
    assert got.shape == (batch, 1, 9, head_dim) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)
    reference = decode_attention_reference(q, k, v, t, mask, 0.1)
    torch.testing.assert_close(got, reference, rtol=2**-7, atol=1e-3)  # float32 sums' order
    assert torch.equal(
        decode_attention(q, k, v, t, None, 0.1),
        decode_attention(q, k, v, t, torch.ones_like(mask), 0.1),
    )


@needs_kernel
def test_what_decode_attention_does_not_take():
    q, k, v = _cache(2, 64)
    assert decode_attention(q.float(), k, v, 9, None, 0.1) is None  # bf16 only
    assert decode_attention(q.expand(2, 9, 2, 64), k, v, 9, None, 0.1) is None  # one query
    q48, k48, v48 = _cache(2, 48)
    assert decode_attention(q48, k48, v48, 9, None, 0.1) is None  # head size % 32
    assert decode_attention(q, k, v, 0, None, 0.1) is None  # no position: a nonzero status
    assert decode_attention(q, k, v, k.shape[2] + 1, None, 0.1) is None  # past the cache
    assert decode_attention(q, k, v, 9, torch.ones(2, 9), 0.1) is None  # a float mask


@needs_kernel
@pytest.mark.parametrize("n, groups, window", [(248, 3, None), (37, 2, None), (100, 3, 16)])
def test_causal_softmax_kernel_equals_masked_softmax(n, groups, window):
    gen = torch.Generator().manual_seed(n)
    scores = (torch.randn(3, groups * n, n, generator=gen) * 3).bfloat16()
    mask = _mask(max(n, 512), window, torch.bfloat16, scores.device)[:n, :n]
    expected = torch.softmax(scores.view(3, groups, n, n) + mask, dim=-1).view(scores.shape)
    out = causal_softmax(scores.clone(), window)
    # float32 sums in another order: at most a bf16 step apart, nearly all equal
    for want in (expected, causal_softmax_reference(scores, window)):
        torch.testing.assert_close(out, want, rtol=2**-7, atol=2**-16)
        assert (out == want).float().mean() > 0.999
    assert bool((out[:, :n][:, torch.ones(n, n).triu(1).bool()] == 0).all())  # later keys


@needs_kernel
def test_what_causal_softmax_does_not_take():
    assert causal_softmax(torch.randn(2, 4, 4), None) is None  # float32
    scores = torch.randn(2, 8, 8).bfloat16()
    assert causal_softmax(scores.transpose(1, 2), None) is None  # not contiguous
    long = torch.zeros(1, 4097).bfloat16()  # past the kernel's 4096 keys: a nonzero status
    assert causal_softmax(long, None) is None and not long.any()
