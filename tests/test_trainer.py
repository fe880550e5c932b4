"""The training loop: learns, is deterministic, resumes exactly, writes a complete run."""

import json
import os
import signal

import pytest
import torch
from conftest import FACTS, tiny_model

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.training import trainer as T


def _cfg(tmp_path, data_file, **kw):
    base = dict(
        data=str(data_file),
        eval_data=str(data_file),
        out=str(tmp_path / "run"),
        quant="none",
        steps=12,
        batch_size=2,
        seq_len=64,
        lr=1e-2,
        rank=4,
        alpha=8,
        dropout=0.1,
        save_every=0,
        eval_max_sequences=8,
    )
    base.update(kw)
    return T.TrainConfig(**base)


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [
        r["eval_loss"] for r in rows if "eval_loss" in r
    ]


def _run(cfg, tok, seed=0):
    return T.train(
        cfg, tiny_model("llama", vocab_size=len(tok), seed=seed), tok, "tiny", progress=False
    )


def test_training_lowers_eval_loss_and_writes_a_complete_run(tmp_path, data_file, tiny_tokenizer):
    result = _run(_cfg(tmp_path, data_file, steps=25), tiny_tokenizer)
    assert result.final_eval_loss < 0.8 * result.first_eval_loss
    out = result.out
    files = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.json",
        "README.md",
        "metrics.jsonl",
        "loss.png",
        "checkpoint",
    } <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert json.loads((out / "train_config.json").read_text())["steps"] == 25
    assert "eval loss before -> after" in (out / "README.md").read_text()


def test_same_seed_same_losses(tmp_path, data_file, tiny_tokenizer):
    a = _run(_cfg(tmp_path / "a", data_file), tiny_tokenizer)
    b = _run(_cfg(tmp_path / "b", data_file), tiny_tokenizer)
    c = _run(_cfg(tmp_path / "c", data_file, seed=1), tiny_tokenizer)
    assert _losses(a.out) == _losses(b.out)
    assert _losses(a.out)[0] != _losses(c.out)[0]


def test_resume_follows_the_uninterrupted_curve(tmp_path, data_file, tiny_tokenizer, monkeypatch):
    full = _run(_cfg(tmp_path / "full", data_file), tiny_tokenizer)
    step_fn = T.train_step
    calls = {"n": 0}

    def interrupt_at_five(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C arrives during the fifth step
            os.kill(os.getpid(), signal.SIGINT)
        return step_fn(*args, **kw)

    monkeypatch.setattr(T, "train_step", interrupt_at_five)
    part = _run(_cfg(tmp_path / "part", data_file), tiny_tokenizer)
    assert part.interrupted and part.steps == 5
    monkeypatch.setattr(T, "train_step", step_fn)
    resumed = _run(_cfg(tmp_path / "part", data_file, resume=True), tiny_tokenizer)
    assert not resumed.interrupted and resumed.steps == 12
    train_full, eval_full = _losses(full.out)
    train_resumed, eval_resumed = _losses(resumed.out)
    assert train_resumed == pytest.approx(train_full, rel=1e-6)
    assert eval_resumed == pytest.approx(eval_full, rel=1e-6)


def test_micro_batches_give_the_same_gradients_as_whole_batches(data_file, tiny_tokenizer):
    # A batch of 4 sequences as 4 accumulated passes of 1 (the loss normalised over the whole
    # batch) must give the gradients of one pass of 4.
    from lorakit.training.data import collate, load_examples, pack_sequences, tokenize_example

    examples = load_examples(str(data_file))
    rows = pack_sequences([tokenize_example(e, tiny_tokenizer) for e in examples], 64)[:4]
    cfg = T.TrainConfig(rank=4, alpha=8, batch_size=4)

    class Recorder:  # an optimizer that only records the gradients it is given
        param_groups: list = []

        def __init__(self, params):
            self.params = params

        def step(self):
            self.grads = [p.grad.clone() for p in self.params]

        def zero_grad(self, set_to_none=True):
            for p in self.params:
                p.grad = None

    def grads(micro: int):
        model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
        T.attach_adapter(model, cfg)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        trainable = [p for p in model.parameters() if p.requires_grad]
        batches = []
        for i in range(0, 4, micro):
            b = collate(rows[i : i + micro])
            b["real_tokens"] = torch.tensor(0)
            batches.append(b)
        rec = Recorder(trainable)
        out = T.train_step(model, rec, trainable, batches, torch.device("cpu"), torch.float32, cfg)
        return out["loss"], rec.grads

    loss_whole, whole = grads(4)
    loss_split, split = grads(1)
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    assert any(g.abs().max() > 0 for g in whole)
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_auto_micro_batch_gives_small_models_about_pass_tokens_on_a_bf16_cpu():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    small = SimpleNamespace(config=LlamaConfig(hidden_size=576))
    large = SimpleNamespace(config=LlamaConfig(hidden_size=2048))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")

    def micro(model, device=cpu, dtype=torch.bfloat16, **kw):
        cfg = T.TrainConfig(**{"batch_size": 16, **kw})
        return T.micro_batch_size(cfg, device, model, dtype)

    assert micro(small, seq_len=T.PASS_TOKENS // 2) == 2
    assert micro(small, seq_len=T.PASS_TOKENS // 8) == 8
    assert micro(small, seq_len=T.PASS_TOKENS // 8, batch_size=4) == 4  # never past the batch
    assert micro(small, seq_len=T.PASS_TOKENS * 2) == 1
    assert micro(large, seq_len=T.PASS_TOKENS // 2) == 1
    assert micro(large, gpu) == 16
    assert micro(small, micro_batch=3) == 3
    assert micro(small, dtype=torch.float32, seq_len=T.PASS_TOKENS // 8) == 1  # fp32: one
    assert micro(small, dtype=torch.float32, micro_batch=3) == 3


def test_out_dir_holding_a_run_is_refused(tmp_path, data_file, tiny_tokenizer):
    _run(_cfg(tmp_path, data_file, steps=2), tiny_tokenizer)
    with pytest.raises(LorakitError, match="already holds a training run"):
        _run(_cfg(tmp_path, data_file, steps=2), tiny_tokenizer)
    _run(_cfg(tmp_path, data_file, steps=3, overwrite=True), tiny_tokenizer)
    assert len(_losses(tmp_path / "run")[0]) == 3


def test_a_one_example_file_trains_without_eval_and_an_all_eval_file_is_refused(
    tmp_path, tiny_tokenizer
):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"instruction": FACTS[0][0], "output": FACTS[0][1]}) + "\n")
    result = _run(_cfg(tmp_path / "a", one, eval_data=None, steps=2), tiny_tokenizer)
    assert result.steps == 2 and result.first_eval_loss is None  # no example left to hold out
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "A hacker is a person.", "split": "eval"}) + "\n")
    with pytest.raises(LorakitError, match='every example is marked "split": "eval"'):
        _run(_cfg(tmp_path / "b", held, eval_data=None), tiny_tokenizer)


def test_a_diverging_run_stops_with_the_fix(tmp_path, data_file, tiny_tokenizer):
    with pytest.raises(LorakitError, match=r"training diverged at step \d+ .*lower --lr"):
        _run(_cfg(tmp_path, data_file, lr=1e20, dropout=0.0), tiny_tokenizer)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # no NaN adapter


def test_resume_from_a_checkpoint_that_does_not_fit_or_is_corrupt(
    tmp_path, data_file, tiny_tokenizer
):
    _run(_cfg(tmp_path, data_file, steps=2, rank=4), tiny_tokenizer)
    run = tmp_path / "run"
    (run / "train_config.json").unlink()  # past the early check: the tensors must tell
    with pytest.raises(LorakitError, match=r"does not match this run's adapter \(.* is \(4, "):
        _run(_cfg(tmp_path, data_file, steps=3, rank=8, resume=True), tiny_tokenizer)
    state = run / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    with pytest.raises(LorakitError, match="unreadable or corrupt .* --overwrite"):
        _run(_cfg(tmp_path, data_file, steps=3, rank=4, resume=True), tiny_tokenizer)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--seq-len", "8"], "--seq-len 8 is too small"),
        (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--targets", "nope"], "matches no linear layer"),
        (["--model", "no/such/dir"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path, data_file, tiny_model_dir, capsys, flags, message
):
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data_file),
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--samples",
        "0",
        *flags,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_config_file_and_flags(tmp_path, data_file, tiny_model_dir, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'data = "{data_file}"\nsteps = 2\nrank = 2\nseq_len = 64\nsamples = 0\n')
    assert main(["train", "--config", str(config), "--model", str(tiny_model_dir)]) == 2
    assert "unknown setting(s) samples" in capsys.readouterr().err
    config.write_text(f'data = "{data_file}"\nsteps = 2\nrank = 2\nseq-len = 64\n')
    out = tmp_path / "o"
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--model",
            str(tiny_model_dir),
            "--rank",
            "3",
            "--out",
            str(out),
            "--samples",
            "1",
            "--quant",
            "nf4",
        ]
    )
    assert code == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["rank"] == 3 and saved["steps"] == 2 and saved["seq_len"] == 64  # flag wins
    printed = capsys.readouterr().out
    assert "base :" in printed and "tuned:" in printed and "eval loss" in printed


@pytest.mark.oracle
def test_trained_qlora_adapter_loads_in_peft_with_same_logits(tmp_path, data_file, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_model
    from lorakit.quant.linear import NF4Linear
    from lorakit.quant.nf4 import dequantize_nf4

    model, tok, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32)
    cfg = _cfg(tmp_path, data_file, quant="nf4", steps=4)
    result = T.train(cfg, model, tok, str(tiny_model_dir), progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # The reference base carries exactly our dequantized NF4 weights.
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            ref = reference.get_submodule(name.removesuffix(".base_layer"))
            w = dequantize_nf4(module.state, torch.float32)
            ref.weight.data.copy_(w.T if type(ref).__name__ == "Conv1D" else w)
    peft_model = peft.PeftModel.from_pretrained(reference, result.out).eval()
    model.eval()
    ids = torch.randint(0, len(tok), (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
