"""`lorakit plan`'s predicted peak and speed against what `lorakit train` then does, each in its
own process, with the same settings.

    python bench/plan_vs_train.py [MODEL ...] [--seq-len 512] [--batch-size 1] [--steps 4]
        [--memory 6GB] [--limit 6GB] [--eval-data FILE] [--targets SPEC]

For each model: `lorakit plan --json` (predicted peak, seconds a step), then `lorakit train`
for a few steps on the embedded data; its peak resident memory is its ru_maxrss, with the peaks of
its anonymous and file-backed parts (a 4-bit checkpoint's codes are memory-mapped: file pages
the kernel drops again under memory pressure) and the bytes it read from disk. `--memory`
goes to both (train's auto settings follow it); `--eval-data` (a file of one example, say)
keeps a big model's start and end evaluation short. `--limit` runs train in a memory cgroup of
that size (Linux cgroup v1, as root): a machine that small, page cache included, so memory-mapped
4-bit weights that do not fit are read from disk again. Prints a Markdown table for
BENCHMARKS.md, with the settings and the last step's seconds. The first steps carry the warm-up:
a 7B's ran 47.9, 41.0, 34.2 and 34.5 s (`--memory 6GB`), so the default is 4 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from lorakit.training.config import parse_size


def _proc(pid: int, name: str, key: str) -> int:
    """A field of /proc/PID/status (kB, as bytes) or /proc/PID/io (bytes); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            line = next(x for x in f if x.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0
    value = int(line.split()[1])
    return value * 1024 if name == "status" else value


@contextmanager
def memory_cgroup(limit: int | None, model: str) -> Iterator[Path | None]:
    """A memory cgroup of `limit` bytes under this process's own (cgroup v1, as root), removed
    after: the machine made that small, page cache included; None for no limit. The model's
    files leave the page cache first: pages cached already are charged to another group."""
    if limit is None:
        yield None
        return
    with open("/proc/self/cgroup") as f:
        mine = next((x.split(":", 2)[2].strip() for x in f if ":memory:" in x), None)
    root = Path("/sys/fs/cgroup/memory")
    if mine is None or not root.is_dir():
        raise SystemExit("--limit needs Linux's cgroup v1 memory controller (and root)")
    for file in Path(model).glob("*.safetensors") if Path(model).is_dir() else []:
        with open(file, "rb") as f:  # out of the page cache: read again, charged to the group
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    group = root / mine.lstrip("/") / f"lorakit-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        group.rmdir()


def _join(procs: Path) -> None:
    procs.write_text(str(os.getpid()))  # in the child, before it runs lorakit


def run_train(model: str, flags: list[str], steps: int, limit: int | None = None) -> dict:
    """`lorakit train` for `steps` steps: its peak RSS (ru_maxrss), the peaks of its anonymous and
    file-backed (memory-mapped 4-bit codes) parts sampled every 0.2 s, the bytes it read from
    disk, tokens/s and seconds a step; within `limit` bytes (a memory cgroup) if given, with the
    cgroup's peak (page cache included) and how often it hit the limit."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["lorakit", "train", "--model", model, "--steps", str(steps), "--out", out]
        argv += [*flags, "--save-every", "0", "--lr", "1e-4"]
        got = {"peak": 0, "anon": 0, "file": 0, "read": 0}
        with tempfile.TemporaryFile("w+") as log, memory_cgroup(limit, model) as group:
            enter = None if group is None else partial(_join, group / "cgroup.procs")
            child = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=enter
            )
            while not (ended := os.wait4(child.pid, os.WNOHANG))[0]:
                got["anon"] = max(got["anon"], _proc(child.pid, "status", "RssAnon"))
                got["file"] = max(got["file"], _proc(child.pid, "status", "RssFile"))
                got["read"] = max(got["read"], _proc(child.pid, "io", "read_bytes"))
                time.sleep(0.2)
            got["peak"] = ended[2].ru_maxrss * 1024  # the kernel's own peak, not a sample
            if group is not None:
                got["group_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
                got["limit_hits"] = int((group / "memory.failcnt").read_text())
            log.seek(0)
            text = log.read()
        if os.waitstatus_to_exitcode(ended[1]) != 0 or "done:" not in text:
            raise SystemExit(f"lorakit train failed:\n{text[-2000:]}")
        # the last step's own time (the first ones carry the warm-up), from the run's metrics
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        times = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    got["step_s"] = times[-1] - times[-2] if len(times) > 1 else times[-1]
    got["streamed"] = "read from disk" in text
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory", help="the run's memory cap, for plan and train (e.g. 6GB)")
    p.add_argument(
        "--limit", help="run train in a memory cgroup this big (e.g. 6GB; cgroup v1, as root)"
    )
    p.add_argument("--eval-data", help="train's held-out file (default: its own split)")
    p.add_argument("--targets", help="the adapted modules, for plan and train (default: theirs)")
    args = p.parse_args()
    flags = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    flags += ["--memory", args.memory] if args.memory else []
    flags += ["--targets", args.targets] if args.targets else []
    extra = ["--eval-data", args.eval_data, "--samples", "0"] if args.eval_data else []
    print(
        "| model | settings | predicted peak | measured peak RSS | predicted / measured "
        "| predicted s a step | measured s a step (the last) | predicted / measured "
        "| peak anonymous / file-backed | read from disk |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        plan = json.loads(
            subprocess.run(
                ["lorakit", "plan", model, "--json", "--device", "cpu", *flags],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        limit = parse_size(args.limit) if args.limit else None
        got = run_train(model, [*flags, *extra, "--device", "cpu"], args.steps, limit)
        peak = got["peak"]
        predicted = plan["peak_memory_bytes"]
        guess = plan["speed"]["seconds_per_step"] if plan["speed"] else float("nan")
        s = plan["settings"]
        on = {True: "on", False: "off"}
        settings = (
            f"{s['batch_size']} x {s['seq_len']}, checkpointing {on[s['grad_checkpointing']]}, "
            f"cache {on[s['cache_weights']]}"
            + (", weights read from disk" if got["streamed"] else "")
        )
        if limit is not None:
            settings += (
                f"; in a {args.limit} memory cgroup: its peak {got['group_peak'] / 2**30:.2f} "
                f"GiB (page cache included), at the limit {got['limit_hits']} times"
            )
        print(
            f"| {model} | {settings} | {predicted / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | "
            f"{predicted / peak:.2f} | {guess:.1f} | {got['step_s']:.1f} | "
            f"{guess / got['step_s']:.2f} | {got['anon'] / 2**30:.2f} / "
            f"{got['file'] / 2**30:.2f} GiB "
            f"| {got['read'] / 2**30:.1f} GiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
