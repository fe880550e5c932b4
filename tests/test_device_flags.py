"""--device and --quant on every command that loads a model, and merging into the NF4 base."""

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.lora.layer import attach_lora
from lorakit.lora.peft_format import AdapterConfig, load_adapter, save_adapter
from lorakit.lora.targets import resolve_targets
from lorakit.models.loading import load_model

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _random_adapter(model_dir, path):
    model, _, _ = load_model(model_dir, quant="none", dtype=torch.float32)
    modules, targets = resolve_targets(model, "all-linear")
    torch.manual_seed(0)
    attach_lora(model, modules, rank=3, alpha=6)
    for n in modules:
        torch.nn.init.normal_(model.get_submodule(n).lora_B["default"].weight, std=0.2)
    save_adapter(model, path, AdapterConfig(rank=3, alpha=6, target_modules=targets))


def test_merge_quant_nf4_is_the_4bit_base_plus_adapter(tmp_path, tiny_model_dir):
    """What QLoRA trained the adapter against: the merged model computes what the NF4 base +
    adapter computes, for Linear and GPT-2's Conv1D alike, and not what the original base +
    adapter computes (the plain merge)."""
    from transformers import AutoModelForCausalLM

    _random_adapter(tiny_model_dir, tmp_path / "ad")
    common = ["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "ad")]
    assert main([*common, "--quant", "nf4", "--device", "cpu", "--out", str(tmp_path / "q")]) == 0
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    qlora, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    load_adapter(qlora, tmp_path / "ad")
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        want = qlora(ids).logits
        merged_nf4 = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits
    torch.testing.assert_close(merged_nf4, want, rtol=1e-4, atol=1e-4)
    assert (merged - want).abs().max() > 100 * (merged_nf4 - want).abs().max()


@NO_GPU
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "hi"],
        ["chat"],
        ["eval"],
        ["serve"],
        ["merge", "--adapter", "a", "--out", "o"],
        ["train", "--steps", "1"],
    ],
)
def test_device_cuda_without_a_gpu_is_one_line_before_loading(command, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")  # a load would fail with another message
    assert main([*command, "--model", missing, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU is visible" in err and "--device cpu" in err


def test_generate_and_eval_take_quant_none(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 4}) + "\n"
    )
    losses = {}
    for quant in ("none", "nf4"):
        capsys.readouterr()
        argv = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--json"]
        assert main([*argv, "--quant", quant, "--device", "auto"]) == 0
        losses[quant] = json.loads(capsys.readouterr().out)[0]["loss"]
    reference = load_model(tiny_model_dir, quant="none")[0]
    assert not any(type(m).__name__ == "NF4Linear" for m in reference.modules())
    assert losses["none"] != losses["nf4"]
    assert losses["none"] == pytest.approx(losses["nf4"], rel=0.05)
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "3"]
    assert main([*argv, "--quant", "none", "--device", "cpu"]) == 0
