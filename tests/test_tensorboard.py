"""--report-to tensorboard: metrics.jsonl's numbers as TensorBoard scalars, resumable."""

import builtins
import json
import os
import signal

import pytest
from test_trainer import _cfg, _run

from lorakit.cli import main
from lorakit.training import trainer as T

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _scalars(out, tag):
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _rows(out, key):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_the_scalars_are_metrics_jsonl_and_a_resumed_run_does_not_fork(
    tmp_path, data_file, tiny_tokenizer, monkeypatch
):
    cfg = _cfg(tmp_path, data_file, report_to="tensorboard", save_every=4, eval_every=4)
    step_fn, calls = T.train_step, {"n": 0}

    def interrupt_at_six(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # past the step-4 checkpoint: steps 5-6 are logged, then dropped
            os.kill(os.getpid(), signal.SIGINT)
        return step_fn(*args, **kw)

    monkeypatch.setattr(T, "train_step", interrupt_at_six)
    part = _run(cfg, tiny_tokenizer)
    assert part.interrupted
    monkeypatch.setattr(T, "train_step", step_fn)
    cfg.resume = True
    out = _run(cfg, tiny_tokenizer).out
    for tag, key in [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/tokens_per_s", "tokens_per_s"),
        ("eval/loss", "eval_loss"),
    ]:
        got, want = _scalars(out, tag), _rows(out, key)
        assert [s for s, _ in got] == [s for s, _ in want], tag  # each step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert [s for s, _ in _scalars(out, "train/loss")] == list(range(1, 13))


def test_without_the_package_the_flag_is_refused_in_one_line(
    tmp_path, data_file, tiny_model_dir, capsys, monkeypatch
):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.split(".")[0] == "tensorboard" or name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file)]
    args += ["--out", str(tmp_path / "o"), "--steps", "1", "--report-to", "tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0], err
    assert not (tmp_path / "o").exists()
