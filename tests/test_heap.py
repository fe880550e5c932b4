"""lorakit.heap: with glibc's mmap threshold fixed at 4 MB, blocks over it that are freed go back
to the system; at the 16 MB glibc's own threshold rises to after a training step frees a
dequantized weight, the heap keeps them (small live blocks between them pin it). Each case
runs in a fresh process (the setting is process-wide); a threshold the user set is kept."""

import os
import shutil
import subprocess
import sys

import pytest

from lorakit.heap import OPT_OUT, RESTARTED, TUNABLES, tuned_environ

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


# Started by every Python process of a test (PYTHONPATH): what the process started with, its
# GLIBC_TUNABLES when it ends, and (fp32) a CPU without BF16 made of this one.
SITE = """
import atexit, os
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
if os.environ.get("TEST_FP32"):
    import torch
    torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: False
def report():  # VmHWM: this program's own peak (ru_maxrss starts at the forking parent's RSS)
    with open("/proc/self/status") as f:
        peak = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
    print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), peak, flush=True)
atexit.register(report)
"""


def clean_env(tmp_path) -> dict:
    """This environment without heap settings, with SITE started by every Python process."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    drop = ("GLIBC_TUNABLES", OPT_OUT, RESTARTED, "LD_PRELOAD")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(site)}


def lines(stdout: str, kind: str) -> list[list[str]]:
    return [line.split()[1:] for line in stdout.splitlines() if line.startswith(kind + " ")]


@pytest.mark.slow
def test_train_in_fp32_reuses_its_freed_temporaries_with_the_small_block_caches_off(
    tmp_path, data_file
):
    """`lorakit train` on the default model as a CPU without BF16 runs it (fp32, PyTorch's own
    operations), one step of 2 x 512 tokens, with glibc's defaults and as the command runs."""
    env = clean_env(tmp_path)
    if tuned_environ(env) is None:
        pytest.skip("not glibc 2.26 or later")
    one = tmp_path / "one.jsonl"  # a short evaluation before and after
    one.write_text(data_file.read_text().splitlines()[0] + "\n")
    peaks = {}
    for name, setting in (("glibc", {OPT_OUT: "off"}), ("tuned", {})):
        run = subprocess.run(
            [sys.executable, "-m", "lorakit", "train", "--steps", "1", "--batch-size", "2",
             "--seq-len", "512", "--eval-data", str(one), "--out", str(tmp_path / name),
             "--save-every", "0"],
            capture_output=True, text=True, env={**env, **setting, "TEST_FP32": "1"},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[name] = float(lines(run.stdout, "end")[-1][-1])
    # glibc's defaults strand about 0.4 GB of freed temporaries here (lorakit/heap.py)
    assert peaks["tuned"] < peaks["glibc"] - 200, peaks


def test_tuned_environ_adds_the_tunables_and_keeps_the_users_own():
    if tuned_environ({}) is None:
        pytest.skip("not glibc 2.26 or later")
    env = tuned_environ({"PATH": "/bin"})
    assert env["PATH"] == "/bin" and env[RESTARTED] == "-"
    assert sorted(env["GLIBC_TUNABLES"].split(":")) == sorted(f"{k}=0" for k in TUNABLES)
    theirs = "glibc.malloc.tcache_count=3:glibc.malloc.check=1"
    own = tuned_environ({"GLIBC_TUNABLES": theirs})
    assert own["GLIBC_TUNABLES"] == theirs + ":glibc.malloc.mxfast=0"  # theirs kept as set
    assert own[RESTARTED] == theirs  # what the restarted process puts back
    everything = ":".join(f"{k}=1" for k in TUNABLES)
    assert tuned_environ({"GLIBC_TUNABLES": everything}) is None  # all theirs: no restart
    assert tuned_environ({RESTARTED: "-"}) is None  # restarted already
    assert tuned_environ({OPT_OUT: "off"}) is None and tuned_environ({OPT_OUT: "0"}) is None
    assert tuned_environ({OPT_OUT: "on"}) is not None  # only off turns it off
    assert tuned_environ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None


# A script that runs the command line in its own process, as a notebook's `%run -m` or a
# debugger does: sys.argv set, main() without arguments.
SCRIPT = """
import sys
sys.argv = ["lorakit", "train", "--steps", "abc"]
from lorakit.cli import main
raise SystemExit(main())
"""


@pytest.mark.parametrize(
    ("argv", "restarts"),
    [
        (["-m", "lorakit", "train", "--steps", "abc"], True),
        (["lorakit", "train", "--steps", "abc"], True),  # pip's console script
        (["-m", "lorakit", "plan", "--steps", "abc"], False),  # not a long run
        (["-c", SCRIPT], False),  # not the lorakit command itself: never run again
    ],
)
def test_the_train_command_starts_again_in_place_with_the_tunables(tmp_path, argv, restarts):
    env = clean_env(tmp_path)
    tuned = tuned_environ(env)
    if tuned is None:
        pytest.skip("not glibc 2.26 or later")
    if argv[0] == "lorakit":
        script = shutil.which("lorakit")
        if script is None:
            pytest.skip("no lorakit console script on PATH")
        argv = [script, *argv[1:]]
    else:
        argv = [sys.executable, *argv]
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "--steps" in run.stderr  # then the command ran as usual
    starts, ends = lines(run.stdout, "start"), lines(run.stdout, "end")
    pid = starts[0][0]
    if restarts:
        assert starts == [[pid, "None"], [pid, tuned["GLIBC_TUNABLES"]]]  # the same process
    else:
        assert starts == [[pid, "None"]]
    assert ends[0][:2] == [pid, "None"]  # the environment put back for what it starts
