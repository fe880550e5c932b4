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


def _train_two_steps(model, tok, path, data_file, out, targets="default", rank=16):
    cfg = TrainConfig(
        model=str(path),
        data=str(data_file),
        out=str(out),
        targets=targets,
        rank=rank,
        steps=2,
        batch_size=2,
        seq_len=64,
        lr=1e-2,
        save_every=0,
        device="cpu",
    )
    result = T.train(cfg, model, tok, str(path), progress=False)
    assert result.steps == 2
    return result


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
            owner, _, attr = name.removesuffix(".base_layer").rpartition(".")
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
    result = _train_two_steps(model, tok, path, data_file, tmp_path / "out")

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


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_adapters_on_experts_train_and_match_peft(
    kind, tmp_path, tiny_tokenizer, data_file, capsys
):
    """all-linear reaches the fused expert weights (rank r per expert, PEFT's target_parameters
    layout): trained, saved, loaded by PEFT with the same logits; a PEFT-made expert adapter
    loads here with PEFT's logits; merged into a 16-bit base it changes nothing."""
    peft = pytest.importorskip("peft")
    from lorakit.lora.layer import active_adapters, merge_lora, row_adapters
    from lorakit.lora.peft_format import load_adapter

    path = tmp_path / kind
    _saved(kind, path, tiny_tokenizer)
    assert main(["inspect", str(path), "--targets", "all-linear", "--rank", "2"]) == 0
    report = capsys.readouterr().out
    assert "gate_up_proj" in report and "x4" in report and "routers stay frozen" in report

    model, tok, _ = load_model(path, quant="nf4", dtype=torch.float32)
    result = _train_two_steps(model, tok, path, data_file, tmp_path / "out", "all-linear", 2)
    saved = json.loads((result.out / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert experts.gate_up_proj.lora_B["default"].weight.abs().sum() > 0  # the experts learned

    reference = _reference_over_dequantized_base(path, model)
    peft_model = peft.PeftModel.from_pretrained(reference, result.out).eval()
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # a batch whose rows run different adapters: each row its own
        with active_adapters(model, []):
            bare = model(ids).logits
        with row_adapters(model, ["default", None]):
            mixed = model(ids).logits
    assert (ours[0] - bare[0]).abs().max() > 1e-3
    torch.testing.assert_close(mixed, torch.stack([ours[0], bare[1]]), rtol=1e-4, atol=1e-4)

    # An adapter PEFT made on the experts alone loads here with PEFT's logits.
    reference = _reference_over_dequantized_base(path, model)
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,  # random B: the adapter changes the output
    )
    torch.manual_seed(1)
    theirs_model = peft.get_peft_model(reference, config).eval()
    theirs_model.save_pretrained(tmp_path / "peft")
    fresh, _, _ = load_model(path, quant="nf4", dtype=torch.float32)
    load_adapter(fresh, tmp_path / "peft", "theirs")
    with torch.no_grad():
        ours, theirs = fresh(ids).logits, theirs_model(ids).logits
        base = theirs_model.get_base_model()
        with theirs_model.disable_adapter():
            untouched = base(ids).logits
    assert (theirs - untouched).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # Merged into a full-precision base, the expert adapter gives the same logits.
    full, _, _ = load_model(path, quant="none", dtype=torch.float32)
    load_adapter(full, tmp_path / "peft", "theirs")
    with torch.no_grad():
        before = full(ids).logits
        merge_lora(full, "theirs", unload=True)
        after = full(ids).logits
    assert isinstance(
        full.get_submodule("model.layers.0.mlp.experts").down_proj, torch.nn.Parameter
    )
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_memory_estimate_counts_experts_in_nf4_and_their_adapters(tmp_path, tiny_tokenizer):
    from lorakit.training import memory

    _saved("mixtral", tmp_path / "m", tiny_tokenizer)
    cfg = TrainConfig(model=str(tmp_path / "m"), rank=4, targets="all-linear")
    full, _, _ = load_model(tmp_path / "m", quant="none", dtype=torch.float32)
    nf4_model, _, _ = load_model(tmp_path / "m", quant="nf4", dtype=torch.float32)
    held = sum(t.nbytes for t in [*nf4_model.parameters(), *nf4_model.buffers()])
    assert memory.estimate(full, cfg, torch.float32, 1, quant="nf4").base == pytest.approx(
        held, rel=0.05
    )
    estimate = memory.estimate(full, cfg, torch.float32, micro=1)
    T.attach_adapter(full, cfg)
    trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert trainable > 0 and estimate.adapter == trainable * (4 + 4 + 8)


def test_expert_adapter_bad_input_is_one_line(tmp_path, tiny_tokenizer, data_file, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    path = tmp_path / "mixtral"
    _saved("mixtral", path, tiny_tokenizer)
    train = ["train", "--model", str(path), "--data", str(data_file), "--seq-len", "64"]
    cases = [
        (["--targets", "gate", "--out", str(tmp_path / "a")], "is a mixture-of-experts router"),
        (
            ["--targets", "all-linear", "--dropout", "0.1", "--out", str(tmp_path / "b")],
            "cannot apply to mixture-of-experts weights",
        ),
    ]
    capsys.readouterr()
    for argv, says in cases:
        assert main([*train, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # PEFT can put an adapter on the router's bare weight; lorakit says it does not adapt it.
    router = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.gate.weight"])
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path), router).save_pretrained(
        tmp_path / "router"
    )
    argv = ["generate", "--model", str(path), "--adapter", str(tmp_path / "router")]
    capsys.readouterr()
    assert main([*argv, "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MixtralTopKRouter, which lorakit does not adapt" in err[0], err
