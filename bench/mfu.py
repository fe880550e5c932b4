"""Hardware ceiling: this machine's matmul peak at training shapes, and lorakit's share of it.

1. Peak: GFLOP/s of fp32 and bf16 matmuls at the shapes one training pass of the default model
   runs (512 tokens x SmolLM2's projections, and a 1024-token chunk of the output head), best
   of several repeats.
2. lorakit: the FLOPs of real training steps (in the dtype `lorakit train` picks here: bf16
   where the CPU has it, else fp32), counted by torch's FlopCounterMode, divided by the time of
   the same steps run without the counter; MFU is against that dtype's peak. MFU counts the
   model's matmuls only (`aten.mm`: forward, input gradients through the frozen NF4 base, LoRA
   gradients, the chunked loss); the attention's batched matmuls (`aten.bmm`) are left out,
   because the explicit kernel computes the full L x L scores, masked half included, and
   recomputes them in backward, so counting them would credit work the model does not need. MFU
   is thus a lower bound; the rate with everything counted is printed beside it.
3. Decode ceiling: one pass over every weight matrix at batch 1 and 8, the NF4 layers once as
   a copy in the compute dtype and once through the 4-bit kernel (kernels/nf4_matmul.py):
   the least a decoded token costs, with no other work.

    python bench/mfu.py                # 4 timed steps of 4 x 512 tokens after 1 warm-up
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    from lorakit.models.loading import load_model
    from lorakit.models.precision import default_dtype
    from lorakit.training import data as D
    from lorakit.training.trainer import (
        TrainConfig,
        attach_adapter,
        micro_batch_size,
        train_step,
        training_setup,
    )

    dtype = default_dtype("cpu")  # what lorakit train computes in on this machine
    model, tok, _ = load_model("smollm2")
    c = model.config
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    shapes = {  # (M, K, N) of y = x @ W.T, forward; backward's input gradient swaps K and N
        "q/o proj 512x576x576": (512, h, h),
        "k/v proj 512x576x192": (512, h, kv),
        "gate/up 512x576x1536": (512, h, i),
        "down 512x1536x576": (512, i, h),
        "head chunk 1024x576x49152": (1024, h, c.vocab_size),
    }
    print(
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"lorakit computes in {dtype}\n"
    )
    # bf16 only where the CPU computes it (default_dtype): emulated, it runs at ~1 GFLOP/s and
    # would take many minutes to measure for nothing.
    dtypes = [torch.float32] + ([torch.bfloat16] if dtype == torch.bfloat16 else [])
    names = " | ".join(f"{str(d).split('.')[-1]} GFLOP/s" for d in dtypes)
    print(f"| shape (M x K x N) | {names} |" + (" bf16 / fp32 |" if len(dtypes) > 1 else ""))
    print("|---|" + "---|" * (len(dtypes) + (len(dtypes) > 1)))
    peaks = dict.fromkeys(dtypes, 0.0)
    for name, (m, k, n) in shapes.items():
        rates = [matmul_rate(m, k, n, d) for d in dtypes]
        for d, r in zip(dtypes, rates, strict=True):
            peaks[d] = max(peaks[d], r)
        ratio = f" {rates[1] / rates[0]:.2f} |" if len(rates) > 1 else ""
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates) + " |" + ratio)

    # Decoding reads every weight once per token: the fastest the model can decode here, with
    # the NF4 layers dequantized to bf16 once, or read from their 4-bit codes by the kernel.
    from lorakit.kernels._build import library
    from lorakit.kernels.nf4_matmul import KernelWeight

    print("\n| decode ceiling: every weight matrix once | batch | ms | tokens/s at most |")
    print("|---|---|---|---|")
    nf4 = [m for m in model.modules() if hasattr(m, "packed")]
    head = model.get_output_embeddings().weight.to(dtype)
    copies = [m.dequantized_weight(dtype) for m in nf4]
    ways = {
        "NF4 layers as a dequantized copy": [(w.shape[1], lambda x, w=w: x @ w.T) for w in copies]
    }
    if library() is not None:
        kernels = [KernelWeight(m.state) for m in nf4]
        ways["NF4 layers by the 4-bit kernel"] = [
            (k.shape[1], lambda x, k=k: k(x, dtype)) for k in kernels
        ]
    for way, calls in ways.items():
        calls = [*calls, (head.shape[1], lambda x: x @ head.T)]
        for batch in (1, 8):
            xs = {n: torch.randn(batch, n, dtype=dtype) for n, _ in calls}
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for n, call in calls:
                    call(xs[n])
                best = min(best, time.perf_counter() - t)
            print(f"| {way} | {batch} | {best * 1e3:.1f} | {batch / best:.0f} |")
    del copies, ways

    cfg = TrainConfig(rank=16, alpha=32, lr=2e-4, batch_size=4)
    attach_adapter(model, cfg)
    train, _ = D.split_examples(D.load_examples(D.default_dataset_path()))
    rows = D.pack_sequences([D.tokenize_example(e, tok) for e in train], cfg.seq_len)
    micro = micro_batch_size(cfg, torch.device("cpu"), model)
    padded = [0]  # tokens passed through the model, padding included
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr)
    model.train()

    def step(k: int) -> dict:
        batch_rows = rows[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        micros = []
        for j in range(0, len(batch_rows), micro):
            b = D.collate(
                batch_rows[j : j + micro],
                dtype,
                pad_id=tok.pad_token_id or 0,
                pad_multiple=D.ROW_MULTIPLE,  # as lorakit train pads
            )
            padded[0] += b["input_ids"].numel()
            b["real_tokens"] = torch.tensor(sum(len(r) for r in batch_rows[j : j + micro]))
            micros.append(b)
        return train_step(model, opt, trainable, micros, torch.device("cpu"), dtype, cfg)

    cpu = torch.device("cpu")
    with training_setup(model, cfg, cpu, dtype, micro):  # as lorakit train runs
        for k in range(args.warmup):
            step(k)
        counter = FlopCounterMode(display=False)
        with counter:
            for k in range(args.warmup, args.warmup + args.steps):
                step(k)
        by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        start, tokens, padded[0] = time.perf_counter(), 0, 0
        for k in range(args.warmup, args.warmup + args.steps):
            tokens += step(k)["tokens"]
        seconds = time.perf_counter() - start
    # Only the real tokens' FLOPs count as useful: the counted ones include the padding's.
    useful = tokens / padded[0]
    flops = counter.get_total_flops() * useful
    model_flops = by_op.get("aten.mm", 0) * useful
    rate, everything = model_flops / seconds / 1e9, flops / seconds / 1e9
    peak = peaks[dtype]  # the peak of the dtype lorakit trains in here
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    print(
        f"\nlorakit training ({args.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"micro-batch {micro}, NF4 base, {name}, r=16 q/k/v/o): {model_flops / 1e12:.2f} TFLOP "
        f"of model matmuls ({flops / 1e12:.2f} with attention) in {seconds:.1f} s, "
        f"{tokens / seconds:.0f} tokens/s\n"
    )
    print(f"| | GFLOP/s | share of the {name} peak |")
    print("|---|---|---|")
    for other, rate_peak in peaks.items():
        label = {torch.bfloat16: "bf16", torch.float32: "fp32"}[other]
        print(
            f"| {label} matmul peak (best shape above) | {rate_peak:.0f} | {rate_peak / peak:.0%} |"
        )
    print(f"| lorakit training, model matmuls (MFU) | {rate:.0f} | {rate / peak:.0%} |")
    share = everything / peak
    print(f"| lorakit training, attention counted too | {everything:.0f} | {share:.0%} |")
    print(f"\nFLOP/token: {flops / tokens / 1e6:.0f} M (counted); by kernel:")
    for op, n in sorted(by_op.items(), key=lambda x: -x[1]):
        print(f"  {op}: {n / counter.get_total_flops():.0%}")


if __name__ == "__main__":
    main()
