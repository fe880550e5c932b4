"""Per-step times in one process: lorakit vs transformers + peft + bitsandbytes, on CPU or GPU.

For a short lease on a GPU machine, where every new Python process costs seconds of imports:
one process builds a model of the given architecture with random weights on the device, then
times lorakit's training steps (as `lorakit train` runs them: packed attention, example by
example on CPU, one masked call per layer on GPU; and plain masked sdpa), the baseline's, both
sides' generation at batch 1 and 8 (bare and with an r=16 adapter), and prints torch.profiler's
top operations for one lorakit training step. The training workload is train_throughput.py's
(16 sequences of <= 512 tokens per optimizer step, r=16 on q/k/v/o, NF4 + double quant, bf16).

    python bench/step_profile.py --config CONFIG_DIR --device cuda
        # CONFIG_DIR: config.json + tokenizer (e.g. SmolLM2-135M-Instruct's save_pretrained)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="dir with config.json and the tokenizer")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=6, help="timed training steps per side")
    p.add_argument("--per-step", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here; use --device cpu")
    device = torch.device(args.device)
    t0 = time.perf_counter()

    def say(*parts: object) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s]", *parts, flush=True)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit.inference.generate import Sampling, generate_ids
    from lorakit.models.loading import load_model
    from lorakit.models.packed_attention import enable_packed_attention
    from lorakit.quant.linear import dequantized_weights
    from lorakit.training import data as D
    from lorakit.training.trainer import TrainConfig, attach_adapter, train_step

    say(
        "imports done;",
        torch.__version__,
        torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
    )
    hf_dir = tempfile.mkdtemp()
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    with torch.device(device):
        full = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for w in full.parameters():
            w.normal_(0, 0.02) if w.dim() > 1 else w.fill_(1.0)
    full.save_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(args.config)
    tok.save_pretrained(hf_dir)
    del full
    say("random model written")

    train, _ = D.split_examples(D.load_examples(D.default_dataset_path()))
    examples = [D.tokenize_example(e, tok) for e in train]
    rows = D.pack_sequences(examples, args.seq_len)
    pad = tok.pad_token_id or 0
    cfg = TrainConfig(rank=16, alpha=32, lr=2e-4, seq_len=args.seq_len, batch_size=args.per_step)

    def lorakit_steps(model, label: str) -> None:
        trainable = [w for w in model.parameters() if w.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=2e-4)
        times, tokens = [], 0
        for step in range(args.steps + 2):
            b = D.collate(
                rows[step * args.per_step : (step + 1) * args.per_step], torch.bfloat16, pad
            )
            n = sum(
                len(r.input_ids) for r in rows[step * args.per_step : (step + 1) * args.per_step]
            )
            b["real_tokens"] = torch.tensor(n)
            start = sync()
            out = train_step(model, opt, trainable, [b], device, torch.bfloat16, cfg)
            times.append(sync() - start)
            tokens += n if step >= 2 else 0
        timed = sum(times[2:])
        say(
            f"lorakit {label}: step s {[round(t, 3) for t in times]}, "
            f"{tokens / timed:.0f} real tok/s after 2 warm-up steps, loss {out['loss']:.4f}"
        )

    model = None
    try:
        model, _, _ = load_model(hf_dir, device=device)
        attach_adapter(model, cfg)
        model.train()
        cache = dequantized_weights(model, torch.bfloat16)
        cache.__enter__()
        say("lorakit loaded")
        for packed in (True, False):
            if packed:
                enable_packed_attention(model)
            else:
                model.set_attn_implementation("sdpa")
            lorakit_steps(model, "as lorakit train runs it" if packed else "masked sdpa")
        enable_packed_attention(model)
        b = D.collate(rows[: args.per_step], torch.bfloat16, pad)
        b["real_tokens"] = torch.tensor(1)
        trainable = [w for w in model.parameters() if w.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=0.0)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            train_step(model, opt, trainable, [b], device, torch.bfloat16, cfg)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
        if device.type == "cuda":
            print(
                prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10), flush=True
            )
        cache.__exit__(None, None, None)
        model.eval()
    except Exception:
        traceback.print_exc()

    base = None
    try:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        base = AutoModelForCausalLM.from_pretrained(
            hf_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": device}
        )
        peft_model = get_peft_model(
            base,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        )
        peft_model.train()
        trainable = [w for w in peft_model.parameters() if w.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=2e-4)
        items = [e for e in examples]
        times, tokens = [], 0
        for step in range(args.steps + 2):
            batch = items[step * args.per_step : (step + 1) * args.per_step]
            n = max(len(i) for i, _ in batch)
            ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in batch], device=device)
            labels = torch.tensor(
                [lab + [-100] * (n - len(lab)) for _, lab in batch], device=device
            )
            mask = torch.arange(n)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]
            start = sync()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = peft_model(
                    input_ids=ids, attention_mask=mask.long().to(device), labels=labels
                ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(sync() - start)
            tokens += sum(len(i) for i, _ in batch) if step >= 2 else 0
        timed = sum(times[2:])
        say(
            f"baseline (micro-batch {args.per_step}, padded): step s "
            f"{[round(t, 3) for t in times]}, {tokens / timed:.0f} real tok/s, "
            f"loss {loss.item():.4f}"
        )
        peft_model.eval()
    except Exception:
        traceback.print_exc()

    prompts = [[int(t) for t in torch.randint(100, 1000, (36 + i,))] for i in range(8)]
    for batch in (1, 8):
        try:
            if model is not None:
                for lean in ("1", "0"):
                    import os

                    os.environ["LORAKIT_LEAN_DECODE"] = lean
                    rates = []
                    for _ in range(2):
                        start = sync()
                        with torch.autocast(device.type, dtype=torch.bfloat16):
                            out = generate_ids(
                                model, prompts[:batch], Sampling(max_new_tokens=args.new_tokens)
                            )
                        rates.append(sum(map(len, out)) / (sync() - start))
                    say(
                        f"lorakit generate batch {batch} (r=16 adapter, lean={lean}): "
                        f"{max(rates):.1f} tok/s"
                    )
                os.environ.pop("LORAKIT_LEAN_DECODE")
            if base is not None:
                ids = torch.tensor([pr[:36] for pr in prompts[:batch]], device=device)
                rates = []
                for _ in range(2):
                    start = sync()
                    with torch.no_grad():
                        out = peft_model.generate(
                            input_ids=ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=args.new_tokens,
                            do_sample=False,
                            eos_token_id=None,
                            pad_token_id=pad,
                        )
                    rates.append((out.shape[1] - 36) * batch / (sync() - start))
                say(f"baseline generate batch {batch} (r=16 adapter): {max(rates):.1f} tok/s")
        except Exception:
            traceback.print_exc()
    say("done")


if __name__ == "__main__":
    main()
