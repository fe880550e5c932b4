"""Training throughput and memory: lorakit vs transformers + peft + bitsandbytes.

The same workload on both: the default model with its linear layers in NF4 (double
quantization, bf16 compute), LoRA r=16 / alpha 32 on q/k/v/o, the default data set with the
same tokenisation and answer-only labels, AdamW at lr 2e-4, 16 sequences per optimizer step of
at most `--seq-len` tokens. lorakit packs examples into full sequences; the baseline pads each
micro-batch to its longest example, as transformers' collators do, with gradient checkpointing
off (faster on CPU at this size). Each side runs in its own process (so peak RSS is its own),
alternating lorakit / baseline for `--rounds`; `--warmup` steps are not timed.

    python bench/train_throughput.py --steps 3            # quick
    python bench/train_throughput.py --steps 30 --rounds 1   # the issue's full measurement
    python bench/train_throughput.py --random-1b --steps 1 --warmup 0 --per-step 4 \
        --lorakit-cache off
        # memory at scale: load + one step of a random 1.1B LLaMA on both sides
    python bench/train_throughput.py --device cuda --micro 16 --steps 30 --warmup 3
        # on a GPU (the baseline's micro-batches as large as lorakit's there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
from lorakit.training import data as D
device = torch.device(args["device"])
cuda = device.type == "cuda"
if cuda and args["memory_fraction"]:  # emulate a smaller card (a 16 GB T4: 15 GiB usable)
    torch.cuda.set_per_process_memory_fraction(args["memory_fraction"])
# Both sides compute in one dtype: bf16 where the hardware has it (what lorakit train picks),
# else fp32 (emulated bf16 on a CPU without it is slower for both)
from lorakit.models.precision import default_dtype
dtype = getattr(torch, args["dtype"]) if args["dtype"] != "auto" else default_dtype(device)

def examples(tok):
    train, ev = D.split_examples(D.load_examples(D.default_dataset_path()))
    encode = lambda items: [D.tokenize_example(e, tok) for e in items]
    return encode(train), encode(ev[:32])

def report(tokens, seconds, losses, eval_loss):
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(json.dumps({"tokens_per_s": tokens / seconds, "load_s": load_s, "peak_rss_mb":
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mb": peak_gpu,
        "losses": losses, "eval_loss": eval_loss, "dtype": str(dtype).split(".")[-1]}))

def sync():
    if cuda:
        torch.cuda.synchronize()

steps, warmup, seq_len, per_step, micro = (args[k] for k in
    ("steps", "warmup", "seq_len", "per_step", "micro"))
if args["side"] == "lorakit":
    from lorakit.models.loading import load_model
    from lorakit.training.loss import evaluate
    from lorakit.training.trainer import (TrainConfig, attach_adapter, micro_batch_size,
                                          train_step, training_setup)
    t_load = time.perf_counter()
    model, tok, _ = load_model(args["lorakit_model"], device=device)
    sync()
    load_s = time.perf_counter() - t_load
    cfg = TrainConfig(rank=16, alpha=32, lr=2e-4, seq_len=seq_len, batch_size=per_step,
                      cache_weights=args["lorakit_cache"],
                      grad_checkpointing=args["lorakit_checkpointing"])
    attach_adapter(model, cfg)
    micro = args["lorakit_micro"] or micro_batch_size(cfg, device, model)
    # as lorakit train does: its forwards, its weight cache rule
    setup = training_setup(model, cfg, device, dtype, micro, args["packed_attention"])
    setup.__enter__()
    train_ex, eval_ex = examples(tok)
    rows = D.pack_sequences(train_ex, seq_len)
    def batch(rs):
        b = D.collate(rs, dtype, pad_id=tok.pad_token_id or 0,
                      pad_multiple=D.ROW_MULTIPLE)
        b["real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in rs))
        return b

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    losses, tokens, t0 = [], 0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0, tokens = time.perf_counter(), 0
        start = step * per_step
        micros = [batch(rows[start + i : start + i + micro]) for i in range(0, per_step, micro)]
        out = train_step(model, opt, trainable, micros, device, dtype, cfg)
        losses.append(out["loss"])
        tokens += out["tokens"]
    sync()
    seconds = time.perf_counter() - t0
    eval_rows = D.pack_sequences(eval_ex, seq_len)
    evals = [batch(eval_rows[i : i + micro]) for i in range(0, len(eval_rows), micro)]
    ev = evaluate(model, evals, device, dtype, 1024) if args["eval"] else None
    report(tokens, seconds, losses, ev)
else:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    tok = AutoTokenizer.from_pretrained(args["hf_dir"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    t_load = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args["hf_dir"], quantization_config=bnb,
                                                dtype=dtype, device_map={"": device})
    sync()
    load_s = time.perf_counter() - t_load
    if args["baseline_checkpointing"]:  # the QLoRA recipe on a GPU
        from peft import prepare_model_for_kbit_training
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    train_ex, eval_ex = examples(tok)
    train_ex = [(i[:seq_len], l[:seq_len]) for i, l in train_ex]
    pad = tok.pad_token_id or 0

    def padded(items):
        n = max(len(i) for i, _ in items)
        ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in items])
        labels = torch.tensor([l + [-100] * (n - len(l)) for _, l in items])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in items])
        return ids, labels, mask

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    losses, tokens, t0 = [], 0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0, tokens = time.perf_counter(), 0
        items = train_ex[step * per_step : (step + 1) * per_step]
        step_loss = 0.0
        for i in range(0, per_step, micro):
            ids, labels, mask = (t.to(device) for t in padded(items[i : i + micro]))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss * micro / per_step).backward()
            step_loss += loss.item() * micro / per_step
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens += sum(len(i) for i, _ in items)
    sync()
    seconds = time.perf_counter() - t0
    if not args["eval"]:
        report(tokens, seconds, losses, None)
        sys.exit()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        total = count = 0
        for item in eval_ex:
            ids, labels, mask = (t.to(device) for t in padded([item]))
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            count += n
    report(tokens, seconds, losses, total / count)
"""


class GpuPeak:
    """The highest memory.used nvidia-smi reports (MB) while the block runs, polled every
    0.2 s; None without a GPU or nvidia-smi."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.peak, self._stop = enabled, None, threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                used = max(float(x) for x in out.split())
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.peak = max(self.peak or 0.0, used)

    def __enter__(self) -> GpuPeak:
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--per-step", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro", type=int, default=4, help="baseline: sequences per micro-batch")
    p.add_argument(
        "--lorakit-micro", type=int, default=0, help="lorakit: sequences per pass (0 = its auto)"
    )
    p.add_argument(
        "--no-packed-attention", action="store_true", help="lorakit: masked sdpa (the old path)"
    )
    p.add_argument(
        "--random-1b",
        action="store_true",
        help="memory at scale: a random ~1.1B LLaMA (no eval), both sides load it from disk",
    )
    p.add_argument(
        "--lorakit-cache", default="auto", choices=["auto", "on", "off"], help="--cache-weights"
    )
    p.add_argument(
        "--lorakit-checkpointing",
        default="auto",
        choices=["auto", "on", "off"],
        help="--grad-checkpointing",
    )
    p.add_argument(
        "--baseline-checkpointing",
        action="store_true",
        help="baseline: prepare_model_for_kbit_training with gradient checkpointing",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.0,
        help="CUDA: set_per_process_memory_fraction in each side (emulate a smaller card)",
    )
    p.add_argument(
        "--model", default="smollm2", help="the model both sides train (alias, .gguf or HF dir)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sides", default="lorakit,baseline", help="which to run, in order")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="compute dtype of both sides (auto: bf16 where the hardware has it, else fp32)",
    )
    p.add_argument("--rounds", type=int, default=1, help="lorakit/baseline alternations")
    args = p.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here; use --device cpu")

    from lorakit.errors import LorakitError
    from lorakit.models.loading import load_model

    if (Path(args.model) / "config.json").is_file() and not args.random_1b:
        hf_dir = args.model  # a transformers directory both sides read as it is (an 8B: no copy)
    else:
        hf_dir = tempfile.mkdtemp()
    try:
        full, tok, _ = (
            (None, None, None)
            if hf_dir == args.model
            else load_model(args.model, quant="none", dtype=torch.float32)
        )
    except LorakitError as err:
        p.error(str(err))
    if args.random_1b:  # LLaMA architecture at ~1.1B (TinyLlama's shape), random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=full.config.vocab_size,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        del full
        torch.manual_seed(0)
        with torch.device("meta"):
            full = LlamaForCausalLM(config)
        full.to_empty(device="cpu")
        full.to(torch.bfloat16)
        with torch.no_grad():
            for p in full.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        print(f"random LLaMA: {sum(p.numel() for p in full.parameters()) / 1e9:.2f}B parameters")
    if full is not None:
        full.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        del full
    settings = {
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": args.seq_len,
        "per_step": args.per_step,
        "micro": args.micro,
        "lorakit_micro": args.lorakit_micro,
        "lorakit_cache": args.lorakit_cache,
        "lorakit_checkpointing": args.lorakit_checkpointing,
        "baseline_checkpointing": args.baseline_checkpointing,
        "memory_fraction": args.memory_fraction,
        "packed_attention": not args.no_packed_attention,
        "hf_dir": hf_dir,
        "lorakit_model": hf_dir if args.random_1b else args.model,
        "device": args.device,
        "dtype": args.dtype,
        "eval": not args.random_1b,
    }
    results: dict[str, list[dict]] = {"lorakit": [], "baseline": []}
    for _ in range(args.rounds):
        for side in args.sides.split(","):
            child = json.dumps({**settings, "side": side})
            with GpuPeak(args.device == "cuda") as smi:
                run = subprocess.run(
                    [sys.executable, "-c", CHILD, child], capture_output=True, text=True
                )
            if run.returncode != 0:
                sys.exit(f"{side} run failed:\n{run.stderr[-3000:]}")
            out = run.stdout
            results[side].append({**json.loads(out.strip().splitlines()[-1]), "smi_mb": smi.peak})
    best = {s: max(r, key=lambda x: x["tokens_per_s"]) for s, r in results.items() if r}
    for side, r in best.items():
        print(side, json.dumps(r))
    if len(best) < 2:
        return
    a, b = best["lorakit"], best["baseline"]
    name = "random LLaMA 1.17B" if args.random_1b else args.model
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n{name}, NF4 + double quant, {a['dtype']}, r=16 q/k/v/o, {args.per_step} sequences "
        f"per step (<= {args.seq_len} tokens), {args.steps} timed steps after {args.warmup}, "
        f"{where}\n"
    )
    print("| | lorakit | transformers+peft+bnb | lorakit / baseline |")
    print("|---|---|---|---|")
    print(
        f"| real tokens/s | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
        f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x |"
    )
    print(
        f"| peak RSS (MB) | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | "
        f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x |"
    )
    print(
        f"| load (s) | {a['load_s']:.1f} | {b['load_s']:.1f} | {a['load_s'] / b['load_s']:.2f}x |"
    )
    if args.device == "cuda":
        print(
            f"| peak GPU memory allocated (MB) | {a['peak_gpu_mb']:.0f} | {b['peak_gpu_mb']:.0f} "
            f"| {a['peak_gpu_mb'] / b['peak_gpu_mb']:.2f}x |"
        )
        if a["smi_mb"] and b["smi_mb"]:
            print(
                f"| nvidia-smi peak (MB) | {a['smi_mb']:.0f} | {b['smi_mb']:.0f} "
                f"| {a['smi_mb'] / b['smi_mb']:.2f}x |"
            )
    if a["eval_loss"] is None:
        return
    print(
        f"| eval loss after (32 held-out examples) | {a['eval_loss']:.4f} | "
        f"{b['eval_loss']:.4f} | {a['eval_loss'] / b['eval_loss']:.4f} |"
    )


if __name__ == "__main__":
    main()
