"""The training memory estimate, the auto settings it decides, and the refusal before loading."""

import dataclasses

import pytest
import torch
from conftest import tiny_model

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.models.loading import load_model
from lorakit.quant.linear import dequantized_bytes
from lorakit.training import memory
from lorakit.training.config import TrainConfig
from lorakit.training.trainer import attach_adapter

MiB = 2**20


def test_weights_and_adapter_are_what_the_loaded_model_holds(tiny_model_dir):
    cfg = TrainConfig(model=str(tiny_model_dir), quant="none", rank=4, targets="all-linear")
    full, _, _ = load_model(tiny_model_dir, quant="none", dtype=torch.float32)
    est = memory.estimate(full, cfg, torch.float32, micro=1)
    assert est.base == sum(p.nbytes for p in full.parameters()) and est.cache == 0
    nf4_model, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    held = sum(t.nbytes for t in [*nf4_model.parameters(), *nf4_model.buffers()])
    nf4 = memory.estimate(full, cfg, torch.float32, micro=1, quant="nf4")
    assert nf4.base == pytest.approx(held, rel=0.05)
    assert nf4.cache == dequantized_bytes(nf4_model, torch.float32)
    attach_adapter(full, cfg)
    trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert est.adapter == trainable * (4 + 4 + 8)  # weight, gradient, AdamW's two moments


def test_activations_grow_with_the_micro_batch_and_checkpointing_keeps_a_sliver():
    model = tiny_model("llama", num_hidden_layers=8)
    cfg = TrainConfig(seq_len=64)
    one, four = (memory.estimate(model, cfg, torch.float32, micro=m) for m in (1, 4))
    assert four.activations == 4 * one.activations
    assert one.checkpointed < one.activations / 4
    assert four.base == one.base and four.adapter == one.adapter
    half = memory.estimate(model, cfg, torch.bfloat16, micro=1)
    assert half.activations == one.activations // 2


def _autograd_keeps(model, cfg) -> int:
    """Bytes of the tensors autograd saves for backward in one training pass of `model` with
    cfg's adapter attached (the weights left out)."""
    attach_adapter(model, cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 400, (1, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(ids).last_hidden_state
    hidden.sum().backward()
    return sum(saved.values())


def _typical_llama(layers: int = 2):
    """A LLaMA with a typical shape ratio (MLP 2.7x hidden), frozen, in training mode."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=344, num_hidden_layers=layers)
    return model.train().requires_grad_(False)


def test_activation_estimate_is_near_what_autograd_keeps():
    """Bytes of the tensors autograd saves for backward in one fp32 training pass, against the
    estimate: within a factor 2."""
    model = _typical_llama()
    cfg = TrainConfig(seq_len=128, targets="default", rank=4)
    est = memory.estimate(model, cfg, torch.float32, micro=1)
    kept = _autograd_keeps(model, cfg)
    print(f"autograd kept {kept / MiB:.2f} MiB, estimate {est.activations / MiB:.2f} MiB")
    assert est.activations / 2 < kept < est.activations * 2


def test_layers_below_every_adapter_keep_nothing_and_are_not_counted():
    """Adapters on the top layer of four: backward stops there, autograd keeps about a quarter
    of what it keeps with adapters everywhere, and the estimate counts one layer in four."""
    cfg = TrainConfig(seq_len=128, targets="default", rank=4)
    top = TrainConfig(seq_len=128, targets=r"re:.*layers\.3\.self_attn\.(q|v)_proj", rank=4)
    every, last = _typical_llama(4), _typical_llama(4)
    est_every = memory.estimate(every, cfg, torch.float32, micro=1)
    est_last = memory.estimate(last, top, torch.float32, micro=1)
    assert est_last.activations == est_every.activations // 4
    assert est_last.checkpointed < est_every.checkpointed
    ratio = _autograd_keeps(last, top) / _autograd_keeps(every, cfg)
    assert 0.15 < ratio < 0.35, ratio


def _est(**parts):
    zero = {f.name: 0 for f in dataclasses.fields(memory.MemoryEstimate)}
    return memory.MemoryEstimate(**{**zero, **parts})


def test_auto_settings_follow_the_budget():
    est = _est(base=100, cache=400, adapter=10, activations=1000, checkpointed=50, loss=20)
    assert memory.choose(est, 100_000, "auto", "auto") == (False, True)  # room for all
    assert memory.choose(est, 3_000, "auto", "auto") == (True, False)  # 1000 > (3000-180)/4
    assert memory.choose(est, 3_000, "off", "auto") == (False, False)  # asked for, and fits
    assert memory.choose(est, 3_000, "on", "on") == (True, True)


@pytest.mark.parametrize(
    ("budget", "settings", "says"),
    [
        (150, ("auto", "auto"), "needs at least 0.0 GiB"),
        (1_000, ("off", "auto"), "use --grad-checkpointing on"),
        (500, ("on", "on"), "use --cache-weights off"),
    ],
)
def test_settings_that_cannot_fit_are_refused_naming_the_fix(budget, settings, says):
    est = _est(base=100, cache=400, adapter=10, activations=1000, checkpointed=50, loss=20)
    with pytest.raises(LorakitError, match=says.replace(".", r"\.")):
        memory.choose(est, budget, *settings)


def test_train_refuses_before_reading_a_weight(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lorakit.models import loading

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read before the memory check")

    monkeypatch.setattr(memory, "device_budget", lambda device, cap=None: 1 * MiB)
    monkeypatch.setattr(loading, "read_tensors", no_reading)
    argv = ["train", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least" in err[0] and "--micro-batch" in err[0]
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_memory_flag_caps_the_budget_counting_what_the_process_holds(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "free_memory", lambda device: 20 * 2**30)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 2 * 2**30)
    assert memory.device_budget(cpu) == 20 * 2**30
    assert memory.device_budget(cpu, cap=6 * 2**30) == 4 * 2**30  # 6 GB, 2 of them held
    assert memory.device_budget(cpu, cap=1 * 2**30) == 0
    assert memory.run_budget(TrainConfig(memory="6GB"), cpu) == 4 * 2**30
    assert memory.run_budget(TrainConfig(memory="64G"), cpu) == 20 * 2**30  # what is free


def test_train_memory_flag_refuses_before_loading_and_is_checked(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--memory", "1MB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least" in err[0]
    assert main([*argv, "--memory", "six gigs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lorakit train: error: --memory 'six gigs' is not a size; write it like 16GB or 512MB"
    ]
    assert not out.exists() or not any(out.iterdir())


def test_evaluation_leaves_no_kernel_scales_behind(tiny_model_dir):
    from lorakit.quant.linear import NF4Linear
    from lorakit.training.loss import evaluate

    model, _, _ = load_model(tiny_model_dir, dtype=torch.float32, with_tokenizer=False)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(ids).logits  # a no-grad forward prepares each layer's kernel call
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert layers and all("_kernel_weight" in m.__dict__ for m in layers)
    loss = evaluate(model, [batch], torch.device("cpu"), torch.float32, 64)
    assert all("_kernel_weight" not in m.__dict__ for m in layers)  # released for the steps
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # prepared again, the same results
    assert loss == evaluate(model, [batch], torch.device("cpu"), torch.float32, 64)


def test_a_base_that_fits_only_on_disk_streams_from_its_4bit_file_or_is_told_how():
    parts = dict(base=1000, adapter=10, activations=1000, checkpointed=50, loss=20, codes=900)
    # the leanest run: 1080, of which 900 are 4-bit codes; all but them: 180
    with pytest.raises(LorakitError, match="lorakit quantize MODEL --out DIR"):
        memory.choose(_est(**parts), 500, "auto", "auto")  # quantized while loading: in memory
    streamed = _est(**parts, mapped=True)  # a 4-bit checkpoint: the codes can stay on disk
    assert memory.choose(streamed, 500, "auto", "auto") == (True, False)
    assert "read from disk" in memory.streaming_note(streamed, 500)
    assert memory.streaming_note(streamed, 2_000) is None  # it all fits in memory
    with pytest.raises(LorakitError, match="needs at least 0.0 GiB with the 4-bit weights read"):
        memory.choose(streamed, 150, "auto", "auto")  # not even the rest fits
