"""Resident memory through one training step, layer by layer: the measurement behind
lorakit/heap.py (BENCHMARKS.md, "Big models").

    python bench/step_rss.py MODEL [--grad-checkpointing on|off] [--seq-len 512]

Loads MODEL as `lorakit train` would (`load_for_training`, weight cache off), attaches the
default adapter, runs one forward and backward pass over one random sequence and prints the
RSS every 5 layers, after the forward pass and after the backward pass, with the peak (VmHWM)
and the step's seconds. `load_model` fixes glibc's mmap threshold at 4 MB unless
MALLOC_MMAP_THRESHOLD_ is set: set it (e.g. 33554432) to see a threshold near glibc's own.
"""

from __future__ import annotations

import argparse
import time

import torch


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--grad-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()

    from lorakit.models.patches import checkpoint_layers
    from lorakit.training import trainer
    from lorakit.training.config import TrainConfig
    from lorakit.training.loss import causal_lm_loss, reused_logits

    cfg = TrainConfig(
        model=args.model,
        seq_len=args.seq_len,
        batch_size=1,
        grad_checkpointing=args.grad_checkpointing,
        cache_weights="off",
    )
    model, _, _ = trainer.load_for_training(cfg, torch.device("cpu"))
    print(f"loaded: RSS {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB")
    trainer.attach_adapter(model, cfg)
    model.train()
    if args.grad_checkpointing == "on":
        checkpoint_layers(model)
    for i, layer in enumerate(model.model.layers):
        if i % 5 == 0:
            layer.register_forward_hook(
                lambda m, a, o, i=i: print(f"  after layer {i}: RSS {rss_gib():.2f} GiB")
            )
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    start = time.perf_counter()
    with reused_logits():
        loss, _ = causal_lm_loss(model, batch)
        print(f"after forward: RSS {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB")
        loss.backward()
    print(
        f"after backward: RSS {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB, "
        f"step {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
