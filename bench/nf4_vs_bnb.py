"""NF4 quantization: lorakit vs bitsandbytes, side by side in one run; and each of lorakit's
NF4 backends (kernels/nf4_backend.py: the PyTorch chain, Triton, bitsandbytes) on its own.

For every linear layer of the model (the default: SmolLM2-135M-Instruct, 210 layers) it
quantizes and dequantizes the weight with both libraries (blocksize 64, double quantization)
and reports total time, round-trip error and bits per parameter; plus the round-trip error on
N(0, 1) data. Timings alternate A B A B over `--repeats` rounds; the best round counts.

The backend table times `nf4_backend.quantize` and `nf4_backend.dequantize` (to bf16) over all
layers with LORAKIT_NF4_BACKEND set to each backend that runs on the device (after one warm-up
round: Triton compiles at first call), checks that each gives the PyTorch chain's bytes and
values, and prints the memory bandwidth achieved: bytes read + written / time (dequantize: the
4-bit state in, bf16 out; quantize: the weights in, the 4-bit state out), and its share of the
GPU's peak where the GPU is in PEAK_BANDWIDTH; for the model's layers, then for one large
matrix (a Llama-3-8B MLP weight on CUDA), where launch costs no longer count. Triton runs on
CUDA only here (its CPU interpreter is for tests). On CPU, bitsandbytes' quantize is not
identical where its native kernel rounds the 8-bit scale codes differently (tests/test_nf4.py).

    python bench/nf4_vs_bnb.py
    python bench/nf4_vs_bnb.py --device cuda   # both libraries, and every backend, on the GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

# Memory bandwidth (bytes/s) from the vendors' data sheets, by a part of torch's device name.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,  # 40 GB
    "L40S": 864e9,
    "L4": 300e9,
    "A10G": 600e9,
    "A10": 600e9,
    "T4": 320e9,
    "V100": 900e9,
    "RTX 4090": 1008e9,
    "RTX 3090": 936e9,
}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def backend_table(
    label: str, weights: list[torch.Tensor], device: torch.device, repeats: int
) -> None:
    """Each NF4 backend's quantize and dequantize of `weights`: time, bandwidth, identity."""
    from lorakit.kernels import nf4_backend
    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    names = ["torch"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    if importlib.util.find_spec("bitsandbytes") is not None:
        names.append("bnb")
    reference = [quantize_nf4(w) for w in weights]
    expected = [dequantize_nf4(s, torch.bfloat16) for s in reference]
    state_bytes = sum(s.nbytes for s in reference)
    numel = sum(w.numel() for w in weights)
    moved = {  # bytes read + written
        "quantize": numel * weights[0].element_size() + state_bytes,
        "dequantize": state_bytes + numel * 2,
    }
    peak = peak_bandwidth(device)
    print(f"\nNF4 backends on {device.type}, {label} ({numel / 1e6:.1f}M), best of {repeats}:\n")
    print("| backend | op | ms | GB/s | share of peak | identical to the PyTorch chain |")
    print("|---|---|---|---|---|---|")
    saved = os.environ.get(nf4_backend.ENV)
    try:
        for name in names:
            os.environ[nf4_backend.ENV] = name
            best = {"quantize": 1e9, "dequantize": 1e9}
            for _ in range(repeats + 1):  # the first round warms up (Triton compiles)
                t = now()
                states = [nf4_backend.quantize(w) for w in weights]
                t1 = now()
                out = [nf4_backend.dequantize(s, torch.bfloat16) for s in reference]
                t2 = now()
                best = {
                    "quantize": min(best["quantize"], t1 - t),
                    "dequantize": min(best["dequantize"], t2 - t1),
                }
            same = {
                "quantize": all(
                    torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
                    for a, b in zip(states, reference, strict=True)
                ),
                "dequantize": all(torch.equal(a, b) for a, b in zip(out, expected, strict=True)),
            }
            for op in ("quantize", "dequantize"):
                rate = moved[op] / best[op]
                share = f"{rate / peak:.0%}" if peak else ""
                print(
                    f"| {name} | {op} | {best[op] * 1e3:.2f} | {rate / 1e9:.3g} | {share} | "
                    f"{'yes' if same[op] else 'NO'} |"
                )
    finally:
        if saved is None:
            os.environ.pop(nf4_backend.ENV, None)
        else:
            os.environ[nf4_backend.ENV] = saved
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"\n(the peak bandwidth of {name} is not in PEAK_BANDWIDTH)")


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
    backend_table(f"{len(weights)} linear layers", weights, device, args.repeats)
    # One large weight: launch costs vanish, the bandwidth is the kernel's own.
    shape = (14336, 4096) if device.type == "cuda" else (4096, 4096)
    big = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    backend_table(f"one {shape} bf16 matrix", [big], device, args.repeats)


if __name__ == "__main__":
    main()
