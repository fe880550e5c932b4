"""The lean decoding pass: the same logits as transformers' forward pass, step by step."""

import pytest
import torch
from conftest import tiny_model

from lorakit import kernels
from lorakit.inference.decoder import TransformersDecoder
from lorakit.inference.generate import generate_ids
from lorakit.inference.lean import LeanDecoder, lean_applies
from lorakit.inference.sampling import Sampling
from lorakit.lora.layer import attach_lora

PROMPTS = [[5, 17, 42, 9], [7, 8], [100, 3, 3, 3, 250, 11]]
KINDS = {
    "llama": {},
    "qwen2": {},  # biases on q, k, v
    "mistral": {},  # a sliding window longer than the context
    "qwen3": {},  # q_norm/k_norm; head_dim != hidden / heads
    "llama-scaled-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def _model(kind: str):
    return tiny_model(kind.split("-")[0], **KINDS[kind])


def _batch(prompts):
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids, mask


def _steps(forward, ids, mask, n):
    """The logits of the prompt's step, then of n - 1 steps fed the same made-up tokens on
    every side (each side's own argmax could part ways at a near-tie in bf16)."""
    out, step = [], ids
    for i in range(n):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1] :]
        logits = forward(step, mask, positions)
        out.append(logits)
        step = torch.full_like(ids[:, :1], 7 + 37 * i % (logits.shape[-1] - 7))
        step[0] += 1  # rows differ
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["padded", "one"])
def test_lean_logits_equal_transformers_forward(kind, prompts):
    model = _model(kind)
    ids, mask = _batch(prompts)
    assert lean_applies(model, ids.shape[1] + 6)
    lean = LeanDecoder(model, ids.shape[1] + 6)
    with torch.no_grad():
        ref = _steps(TransformersDecoder(model), ids, mask, 6)
        got = _steps(lean, ids, mask, 6)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])  # biases; per-head q/k norms
@pytest.mark.parametrize("head_dim", [8, 32])  # 32: the compiled attention takes it
def test_lean_decoding_in_bf16_with_adapters_gives_transformers_logits(kind, head_dim):
    size = dict(hidden_size=4 * head_dim) | ({"head_dim": head_dim} if kind == "qwen3" else {})
    model = tiny_model(kind, **size).to(torch.bfloat16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    attach_lora(model, names, "a", rank=4, alpha=8)
    for n in names:
        torch.nn.init.normal_(model.get_submodule(n).lora_B["a"].weight, std=0.5)
    model.eval()
    ids, mask = _batch(PROMPTS)
    with torch.no_grad():
        ref = _steps(TransformersDecoder(model), ids, mask, 8)
        got = _steps(LeanDecoder(model, ids.shape[1] + 8), ids, mask, 8)
    for r, g in zip(ref, got, strict=True):
        assert (g.float() - r.float()).abs().max() <= 0.02 * r.float().abs().max()


def test_generation_uses_it_and_the_switch_turns_it_off(monkeypatch):
    model = tiny_model("qwen2")
    calls = []
    real = LeanDecoder.__call__
    monkeypatch.setattr(LeanDecoder, "__call__", lambda *a: calls.append(1) or real(*a))
    lean = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10))
    assert len(calls) == 10
    monkeypatch.setenv("LORAKIT_LEAN_DECODE", "0")
    assert generate_ids(model, PROMPTS, Sampling(max_new_tokens=10)) == lean
    assert len(calls) == 10


def test_models_it_does_not_know_keep_transformers_forward():
    assert not lean_applies(tiny_model("gpt2"), 16)
    short_window = tiny_model("mistral", sliding_window=8)
    assert not lean_applies(short_window, 16)  # the window would cut into the context
    assert lean_applies(short_window, 8)


def test_the_cache_grows_past_its_first_capacity_with_the_same_logits():
    model = tiny_model("llama")
    ids, mask = _batch(PROMPTS)
    lean = LeanDecoder(model, ids.shape[1] + 1)  # room for the prompt and one more token
    with torch.no_grad():
        ref = _steps(TransformersDecoder(model), ids, mask, 6)
        got = _steps(lean, ids, mask, 6)
    assert lean.cache.capacity >= ids.shape[1] + 5
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_rows_other_than_the_caches_are_refused():
    lean = LeanDecoder(tiny_model("llama"), 8)
    ids, mask = _batch([[1, 2, 3]])
    with torch.no_grad():
        _steps(lean, ids, mask, 2)
        with pytest.raises(ValueError, match="rows"):
            lean(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                 torch.tensor([[4], [4]]))  # fmt: skip


@pytest.mark.skipif(
    kernels._build.library() is None,
    reason="no C compiler or no AVX2 on this machine",
)
def test_on_a_4bit_model_with_an_adapter_the_kernel_calls_give_the_same_logits(
    tmp_path, monkeypatch
):
    from lorakit.kernels.nf4_matmul import KernelGroup
    from lorakit.lora.layer import lora_layers
    from lorakit.models.loading import load_model

    groups = []
    real = KernelGroup.__call__
    monkeypatch.setattr(KernelGroup, "__call__", lambda g, *a: groups.append(g) or real(g, *a))

    tiny_model("qwen2", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    model, _, _ = load_model(tmp_path, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    attach_lora(model, names, "a", rank=4, alpha=8)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.5)
    model.eval()
    ids, mask = _batch(PROMPTS)
    lean = LeanDecoder(model, ids.shape[1] + 6)
    with torch.no_grad():
        ref = _steps(TransformersDecoder(model), ids, mask, 6)
        got = _steps(lean, ids, mask, 6)
    # Each decoding step (all but the prompt's) runs q/k/v and gate/up as one kernel call each,
    # with their adapters (q's) and biases (qwen2's q/k/v)
    assert len(groups) == 2 * len(model.model.layers) * 5
    assert sorted(len(g.parts) for g in groups[:2]) == [2, 3]
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
