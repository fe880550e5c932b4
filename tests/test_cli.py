"""The command line as a user runs it: inspect, train, errors as one line."""

import json

import pytest

from lorakit.cli import main


def test_inspect_json_on_a_model_directory(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--rank", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"]["rank"] == 4
    assert report["adapter"]["parameters"] > 0
    assert any(c["default"] for c in report["candidates"])
    assert report["memory_mb"]["nf4"] < report["memory_mb"]["fp32"]


def test_inspect_text_lists_targets(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--targets", "all-linear"]) == 0
    out = capsys.readouterr().out
    assert "LoRA target candidates" in out and "Default targets:" in out
    assert "--targets all-linear" in out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_inspect_errors_are_one_line(capsys, tmp_path, tiny_model_dir):
    capsys.readouterr()  # drop what building the fixture printed
    assert main(["inspect", "/no/such/model"]) == 2
    assert "not found" in _one_error_line(capsys)
    assert main(["inspect", str(tiny_model_dir), "--rank", "0"]) == 2
    assert "rank must be a positive integer" in _one_error_line(capsys)
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "not a .gguf file" in _one_error_line(capsys)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    assert main(["inspect", str(tmp_path / "broken.gguf")]) == 2
    assert "broken.gguf" in _one_error_line(capsys)


def test_inspect_directory_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_default_model(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "(0-29): 30 x LlamaDecoderLayer" in out
    assert "Default targets: q_proj, k_proj, v_proj, o_proj" in out


@pytest.mark.slow
def test_train_default_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "128",
            "--out",
            str(out),
            "--samples",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "base :" in printed and "tuned:" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    size = (out / "adapter_model.safetensors").stat().st_size
    assert 6e6 < size < 9e6  # 1.84M fp32 parameters at r=16 on q/k/v/o
