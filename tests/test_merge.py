"""Merging an adapter into the base, combining adapters, the adapter library, eval/generate CLI."""

import json

import pytest
import torch
from conftest import tiny_model

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.lora.combine import combine_adapters
from lorakit.lora.layer import attach_lora, lora_layers
from lorakit.lora.library import adapter_library
from lorakit.lora.peft_format import (
    AdapterConfig,
    load_adapter,
    save_adapter,
)
from lorakit.models.merge import merge_into_base


def _adapter(model, path, modules, rank, alpha, rslora=False, seed=0):
    torch.manual_seed(seed)
    attach_lora(model, modules, "x", rank=rank, alpha=alpha, use_rslora=rslora)
    for n in modules:
        torch.nn.init.normal_(model.get_submodule(n).lora_B["x"].weight, std=0.3)
    save_adapter(
        model,
        path,
        AdapterConfig(
            rank=rank, alpha=alpha, use_rslora=rslora, target_modules=["q_proj"], base_model="tiny"
        ),
        "x",
    )
    for _, layer in list(lora_layers(model)):
        if "x" in layer.lora_A:
            layer.delete_adapter("x")


Q0, Q1, V1 = (
    f"model.layers.{i}.self_attn.{p}" for i, p in ((0, "q_proj"), (1, "q_proj"), (1, "v_proj"))
)


def test_combine_is_the_exact_weighted_sum_for_different_ranks(tmp_path):
    model = tiny_model("llama")
    _adapter(model, tmp_path / "a", [Q0, Q1], rank=2, alpha=4)
    _adapter(model, tmp_path / "b", [Q1, V1], rank=5, alpha=3, rslora=True, seed=1)
    config = combine_adapters([tmp_path / "a", tmp_path / "b"], [0.7, 0.3], tmp_path / "ab")
    assert config.rank == 7
    for name, path in (("a", "a"), ("b", "b"), ("ab", "ab")):
        load_adapter(model, tmp_path / path, name=name)
    for module in (Q0, Q1, V1):
        layer = model.get_submodule(module)
        expected = sum(
            w * layer.delta_weight(n) for n, w in (("a", 0.7), ("b", 0.3)) if n in layer.lora_A
        )
        torch.testing.assert_close(layer.delta_weight("ab"), expected, rtol=1e-5, atol=1e-6)


def test_combine_refuses_adapters_of_different_models(tmp_path):
    _adapter(tiny_model("llama"), tmp_path / "a", [Q0], rank=2, alpha=4)
    other = tiny_model("llama", hidden_size=48, num_hidden_layers=1)
    _adapter(other, tmp_path / "b", [Q0], rank=2, alpha=4)
    with pytest.raises(LorakitError, match="different base models"):
        combine_adapters([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "ab")


def test_merged_model_loads_in_transformers_with_base_plus_adapter_outputs(
    tmp_path, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    from lorakit.lora.targets import resolve_targets
    from lorakit.models.loading import load_model

    base, _, _ = load_model(tiny_model_dir, quant="none", dtype=torch.float32)
    modules, targets = resolve_targets(base, "all-linear")
    attach_lora(base, modules, rank=3, alpha=6)
    for n in modules:
        torch.nn.init.normal_(base.get_submodule(n).lora_B["default"].weight, std=0.2)
    save_adapter(base, tmp_path / "ad", AdapterConfig(rank=3, alpha=6, target_modules=targets))
    merge_into_base(str(tiny_model_dir), tmp_path / "ad", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(LorakitError, match="not empty"):
        merge_into_base(str(tiny_model_dir), tmp_path / "ad", tmp_path / "merged")


def test_adapter_library_lists_runs_and_warns_on_another_base(tmp_path):
    model = tiny_model("llama")
    _adapter(model, tmp_path / "lib" / "one", [Q0], rank=2, alpha=4)
    (tmp_path / "lib" / "one" / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_loss": 3.0})
        + "\n"
        + json.dumps({"step": 7, "loss": 2.0})
        + "\n"
        + json.dumps({"step": 7, "eval_loss": 2.5})
        + "\n"
    )
    _adapter(model, tmp_path / "lib" / "two", [Q0, Q1], rank=4, alpha=4)
    rows = adapter_library(tmp_path / "lib")
    assert [r["name"] for r in rows] == ["one", "two"]
    assert rows[0]["steps"] == 7 and rows[0]["eval_loss"] == 2.5 and rows[0]["rank"] == 2
    assert rows[1]["size_mb"] > rows[0]["size_mb"] > 0
    assert "warning" not in rows[0]


def test_cli_merge_weights_errors(tmp_path, capsys):
    args = ["merge", "--adapter", "a", "--adapter", "b", "--out", str(tmp_path / "o")]
    assert main([*args, "--weights", "0.5"]) == 2
    assert "--weights has 1 numbers for 2 adapters" in capsys.readouterr().err
    assert main([*args, "--weights", "x,y"]) == 2
    assert "give numbers" in capsys.readouterr().err
    assert main([*args, "--weights", "0,0"]) == 2
    assert "not all zero" in capsys.readouterr().err


def test_cli_eval_and_generate(tmp_path, tiny_model_dir, capsys):
    from lorakit.models.loading import load_model

    model, _, _ = load_model(tiny_model_dir, quant="none", dtype=torch.float32)
    _adapter(
        model,
        tmp_path / "ad",
        [n for n, _ in model.named_modules() if n.endswith("c_attn") or n.endswith("q_proj")],
        rank=2,
        alpha=4,
    )
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"instruction": "What does foo mean?", "output": "A sample name."}) + "\n"
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                f"mine={tmp_path / 'ad'}",
                "--data",
                str(data),
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"].split(" ")[0] for r in rows] == ["base", "mine"]
    assert rows[0]["loss"] != rows[1]["loss"]
    assert rows[0]["perplexity"] == pytest.approx(2.718281828 ** rows[0]["loss"])
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "What does foo mean?",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", " "]) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_cli_chat_keeps_history_and_quits_on_eof(tiny_model_dir, monkeypatch, capsys):
    lines = iter(["What does foo mean?", "/reset", "And kludge?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    seen = []
    import lorakit.cli.generate as cli

    real_answer = cli._answer

    def spy(model, tokenizer, prompt, args, **kw):
        seen.append([m["content"] for m in prompt])
        return real_answer(model, tokenizer, prompt, args, **kw)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(cli, "_answer", spy)
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    assert seen[0] == ["What does foo mean?"]
    assert seen[1] == ["And kludge?"]  # /reset forgot the first exchange
    assert "chatting with" in capsys.readouterr().out
