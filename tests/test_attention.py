"""Packed attention: example-by-example attention equals the block-diagonal masked attention."""

import pytest
import torch
from conftest import tiny_model

from lorakit.attention import PACKED, enable_packed_attention, segments_of
from lorakit.data import collate, pack_sequences
from lorakit.lora import attach_lora, mark_only_lora_trainable
from lorakit.loss import causal_lm_loss


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


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_attention_equals_masked_sdpa(kind):
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
