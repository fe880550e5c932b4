"""`lorakit plan`'s predicted peak and speed against what `lorakit train` then does, each in its
own process, with the same settings.

    python bench/plan_vs_train.py [MODEL ...] [--seq-len 512] [--batch-size 1] [--steps 2]
        [--memory 6GB] [--eval-data FILE]

For each model: `lorakit plan --json` (predicted peak, tokens/s), then `lorakit train` for a few
steps on the embedded data; its peak resident memory is the child's ru_maxrss, read by a
wrapper process that runs nothing else. `--memory` goes to both (train's auto settings follow
it); `--eval-data` (a file of one example, say) keeps a big model's start and end evaluation
short. Prints a Markdown table for BENCHMARKS.md, with the settings and the step's seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile

WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
    "text=True); print(r.stdout + r.stderr); "
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run_train(model: str, flags: list[str], steps: int) -> tuple[float, float | None, float]:
    """(peak RSS bytes, tokens/s, seconds a step) of `lorakit train` for `steps` steps."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["lorakit", "train", "--model", model, "--steps", str(steps), "--out", out]
        argv += [*flags, "--save-every", "0", "--lr", "1e-4"]
        text = subprocess.run(
            [sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, check=True
        ).stdout
    if "done:" not in text:
        raise SystemExit(f"lorakit train failed:\n{text[-2000:]}")
    peak = int(re.search(r"MAXRSS (\d+)", text).group(1)) * 1024
    done = re.search(r"done: (\d+) steps, (\d+)s, .*?([0-9.]+) tok/s", text)
    if done is None:
        return peak, None, float("nan")
    return peak, float(done.group(3)), int(done.group(2)) / int(done.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory", help="the run's memory cap, for plan and train (e.g. 6GB)")
    p.add_argument("--eval-data", help="train's held-out file (default: its own split)")
    args = p.parse_args()
    flags = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    flags += ["--memory", args.memory] if args.memory else []
    extra = ["--eval-data", args.eval_data, "--samples", "0"] if args.eval_data else []
    print(
        "| model | settings | predicted peak | measured peak RSS | predicted / measured "
        "| predicted tok/s | measured tok/s | s a step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        plan = json.loads(
            subprocess.run(
                ["lorakit", "plan", model, "--json", "--device", "cpu", *flags],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        peak, speed, step_s = run_train(model, [*flags, *extra, "--device", "cpu"], args.steps)
        predicted = plan["peak_memory_bytes"]
        guess = plan["speed"]["tokens_per_s"] if plan["speed"] else float("nan")
        s = plan["settings"]
        on = {True: "on", False: "off"}
        settings = (
            f"{s['batch_size']} x {s['seq_len']}, checkpointing {on[s['grad_checkpointing']]}, "
            f"cache {on[s['cache_weights']]}"
        )
        print(
            f"| {model} | {settings} | {predicted / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | "
            f"{predicted / peak:.2f} | {guess:.1f} | {speed if speed is not None else '?'} "
            f"| {step_s:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
