"""lorakit.heap: with glibc's mmap threshold fixed at 4 MB, blocks over it that are freed go back
to the system; at the 16 MB glibc's own threshold rises to after a training step frees a
dequantized weight, the heap keeps them (small live blocks between them pin it). Each case
runs in a fresh process (the setting is process-wide); a threshold the user set is kept."""

import os
import subprocess
import sys

import pytest

from lorakit.heap import MARK, TUNABLES, tuned_environ

PROBE = """
import torch
from lorakit.heap import fix_mmap_threshold
fixed = fix_mmap_threshold()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
blocks, pins = [], []
for _ in range(30):  # 6 MB blocks with small live ones between them
    blocks.append(torch.ones(1_500_000))
    pins.append(torch.ones(100_000))  # 400 KB: from the top of the heap, after the block
del blocks
pinned = sum(p.nbytes for p in pins)
print(fixed, (rss() - before - pinned) / 2**20)
"""


def held(env: dict) -> tuple[str, float]:
    """(whether lorakit fixed the threshold, MB the process still holds of 180 MB freed)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_blocks_go_back_to_the_system_with_the_threshold_fixed():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    fixed, kept = held(env)
    if fixed != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert kept < 5  # mapped, and unmapped when freed
    fixed, kept = held({**env, "MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)})
    assert fixed == "False"  # the user's setting is kept ...
    assert kept > 100  # ... and with it the heap holds on to what was freed


# `lorakit train` on the default model as a CPU without BF16 runs it (fp32, PyTorch's own
# operations): one step of 2 x 512 tokens. Prints the peak resident memory in MB.
TRAIN_FP32 = """
import resource, sys, torch
torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: False  # no BF16 here: fp32 compute
sys.argv = ["lorakit", "train", "--steps", "1", "--batch-size", "2", "--seq-len", "512",
            "--eval-data", sys.argv[1], "--out", sys.argv[2], "--save-every", "0"]
from lorakit.cli import main
status = main()
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
raise SystemExit(status)
"""


@pytest.mark.slow
def test_train_in_fp32_reuses_its_freed_temporaries_with_the_small_block_caches_off(
    tmp_path, data_file
):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MARK)}
    if tuned_environ(env) is None:
        pytest.skip("not glibc")
    one = tmp_path / "one.jsonl"  # a short evaluation before and after
    one.write_text(data_file.read_text().splitlines()[0] + "\n")
    peaks = {}
    for name, setting in (("glibc", {MARK: "off"}), ("tuned", {})):
        run = subprocess.run(
            [sys.executable, "-c", TRAIN_FP32, str(one), str(tmp_path / name)],
            capture_output=True, text=True, env={**env, **setting},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[name] = float(run.stdout.split("peak")[-1])
    # glibc's defaults strand about 0.4 GB of freed temporaries here (lorakit/heap.py)
    assert peaks["tuned"] < peaks["glibc"] - 200, peaks


def test_tuned_environ_adds_the_tunables_and_keeps_the_users_own():
    if tuned_environ({}) is None:
        pytest.skip("not glibc")
    env = tuned_environ({"PATH": "/bin"})
    assert env["PATH"] == "/bin" and env[MARK]
    assert sorted(env["GLIBC_TUNABLES"].split(":")) == sorted(f"{k}=0" for k in TUNABLES)
    own = tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3:glibc.malloc.check=1"})
    assert own["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.tcache_count=3",  # theirs wins
        "glibc.malloc.check=1",
        "glibc.malloc.mxfast=0",
    ]
    everything = ":".join(f"{k}=1" for k in TUNABLES)
    assert tuned_environ({"GLIBC_TUNABLES": everything}) is None  # all theirs: no restart
    assert tuned_environ({MARK: "tuned"}) is None  # restarted already (or kept off)


# The command line as a console script runs it: sys.argv set, main() without arguments.
RESTART = """
import os, sys
print("started", os.environ.get("GLIBC_TUNABLES"), flush=True)
sys.argv = ["lorakit", sys.argv[1], "--steps", "abc"]
from lorakit.cli import main
raise SystemExit(main())
"""


@pytest.mark.parametrize(("command", "restarts"), [("train", True), ("plan", False)])
def test_train_starts_again_with_the_tunables_other_commands_do_not(command, restarts):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MARK)}
    if tuned_environ(env) is None:
        pytest.skip("not glibc")
    run = subprocess.run(
        [sys.executable, "-c", RESTART, command], capture_output=True, text=True, env=env
    )
    starts = [line for line in run.stdout.splitlines() if line.startswith("started")]
    assert run.returncode == 2 and "--steps" in run.stderr  # then the command ran as usual
    if restarts:
        assert starts[0] == "started None"
        assert starts[1] == "started " + tuned_environ(env)["GLIBC_TUNABLES"]
    else:
        assert starts == ["started None"]
