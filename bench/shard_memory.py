"""Peak memory per process of `lorakit train`: one process, N torchrun ranks (data parallel,
a whole 4-bit base each; with the weight cache as `auto` picks, and off as a sharded run has
it), and N ranks with `--shard-base` (the base split over them, FSDP2).

    python bench/shard_memory.py MODEL [--ranks 2] [--steps 2] [--seq-len 512] [--batch-size 2]
        [--runs 0,1,2,3]

Each run trains MODEL on the embedded data (one held-out example for the evaluations, so that
they stay short) in a fresh process tree; every worker's peak resident memory (VmHWM, polled
from /proc) is recorded. Prints a markdown table and the losses (the three must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def status_kib(pid: int, field: str) -> int | None:
    """A memory figure of /proc/PID/status (VmHWM: peak resident; RssAnon: resident now, less
    the file pages a memory-mapped checkpoint brings in, which the system can drop)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(argv: list[str], workers: int) -> tuple[list[float], list[float], float]:
    """Run `argv`; the peak RSS and the highest anonymous RSS seen (GiB) of its `workers`
    biggest processes, and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    anon: dict[int, int] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            if (kib := status_kib(pid, "VmHWM")) is not None:
                peaks[pid] = max(peaks.get(pid, 0), kib)
            if (kib := status_kib(pid, "RssAnon")) is not None:
                anon[pid] = max(anon.get(pid, 0), kib)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{out[-3000:]}")
    top = sorted(peaks, key=peaks.get, reverse=True)[:workers]
    wall = time.perf_counter() - t0
    return [peaks[p] / 2**20 for p in top], [anon[p] / 2**20 for p in top], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--runs", default="0,1,2,3", help="which rows to run (0-3), default all")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shard-memory-"))
    held_out = tmp / "eval.jsonl"
    held_out.write_text(json.dumps({"instruction": "What is a kludge?", "output": "A hack."}))
    common = ["-m", "lorakit", "train", "--model", args.model, "--steps", str(args.steps)]
    common += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    common += ["--samples", "0", "--device", "cpu", "--eval-data", str(held_out), "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += [f"--nproc-per-node={args.ranks}"]
    runs = {
        "1 process": ([sys.executable, *common], 1),
        f"{args.ranks} ranks, data parallel": ([*torchrun, *common], args.ranks),
        f"{args.ranks} ranks, data parallel, --cache-weights off": (
            [*torchrun, *common, "--cache-weights", "off"],
            args.ranks,
        ),
        f"{args.ranks} ranks, --shard-base": ([*torchrun, *common, "--shard-base"], args.ranks),
    }
    print(f"{args.model}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens\n")
    print(
        "| run | peak RSS per process (GiB) | all processes | peak anonymous RSS per process "
        "| s/step | wall (s) | losses |"
    )
    print("|---|---|---|---|---|---|---|")
    chosen = {int(i) for i in args.runs.split(",")}
    for i, (name, (argv, workers)) in enumerate(runs.items()):
        if i not in chosen:
            continue
        out = tmp / f"run{i}"
        peaks, anon, wall = run([*argv, "--out", str(out)], workers)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        losses = ", ".join(f"{r['loss']:.4f}" for r in steps)
        per_step = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / max(len(steps) - 1, 1)
        each, each_anon = (" / ".join(f"{p:.2f}" for p in v) for v in (peaks, anon))
        print(
            f"| {name} | {each} | {sum(peaks):.2f} | {each_anon} | {per_step:.1f} | {wall:.0f} "
            f"| {losses} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
