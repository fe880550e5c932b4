"""What each training optimisation buys: one process, the configurations interleaved.

One optimizer step of 4 packed 512-token sequences of the default model and data (NF4, bf16,
r=16 q/k/v/o), timed under each configuration in turn, `--rounds` times; best and median per
configuration. Interleaving in one process makes the comparison robust to a noisy machine,
which separate runs are not.

    python bench/train_ablation.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

ATTENTION = {  # how a packed row attends
    "mask": "block-diagonal mask (sdpa)",
    "sdpa": "example by example, sdpa flash",
    "explicit": "example by example, explicit",
}
CONFIGS = [  # (sequences per pass, base dequantized once, attention)
    (4, False, "mask"),
    (4, False, "sdpa"),
    (1, False, "sdpa"),
    (1, True, "sdpa"),
    (1, True, "explicit"),
    (4, True, "explicit"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from lorakit import attention
    from lorakit import data as D
    from lorakit.attention import enable_packed_attention
    from lorakit.loading import load_model
    from lorakit.qlinear import dequantized_weights
    from lorakit.train import TrainConfig, attach_adapter, train_step

    model, tok, _ = load_model("smollm2")
    cfg = TrainConfig(rank=16, alpha=32, batch_size=4)
    attach_adapter(model, cfg)
    enable_packed_attention(model)
    train, _ = D.split_examples(D.load_examples(D.default_dataset_path()))
    rows = D.pack_sequences([D.tokenize_example(e, tok) for e in train[:300]], 512)[:4]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.0)  # lr 0: every step sees the same weights
    model.train()

    explicit_max = attention.EXPLICIT_MAX

    def step(micro: int, cache: bool, mode: str) -> float:
        batches = []
        for j in range(0, len(rows), micro):
            b = D.collate(rows[j : j + micro], torch.bfloat16, pad_id=0)
            b["real_tokens"] = torch.tensor(0)
            if mode == "mask":
                b.pop("seq_ids")  # without segments the model falls back to masked sdpa
            batches.append(b)
        attention.EXPLICIT_MAX = explicit_max if mode == "explicit" else 0
        weights = dequantized_weights(model, torch.bfloat16) if cache else nullcontext()
        with weights:
            t = time.perf_counter()
            train_step(model, opt, trainable, batches, torch.device("cpu"), torch.bfloat16, cfg)
            return time.perf_counter() - t

    step(1, False, "explicit")  # warm-up
    times: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for c in CONFIGS:
            times[c].append(step(*c))
    tokens = sum(len(r) for r in rows)
    threads = torch.get_num_threads()
    print(f"\none step of {tokens} tokens, {threads} threads, {args.rounds} rounds\n")
    print("| sequences per pass | base dequantized once | attention | best s | median s |")
    print("|---|---|---|---|---|")
    for (micro, cache, mode), t in times.items():
        print(
            f"| {micro} | {'yes' if cache else 'no'} | {ATTENTION[mode]} | "
            f"{min(t):.2f} | {statistics.median(t):.2f} |"
        )


if __name__ == "__main__":
    main()
