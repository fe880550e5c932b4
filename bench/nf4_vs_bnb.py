"""NF4 quantization: lorakit vs bitsandbytes on CPU, side by side in one run.

For every linear layer of the model (the default: SmolLM2-135M-Instruct, 210 layers) it
quantizes and dequantizes the weight with both libraries (blocksize 64, double quantization)
and reports total time, round-trip error and bits per parameter; plus the round-trip error on
N(0, 1) data. Timings alternate A B A B over `--repeats` rounds; the best round counts.

    python bench/nf4_vs_bnb.py
    python bench/nf4_vs_bnb.py --device cuda   # both libraries on the GPU
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    import bitsandbytes.functional as bnb

    from lorakit.kernels._build import library
    from lorakit.kernels.nf4_matmul import KernelWeight
    from lorakit.lora.targets import linear_modules
    from lorakit.models.loading import load_model
    from lorakit.quant.linear import NF4Linear  # noqa: F401  (import cost outside the timings)
    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here; use --device cpu")
    device = torch.device(args.device)
    model, _, _ = load_model(args.model, quant="none", dtype=torch.float32, with_tokenizer=False)
    weights = [m.weight.detach().to(device).contiguous() for m in linear_modules(model).values()]

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    numel = sum(w.numel() for w in weights)

    def ours():
        states = [quantize_nf4(w) for w in weights]
        t = now()
        out = [dequantize_nf4(s, torch.bfloat16) for s in states]
        return states, out, now() - t

    def compiled() -> float:
        """lorakit's compiled dequantization (what NF4Linear uses on CPU), calls prepared."""
        kernels = [KernelWeight(quantize_nf4(w)) for w in weights]
        t = time.perf_counter()
        out = [k.dequantize(torch.bfloat16) for k in kernels]
        elapsed = time.perf_counter() - t
        assert all(torch.equal(a, b) for a, b in zip(out, ours()[1], strict=True))
        return elapsed

    def theirs():
        states = [
            bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            for w in weights
        ]
        t = now()
        out = [bnb.dequantize_4bit(q, s).to(torch.bfloat16) for q, s in states]
        return states, out, now() - t

    best = {"lorakit": [1e9, 1e9], "bitsandbytes": [1e9, 1e9]}
    for _ in range(args.repeats):
        for name, fn in (("lorakit", ours), ("bitsandbytes", theirs)):
            t = now()
            _, _, deq = fn()
            total = now() - t
            best[name] = [min(best[name][0], total - deq), min(best[name][1], deq)]
    kernel = library() is not None and device.type == "cpu"
    fast = min(compiled() for _ in range(args.repeats)) if kernel else None
    states, out_ours, _ = ours()
    _, out_bnb, _ = theirs()
    err_ours = (
        sum((o.float() - w).abs().sum().item() for o, w in zip(out_ours, weights, strict=True))
        / numel
    )
    err_bnb = (
        sum((o.float() - w).abs().sum().item() for o, w in zip(out_bnb, weights, strict=True))
        / numel
    )
    same = sum((a == b).sum().item() for a, b in zip(out_ours, out_bnb, strict=True)) / numel
    bits = sum(s.nbytes for s in states) * 8 / numel

    torch.manual_seed(0)
    x = torch.randn(4096, 4096).to(device)
    gauss_ours = (dequantize_nf4(quantize_nf4(x)) - x).abs().mean().item()
    q, s = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    gauss_bnb = (bnb.dequantize_4bit(q, s) - x).abs().mean().item()

    print(
        f"\n{args.model}: {len(weights)} linear layers, {numel / 1e6:.1f}M weights; "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}\n"
    )
    print("| | lorakit | bitsandbytes | lorakit / bnb |")
    print("|---|---|---|---|")
    for i, what in enumerate(("quantize all layers (s)", "dequantize all layers to bf16 (s)")):
        a, b = best["lorakit"][i], best["bitsandbytes"][i]
        print(f"| {what} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    if fast is not None:
        b = best["bitsandbytes"][1]
        what = "dequantize all layers to bf16, compiled kernel (s)"
        print(f"| {what} | {fast:.3f} | {b:.3f} | {fast / b:.2f} |")
    rows = [
        ("mean abs round-trip error, model weights", err_ours, err_bnb),
        ("mean abs round-trip error, N(0,1) 4096x4096", gauss_ours, gauss_bnb),
    ]
    for what, a, b in rows:
        print(f"| {what} | {a:.6g} | {b:.6g} | {a / b:.5f} |")
    print(f"| bits per parameter (double quant) | {bits:.4f} | | |")
    print(f"\ndequantized values identical to bitsandbytes': {same:.4%}")


if __name__ == "__main__":
    main()
