"""The QLoRA training loop.

load (NF4 base) -> attach LoRA (PEFT's init or LoftQ) -> AdamW over the adapter only, warmup +
cosine / linear / constant (training.schedule), gradient
accumulation and clipping -> periodic eval -> atomic checkpoints -> adapter in PEFT's format.

Memory tricks: the base is NF4 and dequantized per use (`NF4Linear`); the loss is computed over
the labelled tokens only, in chunks whose logits are recomputed in backward, so the full
(tokens x vocabulary) logits never exist in fp32 at once. Compute runs in bf16 autocast where
the hardware has it. Resuming restores weights, optimizer, RNG and data position, so a resumed
run follows the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.atomic import atomic_write_text
from lorakit.errors import LorakitError
from lorakit.lora.layer import attach_lora, mark_only_lora_trainable
from lorakit.lora.peft_format import AdapterConfig, save_adapter
from lorakit.lora.targets import resolve_targets
from lorakit.models.chat import pad_id
from lorakit.models.loading import ModelSource, empty_model, load_model, resolve_model
from lorakit.models.patches import checkpoint_layers, training_patches
from lorakit.models.precision import autocast, default_dtype, resolve_device
from lorakit.quant.linear import NF4Linear, dequantized_weights
from lorakit.training import data as D
from lorakit.training import memory
from lorakit.training.config import TrainConfig, check_fits_model, check_rank, to_json, validate
from lorakit.training.distributed import (
    ALONE,
    SilentMetrics,
    World,
    any_rank,
    barrier,
    check_enough_work,
    check_same_settings,
    is_main,
    join,
    my_passes,
    ranks,
    sum_floats,
    sum_gradients,
)
from lorakit.training.interrupt import stop_on_interrupt
from lorakit.training.loftq import loftq_init
from lorakit.training.loss import causal_lm_loss, evaluate, reused_logits
from lorakit.training.memory import PASS_TOKENS, micro_batch_size  # noqa: F401 (API)
from lorakit.training.packing import keeps_examples_apart, unpacked
from lorakit.training.rundir import (
    Metrics,
    TrainResult,
    check_out_dir,
    load_checkpoint,
    prepare_out_dir,
    save_checkpoint,
    summarize,
    write_model_card,
)
from lorakit.training.schedule import lr_factor, short_run_note, warmup_steps
from lorakit.training.sharding import shard_base

# --- data order ----------------------------------------------------------------------------------


def batch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle of micro-batch indices per epoch (so resuming needs only the step)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_batches, generator=g).tolist()


def load_for_training(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Any, Any]:
    """`load_model` for cfg; a run that cannot fit is refused before a weight is read."""

    def check(meta: nn.Module) -> None:
        micro = micro_batch_size(cfg, device, meta)
        est = memory.estimate(meta, cfg, default_dtype(device), micro, device=device)
        layers = meta.config.get_text_config().num_hidden_layers
        split = memory.sharded(est, ranks(), layers)
        if cfg.shard_base:
            est = split
        elif ranks() > 1 and not memory.fits(est, cfg, device) and memory.fits(split, cfg, device):
            raise LorakitError(
                f"this run does not fit one device; add --shard-base to split the 4-bit base "
                f"over the {ranks()} ranks"
            )
        memory.check_run(est, cfg, device)

    # A sharded base is loaded on the CPU (memory-mapped where it is stored in 4 bits), then
    # each rank moves its shard alone to its device.
    load_on = torch.device("cpu") if cfg.shard_base else device
    return load_model(cfg.model, quant=cfg.quant, device=load_on, before_weights=check)


def adapter_config_for(cfg: TrainConfig, peft_targets: object, base_name: str) -> AdapterConfig:
    return AdapterConfig(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=peft_targets,
        base_model=base_name,
        init=cfg.init,
    )


def attach_adapter(
    model: nn.Module, cfg: TrainConfig, source: ModelSource | None = None
) -> tuple[list[str], object]:
    """Adapter "default" on cfg.targets, the only trainable parameters of the model; with
    cfg.init "loftq" started from the base's quantization error (the model's `source` files)."""
    modules, peft_targets = resolve_targets(model, cfg.targets)
    check_rank(cfg, model, modules)
    attach_lora(model, modules, "default", cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    mark_only_lora_trainable(model)
    if cfg.init == "loftq" and not cfg.resume:
        r = loftq_init(model, source or resolve_model(cfg.model))
        if is_main():
            print(
                f"LoftQ init: {r.layers} layers in {r.seconds:.1f}s; the 4-bit base's relative "
                f"error on them {r.error_before:.4f} -> {r.error_after:.4f} with the adapter"
            )
    return modules, peft_targets


@contextmanager
def training_setup(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    micro: int,
    packed_attention: bool = True,
) -> Iterator[None]:
    """What a run changes on the model for its duration, undone after: training's faster
    forwards (models.patches), gradient checkpointing where activations would not fit, and the
    base dequantized once where that copy fits (both as training.memory.choose decides, the
    base already loaded). The bench scripts run under it too, so that they measure what
    `train` runs."""
    quant = "nf4" if any(isinstance(m, NF4Linear) for m in model.modules()) else "none"
    est = memory.estimate(empty_model(model.config), cfg, dtype, micro, quant)
    checkpointing, cache = memory.choose(
        replace(est, base=0, codes=0, mapped=False),  # the base is loaded: none of it counts
        memory.run_budget(cfg, device),
        cfg.grad_checkpointing,
        "off" if cfg.shard_base else cfg.cache_weights,  # a rank holds a shard, not the base
    )
    with ExitStack() as stack:
        stack.enter_context(training_patches(model, packed_attention))
        if checkpointing:
            stack.callback(checkpoint_layers(model))
        if cache:
            stack.enter_context(dequantized_weights(model, dtype))
        yield


# --- the run -------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    batches: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TrainConfig,
    world: World = ALONE,
) -> dict:
    """One optimizer step over `batches` (the accumulated micro-batches; under torchrun this
    rank takes its share, and the adapter's gradients are summed); returns its metrics."""
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss_total, tokens = 0.0, 0
    with reused_logits():
        for batch, weight in my_passes(batches, world, even=cfg.shard_base):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss_sum, _ = causal_lm_loss(model, batch, cfg.loss_chunk)
            # Normalise by the step's labelled tokens: accumulating equals one big batch.
            (loss_sum * weight / max(n_total, 1)).backward()
            loss_total += loss_sum.item() * weight
            tokens += int(batch["real_tokens"]) * int(weight)
            del batch, loss_sum
    sum_gradients(trainable, world)
    loss_total, tokens = sum_floats([loss_total, tokens], world)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_total / max(n_total, 1)
    return {"loss": loss, "grad_norm": float(grad_norm), "tokens": int(tokens)}


@dataclass
class _Run:
    """One training run's moving parts, between `train`'s set-up and its results."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_set: list  # packed rows
    evals: list[dict]  # collated eval batches
    collate: Callable[[list], dict]
    device: torch.device
    dtype: torch.dtype
    micro_size: int  # sequences per forward/backward pass
    metrics: Metrics | SilentMetrics
    world: World

    @property
    def total_steps(self) -> int:
        n_batches = math.ceil(len(self.train_set) / self.cfg.batch_size)
        return self.cfg.steps or max(
            1, math.ceil(self.cfg.epochs * n_batches / self.cfg.grad_accum)
        )

    def evaluate(self, step: int) -> None:
        if self.evals:
            loss = evaluate(
                self.model,
                self.evals,
                self.device,
                self.dtype,
                self.cfg.loss_chunk,
                self.world,
                self.cfg.shard_base,
            )
            self.metrics.log({"step": step, "eval_loss": loss})

    def batches(self, step: int) -> list[dict]:
        """The micro-batches of optimizer step `step` (a fixed order: resumable by step alone)."""
        cfg, n_batches = self.cfg, math.ceil(len(self.train_set) / self.cfg.batch_size)
        micro = []
        for k in range(cfg.grad_accum):
            m = step * cfg.grad_accum + k  # global batch index
            i = batch_order(n_batches, cfg.seed, m // n_batches)[m % n_batches]
            rows = self.train_set[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            size = self.micro_size
            micro += [self.collate(rows[j : j + size]) for j in range(0, len(rows), size)]
        return micro

    def loop(self, start: int, progress: bool) -> tuple[int, int]:
        """Optimizer steps from `start` on, with logging, periodic eval and checkpoints;
        returns (steps done, tokens seen). Ctrl-C stops it after the current step."""
        from tqdm.auto import tqdm

        cfg, total = self.cfg, self.total_steps
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        warmup = warmup_steps(cfg.warmup, total)
        shown = progress and self.world.main
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not shown)
        t0, tokens_seen, done = time.perf_counter(), 0, start
        with stop_on_interrupt() as stop:
            for step in range(start, total):
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.schedule)
                batches = self.batches(step)
                row = train_step(
                    self.model,
                    self.optimizer,
                    trainable,
                    batches,
                    self.device,
                    self.dtype,
                    cfg,
                    self.world,
                )
                done, tokens_seen = step + 1, tokens_seen + row["tokens"]
                elapsed = time.perf_counter() - t0
                speed, lr = tokens_seen / elapsed, self.optimizer.param_groups[0]["lr"]
                self.metrics.log(
                    {"step": done, **row, "lr": lr, "tokens_per_s": speed, "elapsed_s": elapsed}
                )
                if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                    bar.close()
                    raise LorakitError(
                        f"training diverged at step {done} (loss {row['loss']}, gradient norm "
                        f"{row['grad_norm']}); lower --lr (now {cfg.lr:g}) and start over with "
                        "--overwrite"
                    )
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{speed:.0f}")
                bar.update(1)
                if any_rank(stop.requested, self.world):  # every rank stops at the same step
                    break
                if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                    self.evaluate(done)
                if cfg.save_every and done % cfg.save_every == 0 and done < total:
                    self.checkpoint(done)
        bar.close()
        return done, tokens_seen

    def checkpoint(self, step: int) -> None:
        if self.world.main:
            path = Path(self.cfg.out) / "checkpoint"
            save_checkpoint(path, self.model, self.optimizer, step, self.metrics.lines())
        barrier(self.world)


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    base_name: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run one training job and save the adapter (PEFT's format) in cfg.out. `model` and
    `tokenizer` may be passed in (a model from `load_model`); else cfg.model is loaded. The
    model keeps the trained adapter as "default", active, in eval mode (with `shard_base`, its
    base stays split over the ranks: every rank must run what it is used for)."""
    validate(cfg)
    check_out_dir(cfg)  # the directory is changed only once every other check has passed
    device = resolve_device(cfg.device)
    world = join(device)  # under torchrun: this rank's place; else a world of one
    check_same_settings(to_json(cfg), world)
    torch.manual_seed(cfg.seed)  # the same on every rank: the same adapter to start
    source = None
    if model is None:
        model, tokenizer, source = load_for_training(cfg, device)
        base_name = source.name
    check_fits_model(cfg, model, tokenizer)
    base_name = base_name or cfg.model
    dtype = default_dtype(device)
    train_set, eval_set, _ = D.build_datasets(cfg, tokenizer)
    micro = micro_batch_size(cfg, device, model)
    check_enough_work(len(train_set), cfg.grad_accum * math.ceil(cfg.batch_size / micro), world)
    _, peft_targets = attach_adapter(model, cfg, source)
    if cfg.shard_base:
        split = shard_base(model, world, device.type)
        if world.main:
            print(split.note(world))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = pad_id(tokenizer)
    out = prepare_out_dir(cfg) if world.main else Path(cfg.out)
    barrier(world)

    packed = True  # decided by packing.keeps_examples_apart once the model is set up

    def collate(rows: list) -> dict:
        how = D.collate if packed else unpacked
        b = how(rows, dtype, pad_id=pad, pad_multiple=D.ROW_MULTIPLE)
        b["real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in rows))  # excl. padding
        return b

    start, resume_lines = 0, None
    if cfg.resume:
        meta = load_checkpoint(out / "checkpoint", model, optimizer)
        start, resume_lines = meta["step"], meta["metrics_lines"]
    elif world.main:
        atomic_write_text(out / "train_config.json", to_json(cfg))
    kept = Metrics if world.main else SilentMetrics  # (rank 0 alone keeps them)
    metrics = kept(out / "metrics.jsonl", resume_lines, cfg.report_to, start)
    with training_setup(model, cfg, device, dtype, micro), closing(metrics):
        packed = keeps_examples_apart(model, device, dtype)
        if not packed and world.main:
            print(
                f"note: {model.config.model_type} does not keep packed examples apart; "
                "training one example per row (padded), which is slower"
            )
        eval_rows, size = eval_set[: cfg.eval_max_sequences], cfg.batch_size
        evals = [collate(eval_rows[i : i + size]) for i in range(0, len(eval_rows), size)]
        run = _Run(
            cfg, model, optimizer, train_set, evals, collate, device, dtype, micro, metrics, world
        )
        if start == 0:
            if world.main and (note := short_run_note(run.total_steps, cfg)):
                print(note, file=sys.stderr)
            run.evaluate(0)
        model.train()
        t0 = time.perf_counter()
        done, tokens_seen = run.loop(start, progress)
        wall = time.perf_counter() - t0
        interrupted = done < run.total_steps
        if not interrupted and done > start:  # (a checkpoint at the last step has it already)
            run.evaluate(done)
    model.eval()
    run.checkpoint(done)
    if world.main:  # rank 0 alone writes; the others wait for it, then read the same files
        save_adapter(model, out, adapter_config_for(cfg, peft_targets, base_name))
        metrics.finish(out / "loss.png")
    barrier(world)
    result = summarize(out, done, tokens_seen / max(wall, 1e-9), wall, interrupted)
    if world.main:
        write_model_card(out, cfg, base_name, result)
    return result
