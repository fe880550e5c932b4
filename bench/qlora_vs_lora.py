"""QLoRA (NF4 base) vs plain LoRA (bf16/fp32 base): same data, steps and seed.

The QLoRA paper's claim is parity: 4-bit NF4 with double quantization loses (almost) nothing
against a 16-bit base. This runs both on the default model and data, one after the other in
one process, and prints a Markdown table with the eval losses and their ratio.

    python bench/qlora_vs_lora.py --steps 30
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from lorakit.models.loading import load_model
from lorakit.training.trainer import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = []
    for quant in ("nf4", "none"):
        model, tok, source = load_model(args.model, quant=quant)
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(
                model=args.model,
                quant=quant,
                steps=args.steps,
                out=out,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                seed=args.seed,
                lr=args.lr,
            )
            t = time.perf_counter()
            r = train(cfg, model, tok, source.name, progress=False)
            rows.append(
                (
                    quant,
                    r.first_eval_loss,
                    r.final_eval_loss,
                    r.tokens_per_s,
                    time.perf_counter() - t,
                )
            )
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nmodel {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
        f"seed {args.seed}; peak RSS {peak:.0f} MB\n"
    )
    print("| base | eval loss before | eval loss after | train tokens/s | wall s |")
    print("|---|---|---|---|---|")
    for quant, before, after, tps, wall in rows:
        name = "NF4 (QLoRA)" if quant == "nf4" else "bf16/fp32 (LoRA)"
        print(f"| {name} | {before:.4f} | {after:.4f} | {tps:.0f} | {wall:.0f} |")
    ratio = rows[0][2] / rows[1][2]
    print(f"\nQLoRA / LoRA final eval loss: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
