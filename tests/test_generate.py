"""Generation: greedy equals transformers', mixed-adapter batches equal rows alone, limits."""

import pytest
import torch
from conftest import tiny_model

from lorakit import kernels
from lorakit.errors import LorakitError
from lorakit.inference.generate import Sampling, generate_ids
from lorakit.lora.layer import attach_lora, set_active_adapters

PROMPTS = [[5, 17, 42, 9], [7, 8], [100, 3, 3, 3, 250, 11]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_equals_transformers_generate_row_by_row(kind):
    model = tiny_model(kind)
    ours = generate_ids(model, PROMPTS, Sampling(max_new_tokens=12), pad_id=0)
    for prompt, row in zip(PROMPTS, ours, strict=True):
        ref = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert row == ref[0, len(prompt) :].tolist()


def _two_adapters(model):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    for adapter in ("a", "b"):
        attach_lora(model, names, adapter, rank=4, alpha=8)
        for n in names:
            torch.nn.init.normal_(model.get_submodule(n).lora_B[adapter].weight, std=0.5)


def test_mixed_adapter_batch_equals_each_row_alone():
    model = tiny_model("llama")
    _two_adapters(model)
    rows = ["a", None, "b"]
    mixed = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), adapters=rows)
    for prompt, adapter, got in zip(PROMPTS, rows, mixed, strict=True):
        set_active_adapters(model, [adapter] if adapter else [])
        assert got == generate_ids(model, [prompt], Sampling(max_new_tokens=10))[0]
    assert len({tuple(r) for r in mixed}) == 3  # the adapters really change the output


def test_eos_and_stop_strings_cut_the_output():
    model = tiny_model("llama")
    full = generate_ids(model, PROMPTS[:1], Sampling(max_new_tokens=10))[0]
    cut = generate_ids(model, PROMPTS[:1], Sampling(max_new_tokens=10), eos_ids=[full[3]])[0]
    assert cut == full[: full.index(full[3])]

    def decode(ids):
        return " ".join(map(str, ids))

    stop = Sampling(max_new_tokens=10, stop=(f" {full[2]} ",))
    assert generate_ids(model, PROMPTS[:1], stop, decode=decode)[0] == full[:2]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model("llama")
    s = Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate_ids(model, PROMPTS, s) == generate_ids(model, PROMPTS, s)
    greedy = generate_ids(model, PROMPTS, Sampling(max_new_tokens=8))
    assert generate_ids(model, PROMPTS, Sampling(8, temperature=0.7, top_k=1, seed=1)) == greedy


def test_streaming_callback_sees_every_token():
    model = tiny_model("llama")
    seen = []
    out = generate_ids(
        model, PROMPTS[:1], Sampling(max_new_tokens=6), on_token=lambda i, t: seen.append(t)
    )
    assert seen == out[0]


def test_limits_are_clear_errors():
    model = tiny_model("llama")  # context 256
    with pytest.raises(LorakitError, match="exceed the model's context of 256"):
        generate_ids(model, [[1] * 250], Sampling(max_new_tokens=10))
    with pytest.raises(LorakitError, match="empty prompt"):
        generate_ids(model, [[]])
    with pytest.raises(LorakitError, match="top-p"):
        generate_ids(model, PROMPTS, Sampling(top_p=0))


def test_cached_dequantized_weights_give_the_same_tokens(tiny_model_dir):
    from lorakit.models.loading import load_model
    from lorakit.quant.linear import NF4Linear

    model, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    per_token = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), cache_weights=False)
    cached = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), cache_weights=True)
    assert cached == per_token
    assert not any(
        "_cached_weight" in m.__dict__ for m in model.modules() if isinstance(m, NF4Linear)
    )


def test_active_adapter_folded_into_the_cache_gives_the_same_tokens(tiny_model_dir):
    from lorakit.lora.layer import attach_lora, folded_adapters, lora_layers
    from lorakit.models.loading import load_model
    from lorakit.quant.linear import dequantized_weights

    model, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "NF4Linear"][:4]
    attach_lora(model, names, "a", rank=4, alpha=8)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.5)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        unfolded = model(ids).logits
        with dequantized_weights(model, torch.float32), folded_adapters(model):
            assert all(layer.merged_adapters == ["a"] for _, layer in lora_layers(model))
            folded = model(ids).logits
        bare = model(ids).logits  # restored: the adapter runs unmerged again
    torch.testing.assert_close(folded, unfolded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bare, unfolded, atol=0, rtol=0)
    assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))
    per_token = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), cache_weights=False)
    cached = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), cache_weights=True)
    assert cached == per_token


def test_weight_cache_is_automatic_and_sized(tiny_model_dir, monkeypatch):
    import lorakit.inference.generate as G
    from lorakit.models.loading import load_model
    from lorakit.quant.linear import dequantized_bytes

    model, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    n = sum(
        m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "NF4Linear"
    )
    assert dequantized_bytes(model, torch.bfloat16) == 2 * n
    used = []
    real = G.dequantized_weights

    def spy(m, dtype):
        used.append(dtype)
        return real(m, dtype)

    monkeypatch.setattr(G, "dequantized_weights", spy)
    generate_ids(model, PROMPTS, Sampling(max_new_tokens=2))
    assert used == [torch.float32]  # plenty of memory: cached
    monkeypatch.setattr(
        "lorakit.quant.linear.free_memory", lambda device: 2 * n
    )  # too little: per token
    generate_ids(model, PROMPTS, Sampling(max_new_tokens=2))
    assert used == [torch.float32]


@pytest.mark.skipif(
    kernels._build.library() is None,
    reason="no C compiler or no AVX2 on this machine",
)
def test_decoding_from_the_4bit_codes_is_the_default_and_gives_the_same_tokens(
    tmp_path, monkeypatch
):
    import lorakit.inference.generate as G
    from lorakit.lora.layer import lora_layers
    from lorakit.models.loading import load_model
    from lorakit.quant.linear import decodes_from_codes

    # Rows of 64 and 128 inputs: whole NF4 blocks, which the kernel takes.
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    model, _, _ = load_model(tmp_path, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    assert decodes_from_codes(model, torch.device("cpu"))
    names = [n for n, m in model.named_modules() if type(m).__name__ == "NF4Linear"][:4]
    attach_lora(model, names, "a", rank=4, alpha=8)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.5)
    from lorakit.kernels.nf4_matmul import KernelWeight

    copies, calls = [], []
    real_copy, real_call = G.dequantized_weights, KernelWeight.__call__
    monkeypatch.setattr(G, "dequantized_weights", lambda *a: copies.append(1) or real_copy(*a))
    monkeypatch.setattr(KernelWeight, "__call__", lambda *a: calls.append(1) or real_call(*a))
    for adapters in ([], ["a"]):
        set_active_adapters(model, adapters)
        copies.clear(), calls.clear()
        auto = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10))
        assert not copies and calls  # decoded from the 4-bit codes, no bf16 copy made
        copy = generate_ids(model, PROMPTS, Sampling(max_new_tokens=10), cache_weights=True)
        assert copies
        assert auto == copy


@pytest.mark.skipif(
    kernels._build.library() is None,
    reason="no C compiler or no AVX2 on this machine",
)
def test_a_bf16_head_decodes_through_the_kernel_with_the_same_logits(monkeypatch):
    import lorakit.inference.generate as G
    from lorakit.inference import decoder

    model = tiny_model("llama", hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    head = model.get_output_embeddings()
    rows = []
    real = kernels.bf16_matmul.bf16_matmul
    monkeypatch.setattr(decoder, "bf16_matmul", lambda x, w: rows.append(x.shape) or real(x, w))
    h = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad(), decoder.output_head_kernel(model):
        torch.testing.assert_close(
            head(h).double(), (h.double() @ head.weight.double().T), rtol=1e-2, atol=1e-2
        )
        assert rows == [(3, 1, 64)]
        head(torch.randn(1, decoder.HEAD_ROWS + 1, 64, dtype=torch.bfloat16))  # a prompt: torch's
        assert len(rows) == 1
    assert "forward" not in head.__dict__  # the module is as it was
    with torch.no_grad():
        head(h)
    assert len(rows) == 1
    rows.clear()
    ours = generate_ids(model, PROMPTS, Sampling(max_new_tokens=8))
    assert rows  # generation used it
    monkeypatch.setattr(
        G, "output_head_kernel", lambda model: __import__("contextlib").nullcontext()
    )
    assert generate_ids(model, PROMPTS, Sampling(max_new_tokens=8)) == ours
