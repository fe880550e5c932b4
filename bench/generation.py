"""Generation speed: lorakit vs transformers + peft + bitsandbytes, side by side in one run.

Both run the default model with its linear layers in NF4 (double quantization; bf16 compute
where the hardware has it, else fp32),
greedy, 128 new tokens, at batch 1 and 8, without and with a rank-16 adapter on the attention
projections; then lorakit's cost of a batch whose 8 rows use 4 different adapters against a
batch on one adapter. lorakit runs both ways it can decode: from a dequantized copy of the weights
made once per generation (adapter folded in), and from the 4-bit codes with the compiled
kernel (kernels/nf4_matmul.py; adapter in the same call), where that kernel builds; the kernel once
more through transformers' forward pass instead of lorakit's lean one (inference/lean.py), to show
what that buys. Runs alternate lorakit / baseline; the best of `--repeats` counts. Last, the
output head alone: torch's bf16 matmul against lorakit's compiled one, per decoding step.

    python bench/generation.py
    python bench/generation.py --device cuda   # on a GPU: no kernel columns, no head table
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

PROMPTS = [
    "What does hacker mean?",
    "Explain what a kludge is.",
    "Write a haiku about compilers.",
    "What is the Jargon File?",
    "Describe a foobar.",
    "What does grok mean?",
    "Tell me about the PDP-10.",
    "What is a daemon in Unix?",
]


def make_adapter(model, path: str, seed: int) -> None:
    """A random rank-16 adapter (non-zero B) on q/k/v/o, saved in PEFT's format."""
    from lorakit.lora.layer import attach_lora, lora_layers
    from lorakit.lora.peft_format import AdapterConfig, save_adapter
    from lorakit.lora.targets import resolve_targets

    torch.manual_seed(seed)
    modules, targets = resolve_targets(model, "default")
    attach_lora(model, modules, "tmp", rank=16, alpha=32)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["tmp"].weight, std=0.01)
    save_adapter(model, path, AdapterConfig(rank=16, alpha=32, target_modules=targets), "tmp")
    for _, layer in list(lora_layers(model)):
        layer.delete_adapter("tmp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="compute dtype of both sides (auto: bf16 where the hardware has it, else fp32)",
    )
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here; use --device cpu")
    device = torch.device(args.device)
    from lorakit.models.precision import autocast, default_dtype

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(device)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.inference.generate import Sampling, generate_ids
    from lorakit.kernels._build import library
    from lorakit.lora.layer import set_active_adapters
    from lorakit.lora.peft_format import load_adapter
    from lorakit.models.chat import encode_prompt
    from lorakit.models.loading import load_model

    ours, tok, _ = load_model(args.model, device=device)
    tmp = tempfile.mkdtemp()
    # The baseline loads a HF directory: write the same model there in fp32 once.
    full, _, _ = load_model(args.model, quant="none", dtype=torch.float32)
    full.save_pretrained(f"{tmp}/base")
    tok.save_pretrained(f"{tmp}/base")
    for i in range(4):
        make_adapter(full, f"{tmp}/a{i}", seed=i)
    del full
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        f"{tmp}/base", quantization_config=bnb_config, dtype=dtype, device_map={"": device}
    ).eval()
    baseline = PeftModel.from_pretrained(base, f"{tmp}/a0", adapter_name="a0").eval()
    for i in range(4):
        load_adapter(ours, f"{tmp}/a{i}", name=f"a{i}")
    prompt_ids = [encode_prompt([{"role": "user", "content": q}], tok) for q in PROMPTS]
    sampling = Sampling(max_new_tokens=args.new_tokens)

    kernel = library() is not None and device.type == "cpu"

    def run_ours(batch: int, adapters, cache: bool = True, lean: bool = True) -> float:
        os.environ["LORAKIT_LEAN_DECODE"] = "1" if lean else "0"
        t = time.perf_counter()
        with autocast(device, dtype):  # as lorakit generate runs
            out = generate_ids(
                ours, prompt_ids[:batch], sampling, adapters=adapters, cache_weights=cache
            )
        os.environ.pop("LORAKIT_LEAN_DECODE")
        return sum(len(o) for o in out) / (time.perf_counter() - t)

    def run_baseline(batch: int, adapter: bool) -> float:
        tok.padding_side = "left"
        texts = [tok.decode(p) for p in prompt_ids[:batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ctx = torch.no_grad() if adapter else baseline.disable_adapter()
        t = time.perf_counter()
        with ctx, torch.no_grad():
            out = baseline.generate(
                **enc,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id or 0,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()  # waits for the device
        new = sum(map(len, new))
        return new / (time.perf_counter() - t)

    rows = []
    for batch in (1, 8):
        for adapter in (False, True):
            best_ours = best_kernel = best_hf = best_base = 0.0
            for _ in range(args.repeats):
                set_active_adapters(ours, ["a0"] if adapter else [])
                best_ours = max(best_ours, run_ours(batch, None))
                if kernel:
                    best_kernel = max(best_kernel, run_ours(batch, None, cache=False))
                best_hf = max(best_hf, run_ours(batch, None, cache=not kernel, lean=False))
                best_base = max(best_base, run_baseline(batch, adapter))
            rows.append((batch, adapter, best_ours, best_kernel, best_hf, best_base))
    set_active_adapters(ours, ["a0"])
    single = max(run_ours(8, ["a0"] * 8) for _ in range(args.repeats))
    mixed = max(run_ours(8, ["a0", "a1", "a2", "a3"] * 2) for _ in range(args.repeats))

    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"\n{args.model}, NF4 + double quant, {dtype} compute, greedy, "
        f"{args.new_tokens} new tokens, {where}, best of {args.repeats}\n"
    )
    third = "4-bit kernel" if kernel else "dequantized copy"
    print(
        "| batch | adapter | lorakit, dequantized copy | lorakit, 4-bit kernel | "
        f"{third}, transformers' forward | transformers+peft+bnb | copy / baseline | "
        "4-bit kernel / baseline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch, adapter, a, k, hf, b in rows:
        which = "r=16 q,k,v,o" if adapter else "none"
        k_rate, k_ratio = (f"{k:.1f}", f"**{k / b:.2f}x**") if kernel else ("n/a", "n/a")
        hf_rate = f"{hf:.1f}"
        print(
            f"| {batch} | {which} | {a:.1f} | {k_rate} | {hf_rate} | {b:.1f} | {a / b:.2f}x "
            f"| {k_ratio} |"
        )
    print(
        f"\nlorakit batch 8: one adapter {single:.1f} tok/s, four adapters mixed {mixed:.1f} tok/s "
        f"(mixed / single = {mixed / single:.2f})"
    )
    if kernel:
        head_table(ours)


def head_table(model) -> None:
    """The output head of one decoding step: torch's bf16 matmul vs kernels.bf16_matmul."""
    from lorakit.kernels.bf16_matmul import bf16_matmul

    weight = model.get_output_embeddings().weight.to(torch.bfloat16)
    print(f"\n| output head {tuple(weight.shape)}, bf16 | batch | torch ms | lorakit ms | ratio |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        x = torch.randn(batch, weight.shape[1], dtype=torch.bfloat16)
        times = {}
        for name, call in (
            ("torch", lambda x=x: x @ weight.T),
            ("lorakit", lambda x=x: bf16_matmul(x, weight)),
        ):
            call()
            best = float("inf")
            for _ in range(20):
                t = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t)
            times[name] = best * 1e3
        ratio = times["torch"] / times["lorakit"]
        print(
            f"| | {batch} | {times['torch']:.2f} | {times['lorakit']:.2f} | {ratio:.2f}x faster |"
        )


if __name__ == "__main__":
    main()
