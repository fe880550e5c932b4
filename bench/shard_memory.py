"""Peak memory per process of `lorakit train`: one process, N torchrun ranks (data parallel,
a whole 4-bit base each; with the weight cache as `auto` picks, and off as a sharded run has
it), and N ranks with `--shard-base` (the base split over them, FSDP2).

    python bench/shard_memory.py MODEL [--ranks 2] [--steps 2] [--seq-len 512] [--batch-size 2]

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


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(argv: list[str], workers: int) -> tuple[list[float], float]:
    """Run `argv`; the peak RSS (GiB) of its `workers` biggest processes, and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            if (kib := peak_kib(pid)) is not None:
                peaks[pid] = max(peaks.get(pid, 0), kib)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{out[-3000:]}")
    top = sorted(peaks.values(), reverse=True)[:workers]
    return [k / 2**20 for k in top], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
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
    print("| run | peak RSS per process (GiB) | all processes (GiB) | wall (s) | losses |")
    print("|---|---|---|---|---|")
    for i, (name, (argv, workers)) in enumerate(runs.items()):
        out = tmp / f"run{i}"
        peaks, wall = run([*argv, "--out", str(out)], workers)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = ", ".join(f"{r['loss']:.4f}" for r in rows if "loss" in r)
        each = " / ".join(f"{p:.2f}" for p in peaks)
        print(f"| {name} | {each} | {sum(peaks):.2f} | {wall:.0f} | {losses} |", flush=True)


if __name__ == "__main__":
    main()
