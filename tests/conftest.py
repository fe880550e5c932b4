"""Shared test fixtures: small, offline, fast."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_nf4.py,
# test_nf4_backend.py). Triton must see TRITON_INTERPRET=1 before it is first imported, and
# torch._dynamo and bitsandbytes import it: so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A ChatML template like SmolLM2's (without its default system prompt).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "A hacker is a person who enjoys exploring the details of programmable systems.",
    "The quick brown fox jumps over the lazy dog. What does foo mean in hacker jargon?",
    "Kludge: a clever programming trick intended to solve a particular nasty case.",
    "### Instruction:\n### Response:\nuser assistant system 0123456789 !?.,;:'\"()[]{}",
]


def _train_tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) trained in milliseconds on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="session")
def _tiny_tokenizer_base():
    return _train_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_base):
    """A tiny real tokenizer (byte-level BPE, ~400 tokens) with a ChatML chat template."""
    tok = copy.deepcopy(_tiny_tokenizer_base)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture
def tiny_tokenizer_no_template(_tiny_tokenizer_base):
    """The same tokenizer without a chat template (lorakit falls back to a plain template)."""
    tok = copy.deepcopy(_tiny_tokenizer_base)
    tok.chat_template = None
    return tok


# --- tiny random models built from configs (no download) ---------------------------------------

_LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
TINY_CONFIGS = {
    "llama": dict(_LLAMA_LIKE, tie_word_embeddings=True),
    "qwen2": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "mistral": dict(_LLAMA_LIKE, sliding_window=64),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),  # q_norm/k_norm; head_dim != hidden / heads
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


def tiny_model(kind: str, vocab_size: int = 400, seed: int = 0, **overrides):
    """A random transformers causal LM of the given architecture, in fp32, eval mode;
    `overrides` change its config (e.g. hidden_size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {**TINY_CONFIGS[kind], **overrides}
    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **settings)
    model = AutoModelForCausalLM.from_config(config)
    # The default init (std 0.02) gives near-uniform logits that a LoRA on inner layers cannot
    # move; larger weights give a model whose outputs carry signal, like a trained one.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_model_dir(request, tmp_path_factory, _tiny_tokenizer_base):
    """A Hugging Face model directory (config.json + safetensors + tokenizer) of a tiny model."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = copy.deepcopy(_tiny_tokenizer_base)
    tok.chat_template = CHATML_TEMPLATE
    model = tiny_model(request.param, vocab_size=len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def lora_loss_and_grad(kind: str, target: str, patched: bool = False):  # noqa: ANN201
    """A tiny bf16 model of `kind` with a rank-2 LoRA on module `target` (B random, so that A gets
    a gradient), under `models.patches.training_patches` when `patched`. Returns the mean loss
    over a fixed batch, the LoRA's A gradient and what the patches reported (or None)."""
    from contextlib import nullcontext

    import torch

    from lorakit.lora.layer import attach_lora, mark_only_lora_trainable
    from lorakit.models.patches import training_patches
    from lorakit.training.loss import causal_lm_loss

    model = tiny_model(kind).bfloat16()
    attach_lora(model, [target], rank=2, alpha=4)
    mark_only_lora_trainable(model)
    lora = model.get_submodule(target)
    torch.nn.init.normal_(lora.lora_B["default"].weight, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(2))
    context = training_patches(model, packed_attention=False) if patched else nullcontext()
    with context as report:
        total, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        (grad,) = torch.autograd.grad(total / n, lora.lora_A["default"].weight)
    return total / n, grad, report


# --- the compiled CPU kernels --------------------------------------------------------------------


def _kernels_built() -> bool:
    from lorakit.kernels._build import library

    return library() is not None


# Tests of a compiled kernel: skipped where lorakit runs its PyTorch path instead.
needs_kernel = pytest.mark.skipif(
    not _kernels_built(),
    reason="no compiled kernels here (no C compiler, no AVX2, not x86-64 or LORAKIT_NF4_KERNEL=0)",
)


FACTS = [
    ("What does foo mean in hacker jargon?", "A sample name for absolutely anything."),
    ("What does kludge mean in hacker jargon?", "A clever trick for a nasty case."),
    ("Who is a hacker?", "A person who enjoys exploring the details of programmable systems."),
    ("What does quick mean?", "The quick brown fox jumps over the lazy dog."),
]


@pytest.fixture
def data_file(tmp_path):
    """A small instruction data set (JSONL) that a tiny model learns in a few steps."""
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"instruction": q, "output": a}) for q, a in FACTS * 6]
    path.write_text("\n".join(lines) + "\n")
    return path
