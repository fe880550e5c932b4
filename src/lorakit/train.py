"""The QLoRA training loop.

load (NF4 base) -> attach LoRA -> AdamW over the adapter only, warmup + cosine, gradient
accumulation and clipping -> periodic eval -> atomic checkpoints -> adapter in PEFT's format.

Memory tricks: the base is NF4 and dequantized per use (`NF4Linear`); the loss is computed over
the labelled tokens only, in chunks whose logits are recomputed in backward, so the full
(tokens x vocabulary) logits never exist in fp32 at once. Compute runs in bf16 autocast where
the hardware has it. Resuming restores weights, optimizer, RNG and data position, so a resumed
run follows the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import AdapterConfig, save_adapter
from lorakit.atomic import atomic_write_text
from lorakit.attention import enable_packed_attention
from lorakit.errors import LorakitError
from lorakit.lora import attach_lora, mark_only_lora_trainable
from lorakit.loss import CHUNK, autocast, causal_lm_loss, evaluate, reused_logits
from lorakit.norm import fuse_rms_norms
from lorakit.qlinear import dequantized_bytes, dequantized_weights, free_memory
from lorakit.rotary import fuse_rotary
from lorakit.rundir import (
    count_lines,
    load_checkpoint,
    plot_losses,
    prepare_out_dir,
    save_checkpoint,
    write_model_card,
)
from lorakit.swiglu import fuse_swiglus


@dataclass
class TrainConfig:
    """Every training setting; flags and a TOML/YAML --config file set the same keys."""

    model: str = "smollm2"  # HF directory, .gguf file, or alias of the embedded default
    data: str | None = None  # JSONL / TXT file; None = the embedded Jargon File data set
    eval_data: str | None = None  # held-out file; None = the data set's fixed eval split
    out: str = "lorakit-out"  # output directory: adapter, metrics, loss curve, checkpoint
    quant: str = "nf4"  # nf4 (QLoRA) or none (plain LoRA over a full-precision base)
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the LoRA input (PEFT's default; 0.05-0.1 for long runs)
    use_rslora: bool = False  # rank-stabilised scaling
    targets: str = "default"  # default, all-linear, names, or re:REGEX (see lorakit inspect)
    steps: int | None = None  # optimizer steps; None = run `epochs` over the data
    epochs: float = 1.0  # used when steps is None
    batch_size: int = 4  # packed sequences per batch (split into micro_batch-sized passes)
    grad_accum: int = 1  # batches per optimizer step
    micro_batch: int = 0  # sequences per forward/backward pass; 0 = auto (CPU 1, GPU batch_size)
    seq_len: int = 512  # tokens per packed sequence
    lr: float = 2e-4  # peak learning rate
    warmup: float = 0.05  # warmup: a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    eval_every: int = 0  # steps between eval losses; 0 = at start and end only
    eval_max_sequences: int = 64  # cap the eval set so evaluation stays quick
    save_every: int = 50  # steps between checkpoints (0 = only at the end / on Ctrl-C)
    seed: int = 0
    grad_checkpointing: str = "auto"  # auto, on, off
    cache_weights: str = "auto"  # keep the base dequantized for the run: auto (if small), on, off
    train_on_prompt: bool = False  # also put loss on prompt tokens
    skip_bad_lines: bool = False  # skip (and count) malformed data lines instead of failing
    device: str = "auto"  # auto, cpu, cuda
    resume: bool = False
    overwrite: bool = False
    loss_chunk: int = CHUNK  # tokens per chunk of the chunked loss
    extra: dict = field(default_factory=dict)  # free-form notes saved with the config

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --- data order and schedule ---------------------------------------------------------------------


def batch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle of micro-batch indices per epoch (so resuming needs only the step)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_batches, generator=g).tolist()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# Tokens per pass for a small model on CPU. SmolLM2-135M, sequences of 512 tokens, throwaway
# in-process A/Bs: two per pass instead of one 4.35 -> 4.12 s per 4 sequences; four instead of
# two 4.47 -> 4.34 and 4.45 -> 4.32 s (peak RSS over 16-sequence steps ~1500 -> ~2050 MB).
PASS_TOKENS = 2048


def micro_batch_size(cfg: TrainConfig, device: torch.device, model: nn.Module) -> int:
    """Sequences per forward/backward pass. Splitting a batch gives the same gradients (the
    loss is normalised over the whole step) and keeps activations small. Auto: the whole batch
    on a GPU; on CPU about PASS_TOKENS tokens for a small model (hidden size under 1024), whose
    512-token passes are bound by per-operation overhead, else one sequence: a larger model's
    matmuls run at full speed with one sequence, and its activations are big."""
    if cfg.micro_batch:
        return min(cfg.micro_batch, cfg.batch_size)
    if device.type != "cpu":
        return cfg.batch_size
    if model.config.get_text_config().hidden_size >= 1024:
        return 1
    return max(1, min(cfg.batch_size, PASS_TOKENS // cfg.seq_len))


def use_grad_checkpointing(setting: str, model: nn.Module, tokens_per_batch: int) -> bool:
    """auto: on when the activations of one micro-batch would take over 1/4 of free memory."""
    if setting in ("on", "off"):
        return setting == "on"
    cfg = model.config.get_text_config()
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    activations = layers * tokens_per_batch * hidden * 34 * 2  # Korthikanti et al. estimate, bf16
    return activations > free_memory(torch.device("cpu")) / 4  # unknown (0): on


def use_weight_cache(setting: str, model: nn.Module, dtype: torch.dtype, device) -> bool:
    """Keep the frozen base dequantized for the run (not twice per pass)? auto: when that copy
    takes under 1/8 of free memory."""
    if setting in ("on", "off"):
        return setting == "on"
    return dequantized_bytes(model, dtype) < free_memory(device) / 8


class _StopFlag:
    requested = False


@contextmanager
def stop_on_interrupt():
    """The first Ctrl-C asks the loop to stop after the current step (which then checkpoints);
    a second one interrupts at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def adapter_config_for(cfg: TrainConfig, peft_targets: object, base_name: str) -> AdapterConfig:
    return AdapterConfig(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=peft_targets,
        base_model=base_name,
    )


def attach_adapter(model: nn.Module, cfg: TrainConfig) -> tuple[list[str], object]:
    from lorakit.targets import resolve_targets

    modules, peft_targets = resolve_targets(model, cfg.targets)
    attach_lora(model, modules, "default", cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    mark_only_lora_trainable(model)
    return modules, peft_targets


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), indent=2) + "\n"


# --- the run -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced, for the CLI's summary and for tests."""

    out: Path
    steps: int
    first_eval_loss: float | None
    final_eval_loss: float | None
    final_train_loss: float | None
    tokens_per_s: float
    wall_s: float
    adapter_mb: float
    interrupted: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LorakitError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise LorakitError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.rank > 0, f"--rank must be a positive integer, got {cfg.rank}"),
        (cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}"),
        (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.steps is None or cfg.steps > 0, f"--steps must be positive, got {cfg.steps}"),
        (cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}"),
        (cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}"),
        (cfg.grad_accum > 0, f"--grad-accum must be positive, got {cfg.grad_accum}"),
        (cfg.micro_batch >= 0, f"--micro-batch must be >= 0 (0 = auto), got {cfg.micro_batch}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.seq_len >= 32, f"--seq-len {cfg.seq_len} is too small; use at least 32 (e.g. 512)"),
        (cfg.quant in ("nf4", "none"), f"--quant must be nf4 or none, got {cfg.quant!r}"),
        (cfg.grad_checkpointing in ("auto", "on", "off"), "--grad-checkpointing: auto, on or off"),
        (cfg.cache_weights in ("auto", "on", "off"), "--cache-weights: auto, on or off"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
    ]
    for ok, message in checks:
        if not ok:
            raise LorakitError(message)


def build_datasets(cfg: TrainConfig, tokenizer) -> tuple[list, list, list[dict]]:
    """Packed train and eval sequences, and the eval examples (for before/after answers)."""
    from lorakit import data as D

    examples = D.load_examples(cfg.data or D.default_dataset_path(), cfg.skip_bad_lines)
    if examples.skipped:
        print(f"skipped {examples.skipped} bad line(s) in {cfg.data}")
    if cfg.eval_data:
        train_ex, eval_ex = list(examples), list(D.load_examples(cfg.eval_data, cfg.skip_bad_lines))
    else:
        train_ex, eval_ex = D.split_examples(examples, seed=cfg.seed)

    def pack(items: list[dict]) -> list:
        tokenized = [D.tokenize_example(e, tokenizer, cfg.train_on_prompt) for e in items]
        return D.pack_sequences(tokenized, cfg.seq_len)

    return pack(train_ex), pack(eval_ex), eval_ex


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def speed_up_training(model: nn.Module, packed_attention: bool = True) -> None:
    """What `train` sets up before its first step, for the bench scripts to run the same: packed
    rows' attention example by example; on CPU in bf16 the compiled RMSNorm, SwiGLU and rotary
    passes where the architecture has them."""
    if packed_attention:
        enable_packed_attention(model)
    fuse_rms_norms(model)
    fuse_swiglus(model)
    fuse_rotary(model)


def train_step(model, optimizer, trainable, batches: list[dict], device, dtype, cfg) -> dict:
    """One optimizer step over `batches` (the accumulated micro-batches); returns its metrics."""
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss_total, tokens = 0.0, 0
    with reused_logits():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss_sum, _ = causal_lm_loss(model, batch, cfg.loss_chunk)
            # Normalise by the step's labelled tokens: accumulating equals one big batch.
            (loss_sum / max(n_total, 1)).backward()
            loss_total += loss_sum.item()
            tokens += int(batch["real_tokens"])
            del batch, loss_sum
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total / max(n_total, 1), "grad_norm": float(grad_norm), "tokens": tokens}


def train(
    cfg: TrainConfig,
    model=None,
    tokenizer=None,
    base_name: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run one training job. `model`/`tokenizer` may be passed in (tests); else cfg.model loads."""
    from tqdm.auto import tqdm

    from lorakit.data import ROW_MULTIPLE, collate
    from lorakit.loading import default_dtype, load_model

    validate(cfg)
    out = prepare_out_dir(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer, source = load_model(cfg.model, quant=cfg.quant, device=device)
        base_name = source.name
    dtype = default_dtype(device)
    train_set, eval_set, _ = build_datasets(cfg, tokenizer)
    _, peft_targets = attach_adapter(model, cfg)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = _pad_id(tokenizer)

    def batch(rows: list) -> dict:
        b = collate(rows, dtype, pad_id=pad, pad_multiple=ROW_MULTIPLE)
        b["real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in rows))  # excl. padding
        return b

    n_micro = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * n_micro / cfg.grad_accum))
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    eval_rows = eval_set[: cfg.eval_max_sequences]
    evals = [
        batch(eval_rows[i : i + cfg.batch_size]) for i in range(0, len(eval_rows), cfg.batch_size)
    ]
    micro_size = micro_batch_size(cfg, device, model)
    speed_up_training(model)
    if use_grad_checkpointing(cfg.grad_checkpointing, model, micro_size * cfg.seq_len):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    metrics_file = out / "metrics.jsonl"
    start = 0
    if cfg.resume:
        meta = load_checkpoint(out / "checkpoint", model, optimizer)
        start = meta["step"]
        kept = metrics_file.read_text().splitlines()[: meta["metrics_lines"]]
        atomic_write_text(metrics_file, "".join(line + "\n" for line in kept))
    else:
        atomic_write_text(out / "train_config.json", to_json(cfg))
        atomic_write_text(metrics_file, "")

    def log(row: dict) -> None:
        with metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if start == 0 and evals:
        log({"step": 0, "eval_loss": evaluate(model, evals, device, dtype, cfg.loss_chunk)})
    model.train()
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not progress)
    t0, tokens_seen, done = time.perf_counter(), 0, start
    cache = use_weight_cache(cfg.cache_weights, model, dtype, device)
    weights = dequantized_weights(model, dtype) if cache else nullcontext()
    with stop_on_interrupt() as stop, weights:
        for step in range(start, total_steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total_steps, warmup)
            micro = []
            for k in range(cfg.grad_accum):
                m = step * cfg.grad_accum + k  # global micro-batch index: resumable by step alone
                i = batch_order(n_micro, cfg.seed, m // n_micro)[m % n_micro]
                rows = train_set[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                micro += [batch(rows[j : j + micro_size]) for j in range(0, len(rows), micro_size)]
            row = train_step(model, optimizer, trainable, micro, device, dtype, cfg)
            done = step + 1
            tokens_seen += row["tokens"]
            elapsed = time.perf_counter() - t0
            row = {
                "step": done,
                **row,
                "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_s": tokens_seen / elapsed,
                "elapsed_s": elapsed,
            }
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if stop.requested:
                break
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                log(
                    {
                        "step": done,
                        "eval_loss": evaluate(model, evals, device, dtype, cfg.loss_chunk),
                    }
                )
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                save_checkpoint(
                    out / "checkpoint", model, optimizer, done, count_lines(metrics_file)
                )
    bar.close()
    interrupted = done < total_steps
    wall = time.perf_counter() - t0
    if not interrupted and evals:
        log({"step": done, "eval_loss": evaluate(model, evals, device, dtype, cfg.loss_chunk)})
    save_checkpoint(out / "checkpoint", model, optimizer, done, count_lines(metrics_file))
    save_adapter(model, out, adapter_config_for(cfg, peft_targets, base_name or cfg.model))
    plot_losses(metrics_file, out / "loss.png")
    result = summarize(out, done, tokens_seen / max(wall, 1e-9), wall, interrupted)
    write_model_card(out, cfg, base_name or cfg.model, result)
    return result


def summarize(out: Path, steps: int, tokens_per_s: float, wall: float, interrupted: bool):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    return TrainResult(
        out=out,
        steps=steps,
        first_eval_loss=evals[0] if evals else None,
        final_eval_loss=evals[-1] if len(evals) > 1 else None,
        final_train_loss=losses[-1] if losses else None,
        tokens_per_s=tokens_per_s,
        wall_s=wall,
        adapter_mb=(out / "adapter_model.safetensors").stat().st_size / 1e6,
        interrupted=interrupted,
    )


def held_out_answers(model, tokenizer, cfg: TrainConfig, n: int, max_new_tokens: int = 64):
    """Greedy answers of the bare base and of base + adapter to n held-out prompts."""
    from lorakit import data as D
    from lorakit.generate import Sampling, generate_ids

    if cfg.eval_data:
        eval_ex = list(D.load_examples(cfg.eval_data, cfg.skip_bad_lines))
    else:
        examples = D.load_examples(cfg.data or D.default_dataset_path(), cfg.skip_bad_lines)
        eval_ex = D.split_examples(examples, seed=cfg.seed)[1]
    chats = [
        e["messages"] for e in eval_ex if e.get("messages", [{}])[-1].get("role") == "assistant"
    ]
    chats = chats[:n]
    if not chats:
        return []
    prompts = [D.encode_prompt(m[:-1], tokenizer) for m in chats]
    model.eval()
    # One batch: the first n rows run the bare base, the next n the adapter.
    rows = [None] * len(prompts) + ["default"] * len(prompts)
    with torch.autocast(model.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32):
        ids = generate_ids(
            model,
            prompts * 2,
            Sampling(max_new_tokens=max_new_tokens),
            eos_ids=[tokenizer.eos_token_id],
            pad_id=_pad_id(tokenizer),
            adapters=rows,
        )
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    answers = {"base": texts[: len(prompts)], "tuned": texts[len(prompts) :]}
    return [
        {
            "prompt": m[-2]["content"],
            "base": answers["base"][i],
            "tuned": answers["tuned"][i],
            "reference": _shorten(m[-1]["content"]),
        }
        for i, m in enumerate(chats)
    ]


def _shorten(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def run_training(cfg: TrainConfig, samples: int = 3):
    """What `lorakit train` does: load, train, then answer held-out prompts before and after."""
    from lorakit.loading import load_model

    validate(cfg)
    from lorakit import data as D

    # Refuse a bad --out or data file before the slow model load.
    prepare_out_dir(cfg)
    D.load_examples(cfg.data or D.default_dataset_path(), cfg.skip_bad_lines)
    if cfg.eval_data:
        D.load_examples(cfg.eval_data, cfg.skip_bad_lines)
    device = resolve_device(cfg.device)
    model, tokenizer, source = load_model(cfg.model, quant=cfg.quant, device=device)
    result = train(cfg, model, tokenizer, base_name=source.name)
    answers = (
        []
        if result.interrupted or samples <= 0
        else held_out_answers(model, tokenizer, cfg, samples)
    )
    return result, answers
