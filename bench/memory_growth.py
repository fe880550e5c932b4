"""Resident memory pass by pass while training: what makes it creep up.

One process per mode, each running `--passes` forward/backward passes on the default model as
`lorakit train` does on CPU (packed 512-token rows, `micro_batch_size` rows per pass, the
weight cache on), printing the resident size (VmRSS) after every pass:

- `training`: consecutive rows of the data set, padded to a multiple of `data.ROW_MULTIPLE`
  tokens (what `lorakit train` does);
- `unpadded`: the same rows at their own lengths (one set of matmul shapes per row length);
- `same`: the first rows every time (identical shapes and sizes in every pass).

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
from lorakit.train import (TrainConfig, attach_adapter, micro_batch_size, speed_up_training,
                           train_step)

mode, passes = sys.argv[1], int(sys.argv[2])

def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

model, tok, _ = load_model("smollm2")
cfg = TrainConfig(rank=16, alpha=32, lr=2e-4, seq_len=512, batch_size=16)
attach_adapter(model, cfg)
micro = micro_batch_size(cfg, torch.device("cpu"), model)
speed_up_training(model)  # as lorakit train does
train, _ = D.split_examples(D.load_examples(D.default_dataset_path()))
rows = D.pack_sequences([D.tokenize_example(e, tok) for e in train], 512)
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=2e-4)
model.train()
cpu, sizes = torch.device("cpu"), []
with dequantized_weights(model, torch.bfloat16):
    for i in range(passes):
        some = rows[0 if mode == "same" else i * micro :][:micro]
        multiple = 1 if mode == "unpadded" else D.ROW_MULTIPLE
        batch = D.collate(some, torch.bfloat16, pad_id=0, pad_multiple=multiple)
        batch["real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in some))
        train_step(model, opt, trainable, [batch], cpu, torch.bfloat16, cfg)
        sizes.append(round(rss_mb()))
print(json.dumps(sizes))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=24)
    p.add_argument("--modes", default="training,unpadded,same")
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
