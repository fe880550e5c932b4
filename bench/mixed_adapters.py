"""A batch whose rows use different adapters against the same batch on one adapter.

    python bench/mixed_adapters.py [--batches 8,32] [--adapters 4] [--new-tokens 64]

The default model in NF4, `--adapters` random rank-16 adapters on q/k/v/o (B non-zero), greedy
decoding as `lorakit generate` and the server run it (`generate_ids`, one adapter per row, the
weight rule of `lorakit generate`). For each batch size: tokens/s with every row on adapter a0,
and with the rows spread over all the adapters in turn; the best of `--repeats`. Also checks
that the mixed batch's tokens equal each row's run alone with its adapter.
"""

from __future__ import annotations

import argparse
import time

import torch
from generation import PROMPTS  # bench/ is on sys.path when run as a script


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def main() -> None:
    from lorakit.inference.generate import Sampling, generate_ids
    from lorakit.lora.layer import attach_lora, lora_layers, set_active_adapters
    from lorakit.lora.targets import resolve_targets
    from lorakit.models.chat import encode_prompt
    from lorakit.models.loading import load_model
    from lorakit.models.precision import autocast, default_dtype

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    model, tok, _ = load_model("smollm2", quant="nf4", device="cpu")
    device, dtype = torch.device("cpu"), default_dtype(torch.device("cpu"))
    modules, _ = resolve_targets(model, "default")
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        attach_lora(model, modules, name, rank=16, alpha=32)
        gen = torch.Generator().manual_seed(i)
        for _, layer in lora_layers(model):
            b = layer.lora_B[name].weight
            b.data.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    set_active_adapters(model, [])
    model.eval()
    prompts = [encode_prompt([{"role": "user", "content": q}], tok) for q in PROMPTS]
    sampling = Sampling(max_new_tokens=args.new_tokens)

    def run(rows: list[list[int]], adapters: list[str]) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            out = generate_ids(model, rows, sampling, adapters=adapters)
        return sum(len(o) for o in out) / (time.perf_counter() - t), out

    print(f"{torch.get_num_threads()} threads, {dtype}, {args.new_tokens} new tokens\n")
    print(
        f"| batch | one adapter (tok/s) | rows over {len(names)} adapters (tok/s) | mixed / one |"
    )
    print("|---|---|---|---|")
    notes = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        mixed_names = [names[i % len(names)] for i in range(batch)]
        single = mixed = 0.0
        for _ in range(args.repeats):
            speed, out_one = run(rows, [names[0]] * batch)
            single = max(single, speed)
            speed, out = run(rows, mixed_names)
            mixed = max(mixed, speed)
        print(f"| {batch} | {single:.1f} | {mixed:.1f} | {mixed / single:.2f} |", flush=True)
        n = min(batch, len(names))
        for label, got, adapters in (("one", out_one, [names[0]] * n), ("mixed", out, mixed_names)):
            alone = [run([rows[i]], [adapters[i]])[1][0] for i in range(n)]
            first = [_first_difference(got[i], alone[i]) for i in range(n)]
            notes.append(
                f"batch {batch}, {label}: first token where rows 0-{n - 1} differ from "
                f"their runs alone (None: never): {first}"
            )
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
