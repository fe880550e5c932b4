"""Training survives the crashes real machines have: `kill -9` at any moment, including in the
middle of writing a checkpoint, and a disk that fills up while saving. `--resume` then goes on
from the last complete checkpoint with the loss curve of a run that was never interrupted."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from test_distributed import _data, _losses, _same_adapter, _train

from lorakit.errors import LorakitError

STEPS = 6

# Runs `lorakit` with one file operation turned into a real SIGKILL of the process: the
# KILL_NTH-th rename onto a file named KILL_AT (after the temporary file is complete, before it
# takes the name), or, with KILL_AT=half-written, the KILL_NTH-th checkpoint half written.
KILLER = """
import os, signal, sys
import safetensors.torch
from lorakit.cli import main

target, nth, seen = os.environ["KILL_AT"], int(os.environ["KILL_NTH"]), [0]
real_replace, real_save = os.replace, safetensors.torch.save_file

def replace(src, dst):
    if str(dst).endswith(target):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if target == "half-written" and "state.safetensors" in str(path):
        seen[0] += 1
        if seen[0] == nth:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

os.replace, safetensors.torch.save_file = replace, save_file
sys.exit(main(sys.argv[1:]))
"""


def _argv(model_dir, data, out) -> list[str]:
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--seq-len", "64", "--micro-batch", "1", "--samples", "0", "--device", "cpu"]
    return argv + ["--lr", "1e-2", "--schedule", "constant", "--steps", str(STEPS)]


def _killed(tmp_path, argv: list[str], at: str, nth: int) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_AT": at, "KILL_NTH": str(nth)}
    done = subprocess.run(
        [sys.executable, str(script), *argv], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == -9, done.stderr[-2000:]


def _checkpoint_step(out) -> int:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        return int(f.metadata()["step"])


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
@pytest.mark.parametrize(
    "at,nth,resumes_from",
    [
        ("state.safetensors", 3, 2),  # step 3's checkpoint complete on disk, not yet renamed
        ("state.json", 3, 3),  # step 3's committed, its readable copy not written
        ("half-written", 3, 2),  # step 3's killed half-way through writing
        ("adapter_model.safetensors", 1, STEPS),  # all steps done, the adapter not written
        ("timer", 0, None),  # a moment the run does not choose
    ],
)
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_curve(
    tiny_model_dir, tmp_path, at, nth, resumes_from
):
    data, out = _data(tmp_path), tmp_path / "run"
    _train(tiny_model_dir, data, tmp_path / "straight", 1, "--steps", str(STEPS))
    argv = _argv(tiny_model_dir, data, out) + ["--save-every", "1"]
    if resumes_from is not None:
        _killed(tmp_path, argv, at, nth)
        assert _checkpoint_step(out) == resumes_from
    else:  # a while after its first checkpoint
        run = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stderr=subprocess.PIPE)
        state = out / "checkpoint" / "state.safetensors"
        while not state.exists() and run.poll() is None:
            time.sleep(0.01)
        time.sleep(0.15)
        run.kill()
        run.communicate(timeout=60)
        if run.returncode == 0:
            pytest.skip("the run finished before the kill")
    _train(tiny_model_dir, data, out, 1, "--steps", str(STEPS), "--resume")
    assert _losses(out) == pytest.approx(_losses(tmp_path / "straight"), rel=1e-5)
    _same_adapter(tmp_path / "straight", out)
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoint").iterdir()]]
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers  # cleared on resume


def _no_room(how: str):
    """A save_file that fails as a full disk makes it fail, on its third call."""
    import resource
    import signal

    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, [0]

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] != 3:
            return real_save(tensors, path, metadata=metadata)
        if how == "enospc":  # part of it written, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # safetensors' own failure: a file-size limit makes its write fail half-way (EFBIG)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        try:
            real_save(tensors, path, metadata=metadata)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    return real_save, save_file


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file-size limits")
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
@pytest.mark.parametrize("how", ["enospc", "safetensors"])
def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(
    tiny_model_dir, tmp_path, monkeypatch, how
):
    import safetensors.torch

    from lorakit.training.config import TrainConfig
    from lorakit.training.trainer import train

    real_save, full_disk = _no_room(how)

    data, out = _data(tmp_path), tmp_path / "run"
    cfg = dict(model=str(tiny_model_dir), data=str(data), out=str(out), seq_len=64)
    cfg.update(micro_batch=1, device="cpu", lr=1e-2, schedule="constant", steps=STEPS)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(LorakitError) as e:
        train(TrainConfig(**cfg, save_every=1), progress=False)
    assert str(e.value).startswith("checkpoint of step 3 not saved: could not write")
    assert str(e.value).endswith("(the step-2 one is intact)")
    if how == "enospc":
        assert "No space left on device; free some disk space" in str(e.value)
    assert not [p for p in (out / "checkpoint").iterdir() if p.name.endswith(".tmp")]
    assert _checkpoint_step(out) == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    train(TrainConfig(**cfg, save_every=1, resume=True), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
