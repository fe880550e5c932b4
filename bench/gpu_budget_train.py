"""One `lorakit train` step on a GPU inside a memory budget, against what `lorakit plan` predicts:
issue 18's "70B within 41 GiB" (the budget set with `torch.cuda.set_per_process_memory_fraction`,
so the allocator fails past it as a card that size would).

    python bench/gpu_budget_train.py MODEL --budget 41GB [--seq-len 512] [--batch-size 1]

MODEL is a 4-bit checkpoint (`bench/random_model.py CFG OUT --shape llama2-70b --nf4`). Prints
one Markdown row: the settings train picked, the plan's peak, the measured peak allocated and
reserved, the step's seconds, the loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lorakit.training.config import parse_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--budget", default="41GB")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])  # cpu: a dry run
    args = p.parse_args()
    budget = parse_size(args.budget)
    flags = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    flags += ["--memory", args.budget, "--device", args.device]
    plan = json.loads(
        subprocess.run(
            ["lorakit", "plan", args.model, "--json", *flags],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    import lorakit

    with tempfile.TemporaryDirectory() as out:
        one = Path(out) / "one.jsonl"
        one.write_text(json.dumps({"instruction": "What is a kludge?", "output": "A hack."}) + "\n")
        cfg = lorakit.TrainConfig(
            model=args.model,
            steps=1,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            memory=args.budget,
            device=args.device,
            eval_data=str(one),
            out=str(Path(out) / "run"),
            save_every=0,
            lr=1e-4,
        )
        t = time.perf_counter()
        result = lorakit.train(cfg, progress=False)
        wall = time.perf_counter() - t
    gib = 2**30
    allocated = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    reserved = torch.cuda.max_memory_reserved() if args.device == "cuda" else 0
    s = plan["settings"]
    print(
        "| model | budget | settings | plan peak | peak allocated | peak reserved "
        "| s (load + step) | loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.budget} | {s['batch_size']} x {s['seq_len']}, checkpointing "
        f"{s['grad_checkpointing']}, cache {s['cache_weights']} | "
        f"{plan['peak_memory_bytes'] / gib:.2f} GiB | {allocated / gib:.2f} GiB | "
        f"{reserved / gib:.2f} GiB | {wall:.0f} | {result.final_train_loss:.3f} |"
    )


if __name__ == "__main__":
    main()
