"""`torchrun --nproc-per-node 2 -m lorakit train` on the CPU (gloo): the same optimizer steps,
losses and adapter as one process with the same global batch, rank 0 alone writing, and a
resume across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


def _data(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i} " * 8} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _train(model_dir, data, out, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    argv = ["-m", "lorakit", "train", "--model", str(model_dir), "--data", str(data)]
    argv += ["--out", str(out), "--seq-len", "64", "--micro-batch", "1"]
    argv += ["--samples", "0", "--device", "cpu", "--lr", "1e-2", "--schedule", "constant"]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run([*launcher, *argv, *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _children(pid: int) -> list[str]:
    """The processes whose parent is `pid` (torchrun's workers), from /proc."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(stat.parent.name)
    return sorted(found, key=int)


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("eval_loss")) for r in rows]


def _same_adapter(a, b) -> None:
    x = load_file(str(a / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.allclose(x[key], y[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
@pytest.mark.parametrize("batch", ["4", "3"])  # 3: one rank takes two passes, the other one
def test_two_ranks_take_the_steps_one_process_takes(tiny_model_dir, tmp_path, batch):
    data = _data(tmp_path)
    one = _train(tiny_model_dir, data, tmp_path / "one", 1, "--steps", "4", "--batch-size", batch)
    two = _train(tiny_model_dir, data, tmp_path / "two", 2, "--steps", "4", "--batch-size", batch)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    _same_adapter(tmp_path / "one", tmp_path / "two")
    # Rank 0 alone reports and writes: one summary line, one row per step and evaluation.
    assert two.stdout.count("done: 4 steps") == 1 == one.stdout.count("done: 4 steps")
    assert len(_losses(tmp_path / "two")) == 6  # 4 steps + the evaluations before and after


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_two_ranks_resume_a_run_where_it_stopped(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    _train(tiny_model_dir, data, tmp_path / "one", 1, "--steps", "4")
    out = tmp_path / "two"
    _train(tiny_model_dir, data, out, 2, "--steps", "2", "--save-every", "1")
    _train(tiny_model_dir, data, out, 2, "--steps", "4", "--resume")
    train_losses, straight = _losses(out), _losses(tmp_path / "one")
    # the resumed run: its first two steps, then (after the checkpoint) steps 3 and 4
    assert train_losses[1:3] == pytest.approx(straight[1:3], rel=1e-4)
    assert train_losses[-2:] == pytest.approx(straight[-2:], rel=1e-4)
    _same_adapter(tmp_path / "one", out)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_ranks_started_with_different_settings_are_refused(tiny_model_dir, tmp_path):
    """Each rank reads its own flags; a rank whose settings differ from rank 0's would train
    another run. Refused on every rank, before the output directory is touched."""
    launcher = tmp_path / "mixed.py"
    launcher.write_text(
        "import os, sys\n"
        "from lorakit.cli import main\n"
        "lr = '1e-2' if os.environ['RANK'] == '0' else '1e-3'\n"
        "sys.exit(main([*sys.argv[1:], '--lr', lr]))\n"
    )
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path))]
    argv += ["--out", str(tmp_path / "run"), "--steps", "2", "--seq-len", "64", "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + [str(launcher), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "were started with settings other than rank 0's" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds workers in /proc")
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_rank_killed_mid_run_stops_all_and_resume_goes_on(tiny_model_dir, tmp_path):
    """kill -9 of one rank: torchrun ends the other, the run stops with an error, and --resume
    (two ranks again) finishes it from the last complete checkpoint."""
    import signal
    import time

    data, out = _data(tmp_path), tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    argv += ["-m", "lorakit", "train", "--model", str(tiny_model_dir), "--data", str(data)]
    argv += ["--out", str(out), "--seq-len", "64", "--micro-batch", "1", "--samples", "0"]
    argv += ["--device", "cpu", "--steps", "400", "--save-every", "1", "--schedule", "constant"]
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    assert state.exists() and launcher.poll() is None, "the run ended before its first checkpoint"
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0  # the run stopped, all of it: no rank is left running
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)
    step = json.loads(state.read_text())["step"]
    assert 1 <= step < 400
    _train(tiny_model_dir, data, out, 2, "--steps", str(step + 2), "--resume")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [step + 1, step + 2]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_more_ranks_than_a_step_has_sequences_is_refused(tiny_model_dir, tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    argv += ["-m", "lorakit", "train", "--model", str(tiny_model_dir), "--data"]
    argv += [str(_data(tmp_path)), "--out", str(tmp_path / "run"), "--seq-len", "64"]
    argv += ["--device", "cpu", "--steps", "2", "--batch-size", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    # one line from each rank (torchrun then reports the failed workers its own way)
    assert (
        "error: a step has 1 micro-batch(es) (--batch-size / --micro-batch x --grad-accum)"
        in done.stderr
    )
    assert not (tmp_path / "run").exists()
