"""The serving engine with one adapter on every row: folded into the cached weights vs per row.

`lorakit serve`'s engine adds the adapter into the dequantized base weights while every running
row uses it (`Engine._adapters`), and runs each row's adapter beside the base otherwise. This
runs the same requests both ways in one process, alternating, on the default model with a
random rank-16 adapter on q/k/v/o: batch 1 and batch 8, `--new-tokens` greedy tokens per
request, best of `--rounds`. No HTTP: requests go straight to the engine thread. Last, what
one fold and one unfold cost (`lora.folded_adapters` over the cached weights), best of 3.

    python bench/engine_fold.py
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch
from generation import PROMPTS, make_adapter  # bench/ is on sys.path when run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from lorakit.data import encode_prompt
    from lorakit.engine import Engine, Request
    from lorakit.generate import Sampling
    from lorakit.loading import load_model
    from lorakit.lora import folded_adapters, row_adapters, set_active_adapters
    from lorakit.qlinear import dequantized_weights

    model, tok, _ = load_model(args.model)
    folder = tempfile.mkdtemp()
    make_adapter(model, f"{folder}/a0", seed=0)
    engine = Engine(model, [tok.eos_token_id], 0)
    engine.load_adapter("a0", f"{folder}/a0").result()
    prompts = [encode_prompt([{"role": "user", "content": q}], tok) for q in PROMPTS]

    def per_row(self, rows, decode):  # the engine before folding: every row beside the base
        return row_adapters(self.model, [r.adapter for r in rows])

    def tokens_per_s(batch: int) -> float:
        done = [threading.Event() for _ in range(batch)]
        count = [0]

        def sink(i: int):
            def emit(kind: str, value: object) -> None:
                if kind == "token":
                    count[0] += 1
                else:
                    done[i].set()

            return emit

        start = time.perf_counter()
        for i in range(batch):
            sampling = Sampling(max_new_tokens=args.new_tokens)
            engine.submit(Request(prompts[i], sampling, sink(i), "a0"))
        for d in done:
            d.wait()
        return count[0] / (time.perf_counter() - start)

    folded = Engine._adapters
    best: dict[tuple[str, int], float] = {}
    engine.start()
    try:
        for _ in range(args.rounds):
            for name, how in (("per row", per_row), ("folded", folded)):
                Engine._adapters = how
                engine.call(engine._unfold).result()
                for batch in (1, 8):
                    rate = tokens_per_s(batch)
                    best[name, batch] = max(best.get((name, batch), 0.0), rate)
    finally:
        Engine._adapters = folded
        engine.stop()
    print(
        f"\n{args.model}, NF4, {model.dtype}, one r=16 adapter on every row, greedy, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, best of {args.rounds}\n"
    )
    print("| batch | per row tok/s | folded tok/s | folded / per row |")
    print("|---|---|---|---|")
    for batch in (1, 8):
        a, b = best["per row", batch], best["folded", batch]
        print(f"| {batch} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")

    set_active_adapters(model, ["a0"])
    fold_ms, unfold_ms = [], []
    with dequantized_weights(model, model.dtype):
        for _ in range(3):
            start = time.perf_counter()
            fold = folded_adapters(model)
            fold.__enter__()
            middle = time.perf_counter()
            fold.__exit__(None, None, None)
            fold_ms.append((middle - start) * 1e3)
            unfold_ms.append((time.perf_counter() - middle) * 1e3)
    print(f"\nfold {min(fold_ms):.1f} ms, unfold {min(unfold_ms):.1f} ms (best of 3)")


if __name__ == "__main__":
    main()
