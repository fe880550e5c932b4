"""Resident memory pass by pass while training: what makes it creep up.

One process per mode, each running `--passes` forward/backward passes of one packed 512-token
row (what `lorakit train` does on CPU) on the default model, with the weight cache on, and
printing the resident size (VmRSS) after every pass:

- `varied`: consecutive rows of the data set (what training sees);
- `same`: the first row every time (identical shapes and sizes in every pass);
- `padded`: consecutive rows, each padded to the full 512 tokens (fixed linear-layer shapes;
  only the examples' lengths inside a row still vary).

    python bench/memory_growth.py --passes 24
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
from lorakit import data as D
from lorakit.loading import load_model
from lorakit.qlinear import dequantized_weights
from lorakit.train import TrainConfig, attach_adapter, speed_up_training, train_step

mode, passes = sys.argv[1], int(sys.argv[2])

def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

model, tok, _ = load_model("smollm2")
cfg = TrainConfig(rank=16, alpha=32, lr=2e-4, seq_len=512, batch_size=1)
attach_adapter(model, cfg)
speed_up_training(model)  # as lorakit train does
train, _ = D.split_examples(D.load_examples(D.default_dataset_path()))
rows = D.pack_sequences([D.tokenize_example(e, tok) for e in train], 512)
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=2e-4)
model.train()
cpu, sizes = torch.device("cpu"), []
with dequantized_weights(model, torch.bfloat16):
    for i in range(passes):
        row = rows[0 if mode == "same" else i]
        batch = D.collate([row], torch.bfloat16, pad_id=0, pad_to=512 if mode == "padded" else None)
        batch["real_tokens"] = torch.tensor(len(row.input_ids))
        train_step(model, opt, trainable, [batch], cpu, torch.bfloat16, cfg)
        sizes.append(round(rss_mb()))
print(json.dumps(sizes))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=24)
    p.add_argument("--modes", default="varied,same,padded")
    args = p.parse_args()
    print("| mode | RSS after pass 1 (MB) | after the last | MB per pass after the first |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(args.passes)], capture_output=True, text=True
        )
        if run.returncode != 0:
            sys.exit(f"{mode} failed:\n{run.stderr[-2000:]}")
        sizes = json.loads(run.stdout.strip().splitlines()[-1])
        slope = (sizes[-1] - sizes[0]) / max(len(sizes) - 1, 1)
        print(f"| {mode} | {sizes[0]} | {sizes[-1]} | {slope:.1f} |", flush=True)
        print(f"<!-- {mode}: {sizes} -->")


if __name__ == "__main__":
    main()
