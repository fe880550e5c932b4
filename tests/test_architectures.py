"""Every architecture in lorakit's tested set, end to end as a user meets it: a tiny random model
saved by transformers' own `save_pretrained` (so in the checkpoint layout the hub has: GPT-NeoX's
`embed_out`, Mixtral's per-expert `w1/w2/w3`...) -> `lorakit inspect` -> QLoRA training ->
the adapter loaded by PEFT over the same (dequantized) base gives the same logits ->
`lorakit generate --adapter`. An encoder-decoder model is refused with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.inference.generate import generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.lora.targets import TESTED_ARCHITECTURES
from lorakit.models.loading import load_model
from lorakit.quant.experts import NF4Experts
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4
from lorakit.training import trainer as T
from lorakit.training.config import TrainConfig

# Small settings under the names transformers' configs use (attribute_map covers GPT-2's n_embd
# and the like); a config takes those it knows.
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    head_dim=8,
    max_position_embeddings=256,
)
EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "phi": dict(num_key_value_heads=4),
    "gpt_neox": dict(num_key_value_heads=None),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "gemma3_text": dict(sliding_window=64),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
}


def _config(kind: str, vocab_size: int):
    from transformers import AutoConfig

    default = AutoConfig.for_model(kind)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    settings = {**COMMON, **EXTRA.get(kind, {})}
    kwargs = {
        k: v
        for k, v in settings.items()
        if v is not None
        and k in known
        and not isinstance(getattr(type(default), k, None), property)  # Falcon's head_dim
    }
    kwargs.update({k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in known})
    return AutoConfig.for_model(kind, vocab_size=vocab_size, **kwargs)


def _saved(kind: str, path, tokenizer):
    """A random `kind` model saved by transformers in `path`; weights large enough to carry
    signal (std 0.2, as conftest.tiny_model) so that logits are not all alike."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, len(tokenizer)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    facts = [("What does foo mean?", "A name for anything."), ("Who is a hacker?", "A tinkerer.")]
    lines = [json.dumps({"instruction": q, "output": a}) for q, a in facts * 6]
    path.write_text("\n".join(lines) + "\n")
    return path


def _reference_over_dequantized_base(path, model):
    """transformers' own load of `path`, carrying exactly lorakit's dequantized NF4 weights."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            ref = reference.get_submodule(name.removesuffix(".base_layer"))
            w = dequantize_nf4(module.state, torch.float32)
            ref.weight.data.copy_(w.T if type(ref).__name__ == "Conv1D" else w)
        elif isinstance(module, NF4Experts):
            owner, _, attr = name.rpartition(".")
            getattr(reference.get_submodule(owner), attr).data.copy_(module.dequantized())
    return reference


@pytest.mark.parametrize("kind", TESTED_ARCHITECTURES)
def test_architecture_end_to_end(kind, tmp_path, tiny_tokenizer, data_file, capsys):
    peft = pytest.importorskip("peft")
    path = tmp_path / kind
    _saved(kind, path, tiny_tokenizer)

    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    assert f"Architecture {kind}: tested end to end" in report

    model, tok, _ = load_model(path, quant="nf4", dtype=torch.float32)
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    if "moe" in kind or kind == "mixtral":
        assert any(isinstance(m, NF4Experts) for m in model.modules())  # experts in 4 bits
    cfg = TrainConfig(
        model=str(path),
        data=str(data_file),
        out=str(tmp_path / "out"),
        steps=2,
        batch_size=2,
        seq_len=64,
        lr=1e-2,
        save_every=0,
        device="cpu",
    )
    result = T.train(cfg, model, tok, str(path), progress=False)
    assert result.steps == 2

    reference = _reference_over_dequantized_base(path, model)
    peft_model = peft.PeftModel.from_pretrained(reference, result.out).eval()
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # Greedy decoding (lorakit's decoder, KV cache) = greedy over PEFT's full forward passes.
    prompt = ids[0, :6].tolist()
    ours = generate_ids(model, [prompt], Sampling(max_new_tokens=5), pad_id=0)[0]
    theirs = list(prompt)
    with torch.no_grad():
        for _ in range(len(ours)):
            theirs.append(int(peft_model(torch.tensor([theirs])).logits[0, -1].argmax()))
    assert len(ours) == 5 and ours == theirs[len(prompt) :]

    argv = ["generate", "--model", str(path), "--adapter", str(result.out), "--prompt", "hi"]
    assert main([*argv, "--max-new-tokens", "4", "--device", "cpu"]) == 0


def test_encoder_decoder_is_refused_in_one_line(tmp_path, tiny_tokenizer, data_file, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tiny_tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tiny_tokenizer.save_pretrained(tmp_path / "t5")
    capsys.readouterr()
    for argv in (
        ["inspect", str(tmp_path / "t5")],
        ["train", "--model", str(tmp_path / "t5"), "--data", str(data_file)],
    ):
        assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] == "train" else argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'t5' is an encoder-decoder model" in err[0]
    assert not (tmp_path / "o").exists()


def test_packing_is_kept_where_the_model_keeps_examples_apart_only():
    from transformers import AutoModelForCausalLM

    from lorakit.training import data as D
    from lorakit.training.loss import causal_lm_loss
    from lorakit.training.packing import keeps_examples_apart, unpack, unpacked

    cpu = torch.device("cpu")
    models = {
        k: AutoModelForCausalLM.from_config(_config(k, 400)).eval() for k in ("llama", "bloom")
    }
    assert keeps_examples_apart(models["llama"], cpu, torch.float32)
    assert not keeps_examples_apart(models["bloom"], cpu, torch.float32)  # 2-D masks only

    pieces = [([1, 5, 7, 9, 11], [-100, 5, 7, 9, 11]), ([2, 4, 6], [-100, 4, 6])] * 3
    rows = D.pack_sequences(pieces, 16)
    examples = unpack(rows)
    assert [e.input_ids for e in examples] == [p[0] for p in pieces]
    assert [e.labels for e in examples] == [p[1] for p in pieces]
    with torch.no_grad():  # both layouts give the same loss where packing is right
        packed = causal_lm_loss(models["llama"], D.collate(rows, torch.float32))
        alone = causal_lm_loss(models["llama"], unpacked(rows, torch.float32))
    assert packed[1] == alone[1]
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=1e-4)


def _run(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what saving the model printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_broken_checkpoints_are_one_line_naming_file_and_tensor(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    _saved("llama", tmp_path / "m", tiny_tokenizer)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    err = _run(["train", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys)
    assert "model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape" in err

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_config(_config("llama", len(tiny_tokenizer))).save_pretrained(
        sharded, max_shard_size="20KB"
    )
    tiny_tokenizer.save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    err = _run(["train", "--model", str(sharded), "--out", str(tmp_path / "o")], capsys)
    assert f"lacks 1 of the {len(shards)} shards" in err and shards[1].name in err

    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "florp"}))
    err = _run(["train", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys)
    assert "config.json: model type 'florp' is unknown to transformers" in err
    assert not (tmp_path / "o").exists()
