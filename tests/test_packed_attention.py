"""Packed attention: example-by-example attention equals the block-diagonal masked attention."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lorakit.lora.layer import attach_lora, mark_only_lora_trainable
from lorakit.models import packed_attention as attention
from lorakit.models.packed_attention import (
    PACKED,
    SegmentAttention,
    enable_packed_attention,
    segments_of,
)
from lorakit.training.data import collate, pack_sequences
from lorakit.training.loss import causal_lm_loss


def test_segments_are_runs_of_equal_example_index():
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert segments_of(seq_ids) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


def _packed_batch(vocab: int = 400):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 20, 3, 11, 25, 9, 14, 30]
    tokenized = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        tokenized.append((ids, [-100] * 2 + ids[2:]))
    rows = pack_sequences(tokenized, seq_len=40)
    assert any(len(set(r.seq_ids)) > 2 for r in rows)
    return collate(rows, torch.float32)


def _sdpa_model(kind: str):
    model = tiny_model(kind)
    model.set_attn_implementation("sdpa")
    return model


def _grouped(heads: int, kv_heads: int, n: int, dim: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, heads, n, dim, generator=g, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _segment_attention(q, k, v, window=None):
    """The explicit kernel on (1, H, L, D) inputs, heads grouped as `packed_attention` does."""
    heads, kv_heads, n, dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    grouped = q[0].view(kv_heads, heads // kv_heads, n, dim)
    out = SegmentAttention.apply(grouped, k[0], v[0], dim**-0.5, window)
    return out.reshape(1, heads, n, dim)


@pytest.mark.parametrize("n", [9, attention.BUCKET])  # padded up to BUCKET, and not padded
@pytest.mark.parametrize("window", [None, 3])
def test_segment_attention_matches_sdpa_and_its_gradients_are_exact(window, n):
    q, k, v = _grouped(heads=6, kv_heads=2, n=n)
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    if window:
        hidden |= torch.ones(n, n, dtype=torch.bool).tril(-window)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=~hidden
    )
    torch.testing.assert_close(_segment_attention(q, k, v, window), ref)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: _segment_attention(*t, window), inputs)


def test_segment_attention_in_bf16_is_as_close_to_fp64_as_the_flash_kernel():
    q, k, v = _grouped(heads=9, kv_heads=3, n=150, dim=64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    ours = _segment_attention(*bf16).double()
    flash = F.scaled_dot_product_attention(*bf16, is_causal=True, enable_gqa=True).double()
    assert (ours - exact).abs().max() < 3 * (flash - exact).abs().max()


@pytest.mark.parametrize("explicit_max", [attention.EXPLICIT_MAX, 0])  # 0: every example to sdpa
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_attention_equals_masked_sdpa(kind, explicit_max, monkeypatch):
    monkeypatch.setattr(attention, "EXPLICIT_MAX", explicit_max)
    calls = []
    apply = SegmentAttention.apply
    monkeypatch.setattr(SegmentAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    batch = _packed_batch()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    model = _sdpa_model(kind)
    with torch.no_grad():
        masked = model(**inputs).logits
        assert enable_packed_attention(model)
        assert model.config._attn_implementation == PACKED
        packed = model(**inputs, segments=segments_of(batch["seq_ids"])).logits
        # The segments are really used: one segment per row is plain causal attention.
        whole = [[(0, batch["input_ids"].shape[1])]] * batch["input_ids"].shape[0]
        causal = model(**inputs, segments=whole).logits
    real = batch["seq_ids"] >= 0
    torch.testing.assert_close(packed[real], masked[real], atol=1e-5, rtol=1e-5)
    assert (causal[real] - masked[real]).abs().max() > 1e-2
    assert bool(calls) == bool(explicit_max)  # which kernel ran


def test_packed_attention_keeps_a_sliding_window():
    batch = _packed_batch()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    model.set_attn_implementation("sdpa")
    assert model.model.layers[0].self_attn.sliding_window == 4
    # The reference: the block-diagonal mask with keys 4 or more tokens back hidden too.
    n = inputs["input_ids"].shape[1]
    far = torch.ones(n, n, dtype=torch.bool).tril(-4)
    mask = inputs["attention_mask"]
    inputs["attention_mask"] = mask.masked_fill(far, torch.finfo(mask.dtype).min)
    with torch.no_grad():
        masked = model(**inputs).logits
        assert enable_packed_attention(model)
        packed = model(**inputs, segments=segments_of(batch["seq_ids"])).logits
    real = batch["seq_ids"] >= 0
    torch.testing.assert_close(packed[real], masked[real], atol=1e-5, rtol=1e-5)


def test_packed_loss_and_gradients_equal_masked():
    batch = _packed_batch()

    def loss_and_grads(packed: bool):
        model = _sdpa_model("llama")
        names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        attach_lora(model, names, "default", rank=4, alpha=8)
        mark_only_lora_trainable(model)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if packed:
            assert enable_packed_attention(model)
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads

    loss_m, grads_m = loss_and_grads(False)
    loss_p, grads_p = loss_and_grads(True)
    torch.testing.assert_close(loss_p, loss_m, atol=1e-4, rtol=1e-5)
    for n in grads_m:
        torch.testing.assert_close(grads_p[n], grads_m[n], atol=1e-5, rtol=1e-4)


def test_eager_models_are_left_alone():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert not enable_packed_attention(model)
    assert model.config._attn_implementation == "eager"


def test_example_by_example_only_on_cpu():
    """On a GPU one masked sdpa call per layer beats a launch per example (~25x on an H200)."""
    model = _sdpa_model("llama")
    assert not attention.attends_by_example(model, torch.device("cpu"))  # not switched yet
    assert enable_packed_attention(model)
    assert attention.attends_by_example(model, torch.device("cpu"))
    assert not attention.attends_by_example(model, torch.device("cuda"))
