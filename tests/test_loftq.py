"""LoftQ initialisation (training/loftq.py), learning-rate schedules (training/schedule.py), and
what a LoftQ adapter says about itself and how it merges."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_quantize import one_line_error

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.lora.combine import combine_adapters
from lorakit.lora.layer import LoRALinear
from lorakit.lora.peft_format import read_adapter, save_adapter
from lorakit.models.loading import load_model
from lorakit.models.merge import merge_into_base
from lorakit.models.quantized import quantize_model
from lorakit.training.config import TrainConfig
from lorakit.training.schedule import lr_factor, warmup_steps
from lorakit.training.trainer import adapter_config_for, attach_adapter


def _loftq_model(model_dir, rank: int, targets: str = "default"):
    model, _, source = load_model(str(model_dir), quant="nf4", dtype=torch.float32)
    cfg = TrainConfig(model=str(model_dir), init="loftq", rank=rank, targets=targets)
    _, peft_targets = attach_adapter(model, cfg, source)
    return model, cfg, peft_targets, source


def _data(tmp_path) -> object:
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i} " * 8} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _weights(model_dir) -> dict[str, torch.Tensor]:
    """The 16-bit weights as (out, in), by the name of the linear layer."""
    full, _, _ = load_model(str(model_dir), quant="none", dtype=torch.float32)
    out = {}
    for name, m in full.named_modules():
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2:
            out[name] = m.weight.T if type(m).__name__ == "Conv1D" else m.weight
    return out


def test_loftq_leaves_the_optimal_rank_r_error(tiny_model_dir, capsys):
    """Base + adapter = Q + the rank-r truncated SVD of W - Q: the error left is exactly the
    residual's discarded singular values (Eckart-Young), the scaling included."""
    rank = 4
    model, *_ = _loftq_model(tiny_model_dir, rank)
    weights = _weights(tiny_model_dir)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert layers
    for name, layer in layers:
        w = weights[name]
        q = layer.base_layer.dequantized_weight(torch.float32)
        delta = (
            layer.scaling["default"]
            * layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
        )
        sigma = torch.linalg.svdvals((w - q).double())
        left = (w - q - delta).double().square().sum()
        assert torch.allclose(left, sigma[rank:].square().sum(), rtol=1e-3, atol=1e-9), name
        assert left < (w - q).double().square().sum() * 0.9  # and it does correct something
    said = capsys.readouterr().out
    assert f"LoftQ init: {len(layers)} layers" in said


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_full_rank_loftq_gives_back_the_16bit_model(tiny_model_dir):
    """At full rank the adapter holds all of W - Q: the 4-bit model with it computes what the
    16-bit model computes (on the layers it covers), where the bare NF4 base does not."""
    model, *_ = _loftq_model(tiny_model_dir, rank=32, targets="q_proj,o_proj")
    full, _, _ = load_model(str(tiny_model_dir), quant="none", dtype=torch.float32)
    bare, _, _ = load_model(str(tiny_model_dir), quant="nf4", dtype=torch.float32)
    for name in ("q_proj", "o_proj"):
        for i in range(2):
            path = f"model.layers.{i}.self_attn.{name}"
            x = torch.randn(3, 32)
            want = full.get_submodule(path)(x)
            got = model.get_submodule(path)(x)
            assert torch.allclose(got, want, atol=1e-4), path
            assert not torch.allclose(bare.get_submodule(path)(x), want, atol=1e-3)


@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)
def test_a_loftq_adapter_says_so_loads_in_peft_and_merges_into_the_nf4_base(
    tiny_model_dir, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, cfg, peft_targets, source = _loftq_model(tiny_model_dir, rank=4)
    save_adapter(model, tmp_path / "ad", adapter_config_for(cfg, peft_targets, source.name))
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT's "loftq" would re-run LoftQ on load
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert read_adapter(tmp_path / "ad")[0].init == "loftq"
    # transformers + PEFT load it as a plain LoRA adapter, with our factors.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad")
    ours = model.get_submodule("transformer.h.0.attn.c_attn").lora_B["default"].weight
    theirs = peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert torch.equal(ours, theirs)
    # Merged with the default --quant none it goes into the NF4-rounded weights, and says so.
    capsys.readouterr()
    merge_into_base(str(tiny_model_dir), tmp_path / "ad", tmp_path / "merged")
    assert "LoftQ adapter" in capsys.readouterr().out
    merge_into_base(str(tiny_model_dir), tmp_path / "ad", tmp_path / "merged-nf4", quant="nf4")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-nf4").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Combined with another adapter, the result still belongs to the NF4 base.
    assert combine_adapters([tmp_path / "ad", tmp_path / "ad"], [0.5, 0.5], tmp_path / "c").init
    assert read_adapter(tmp_path / "c")[0].init == "loftq"


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_loftq_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    data = _data(tmp_path)
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--steps", "1"]
    argv += ["--seq-len", "64", "--device", "cpu", "--init", "loftq"]
    err = one_line_error([*argv, "--quant", "none", "--out", str(tmp_path / "a")], capsys)
    assert "--init loftq" in err and "--quant none" in err
    err = one_line_error([*argv, "--rank", "64", "--out", str(tmp_path / "b")], capsys)
    assert "--rank 64 is larger than every target" in err and "use --rank 32 or less" in err
    nf4 = quantize_model(tiny_model_dir, tmp_path / "nf4")
    err = one_line_error(
        ["train", "--model", str(nf4), *argv[3:], "--out", str(tmp_path / "c")], capsys
    )
    assert "16-bit weights" in err and "drop --init loftq" in err
    assert not (tmp_path / "c" / "adapter_model.safetensors").exists()
    # The Python API with a model from elsewhere than cfg.model: named, not a shape error.
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=400, hidden_size=64, intermediate_size=96).save_pretrained(other)
    model, _, _ = load_model(str(tiny_model_dir), dtype=torch.float32, with_tokenizer=False)
    with pytest.raises(LorakitError, match="point the run's model setting"):
        attach_adapter(model, TrainConfig(model=str(other), init="loftq", rank=4))


def test_schedules_match_transformers_after_warmup():
    """transformers' schedulers are the reference; ours differ only in warmup, whose first
    step already has a non-zero rate ((step + 1) / warmup, where theirs starts at 0)."""
    from transformers import get_scheduler

    total, warmup = 40, 5
    for schedule in ("cosine", "linear", "constant"):
        name = "constant_with_warmup" if schedule == "constant" else schedule
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
        theirs = [lmbda(s) for lmbda in ref.lr_lambdas for s in range(total + 1)]
        for step in range(total):
            want = theirs[step + 1] if step < warmup else theirs[step]
            assert lr_factor(step, total, warmup, schedule) == pytest.approx(want, abs=1e-12)
    assert warmup_steps(0.1, 40) == 4 and warmup_steps(3, 40) == 3


@pytest.mark.parametrize("tiny_model_dir", ["qwen2"], indirect=True)
def test_the_run_follows_its_schedule_and_warns_when_short(tiny_model_dir, tmp_path, capsys):
    data = _data(tmp_path)
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--seq-len", "64"]
    argv += ["--device", "cpu", "--lr", "0.01", "--warmup", "0", "--samples", "0"]
    assert main([*argv, "--steps", "4", "--schedule", "linear", "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().err  # a warning: on stderr, where it does not mix with results
    assert "only 4 optimizer step(s)" in said and "more --steps" in said
    assert "--schedule constant" in said
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lrs = [json.loads(x)["lr"] for x in lines if '"lr"' in x]
    assert lrs == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    assert (
        main([*argv, "--steps", "20", "--schedule", "constant", "--out", str(tmp_path / "b")]) == 0
    )
    assert "optimizer step(s)" not in capsys.readouterr().err
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(x)["lr"] for x in lines if '"lr"' in x} == {0.01}
    # Resuming it must keep its schedule, as its rank and targets.
    err = one_line_error([*argv, "--steps", "25", "--resume", "--out", str(tmp_path / "b")], capsys)
    assert "--schedule constant" in err and "--resume" in err


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_rank_above_a_layers_dimension_keeps_peft_init_past_it(tiny_model_dir):
    """k_proj is 16 x 32: rank 20 holds all of its error in 16 components, and the 4 left keep
    PEFT's init (B = 0), as they would without LoftQ."""
    model, *_ = _loftq_model(tiny_model_dir, rank=20, targets="q_proj,k_proj")
    weights = _weights(tiny_model_dir)
    layer = model.get_submodule("model.layers.0.self_attn.k_proj")
    b = layer.lora_B["default"].weight
    assert b.shape == (16, 20) and torch.all(b[:, 16:] == 0) and torch.any(b[:, :16] != 0)
    q = layer.base_layer.dequantized_weight(torch.float32)
    delta = layer.scaling["default"] * b @ layer.lora_A["default"].weight
    assert torch.allclose(q + delta, weights["model.layers.0.self_attn.k_proj"], atol=1e-5)


def test_the_randomized_svd_of_a_large_layer_is_near_optimal():
    """Layers wider than FULL_SVD_DIM take torch.svd_lowrank: its rank-r error stays within 1%
    of the exact truncated SVD's on a matrix shaped like quantization error (a flat spectrum
    with a few stronger directions)."""
    from lorakit.training.loftq import FULL_SVD_DIM, low_rank

    g = torch.Generator().manual_seed(0)
    n, rank = FULL_SVD_DIM + 100, 16
    strong = torch.randn(n, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.05
    residual = strong + torch.randn(n, n, generator=g) * 0.01
    u, s, vh = low_rank(residual, rank)
    assert u.shape == (n, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    left = (residual - u @ torch.diag(s) @ vh).square().sum()
    best = torch.linalg.svdvals(residual)[rank:].square().sum()
    assert best <= left <= best * 1.01
