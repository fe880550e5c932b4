"""`lorakit plan`: will a run fit, and how long will it take, from the model's config alone.

Memory is `training.memory`'s estimate, the very numbers `lorakit train` decides its settings on
(micro-batch, gradient checkpointing, weight cache), plus what the process holds before any
weight (Python, torch, transformers: measured in this process on a CPU). The same estimate is
shown for LoRA over a 16-bit base and for a full fine-tune (16-bit weights and gradients, fp32
AdamW moments and master weights: 16 bytes a parameter). Time is one decoder layer of the
model's shapes, with random weights, trained for one pass here as `lorakit train` would
(training.layer_timing), times the layers, plus the output head at the matmul rate measured
here: a stated estimate, not a promise. The step's matmul FLOPs a token are reported beside it.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.targets import experts_weights, linear_modules, lora_param_count, resolve_targets
from lorakit.training import memory
from lorakit.training.config import TrainConfig
from lorakit.training.layer_timing import LayerTime, layer_time
from lorakit.training.trainer import micro_batch_size

FULL_BYTES = 16  # a fully trained parameter: 16-bit weight and gradient, fp32 master + AdamW


def runtime_bytes(device: torch.device) -> int:
    """What the process holds before the model: its resident memory now (CPU; `lorakit train`
    imports what this process has), nothing on a GPU (its peak counts tensors only)."""
    return memory.resident_bytes() if device.type == "cpu" else 0


def matmul_rate(rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a (rows x hidden) @ (hidden x hidden) matmul here, best of a few."""
    a = torch.randn(rows, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, hidden, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * hidden * hidden / max(best, 1e-9)


def make_plan(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    budget: int,
    calibrate: bool = True,
) -> dict:
    """The plan for training `model` (on meta) as `cfg` says within `budget` bytes."""
    runtime = runtime_bytes(device)
    micro = micro_batch_size(cfg, device, model, dtype)
    est = memory.estimate(model, cfg, dtype, micro, device=device)
    lean = est.total(checkpointing=True, cache=False) + runtime
    try:
        checkpointing, cache = memory.choose(
            est, max(budget - runtime, 0), cfg.grad_checkpointing, cfg.cache_weights
        )
        fits, why = True, ""
        streaming = memory.streaming_note(est, max(budget - runtime, 0))
    except LorakitError as e:
        streaming = None
        checkpointing, cache = True, False
        fits, why = False, str(e)
    peak = est.total(checkpointing, cache) + runtime
    total = sum(p.numel() for p in model.parameters())
    lora16 = memory.estimate(model, cfg, dtype, micro, quant="none")
    size = torch.empty(0, dtype=dtype).element_size()
    full = total * FULL_BYTES + est.checkpointed + est.loss + runtime

    weights = sum(m.weight.numel() for m in linear_modules(model).values())
    weights += sum(e * o * i for e, o, i in experts_weights(model).values())
    selected, _ = resolve_targets(model, cfg.targets)
    adapter = lora_param_count(model, selected, cfg.rank)
    passes = 3 if checkpointing else 2  # forward, input gradients (+ the recomputed forward)
    per_token = 2 * weights * passes + 6 * adapter
    speed, speed_note = None, ""
    if calibrate and fits:
        print("timing one decoder layer of this model's shapes here...", file=sys.stderr)
        try:
            layer = layer_time(model, cfg, device, dtype, micro, checkpointing, cache)
            speed = step_time(model.config.get_text_config(), cfg, micro, layer, device, dtype)
        except (LorakitError, RuntimeError) as e:  # the memory plan stands without it
            speed_note = str(e).strip().splitlines()[0]
    return {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "budget_bytes": budget,
        "fits": fits,
        "why_not": why,
        "settings": {
            "batch_size": cfg.batch_size,
            "micro_batch": micro,
            "seq_len": cfg.seq_len,
            "rank": cfg.rank,
            "targets": cfg.targets or "default",
            "grad_checkpointing": checkpointing,
            "cache_weights": cache,
            "weights_from_disk": streaming is not None,
        },
        "memory_bytes": {
            "runtime": runtime,
            "base": est.base,
            "weight_cache": est.cache if cache else 0,
            "adapter_and_optimizer": est.adapter,
            "activations": est.activations,
            "activations_checkpointed": est.checkpointed,
            "logits": est.loss,
        },
        "peak_memory_bytes": peak,
        "leanest_bytes": lean,
        "alternatives_bytes": {
            "qlora": peak,
            "lora_16bit": lora16.total(checkpointing, False) + runtime,
            "full_finetune": full,
        },
        "parameters": {"model": total, "adapter": adapter, "bytes_per_value": size},
        "flops_per_token": per_token,
        "speed": speed,
        "speed_note": speed_note,
    }


def step_time(
    text, cfg: TrainConfig, micro: int, layer: LayerTime, device: torch.device, dtype: torch.dtype
) -> dict:  # noqa: ANN001 (text: a transformers text config)
    """A step's seconds: one decoder layer timed here (training.layer_timing) times the layers
    (forward only below the lowest adapted layer), plus what the pass spends outside them (timed
    with it) and the output head and loss at the matmul rate measured here (its logits are
    computed twice, forward and again in backward, and give the hidden states' gradient), per
    pass."""
    tokens = micro * cfg.seq_len
    rate = matmul_rate(min(tokens, 2048), text.hidden_size, dtype, device)
    head = 3 * 2 * text.hidden_size * text.vocab_size * tokens / rate
    passes = math.ceil(cfg.batch_size / micro)
    below = text.num_hidden_layers - layer.trained_layers  # forward only
    layers = layer.trained_layers * layer.trained + below * layer.forward
    seconds = passes * (layers + layer.outside + head)
    return {
        "layer_seconds": layer.trained,
        "layers": text.num_hidden_layers,
        "forward_only_layers": below,
        "forward_only_layer_seconds": layer.forward,
        "head_seconds": head,
        "outside_layers_seconds": layer.outside,
        "matmul_flops_per_s": rate,
        "seconds_per_step": seconds,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
        "steps": cfg.steps,
        "run_seconds": cfg.steps * seconds if cfg.steps else None,
    }


def _duration(seconds: float) -> str:
    """3 h 20 min, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{round(seconds / 60)} min" if seconds >= 90 else f"{round(seconds)} s"


def format_plan(plan: dict, title: str) -> str:
    """The plan as `lorakit plan` prints it."""
    gib = 2**30
    s, mem, alt = plan["settings"], plan["memory_bytes"], plan["alternatives_bytes"]
    out = [
        f"{title}: {plan['parameters']['model'] / 1e9:.2f}B parameters, on {plan['device']} "
        f"({plan['dtype']}), {plan['budget_bytes'] / gib:.1f} GiB to use",
        "",
        f"Settings: batch {s['batch_size']} x {s['seq_len']} tokens ({s['micro_batch']} a pass), "
        f"rank {s['rank']} on {s['targets']}, gradient checkpointing "
        f"{'on' if s['grad_checkpointing'] else 'off'}, weight cache "
        f"{'on' if s['cache_weights'] else 'off'}",
        "",
        "Memory at the peak of a step (QLoRA)",
    ]
    kept = "activations_checkpointed" if s["grad_checkpointing"] else "activations"
    rows = [
        ("Python + torch + transformers", mem["runtime"]),
        ("base (linear layers in NF4, the rest as computed)", mem["base"]),
        ("dequantized weight cache", mem["weight_cache"]),
        ("adapter + gradients + AdamW", mem["adapter_and_optimizer"]),
        (f"activations ({'checkpointed' if kept != 'activations' else 'all kept'})", mem[kept]),
        ("logits (a chunk, fp32, + gradient)", mem["logits"]),
    ]
    out += [f"  {label:<50}{b / gib:>8.2f} GiB" for label, b in rows]
    out.append(f"  {'predicted peak':<50}{plan['peak_memory_bytes'] / gib:>8.2f} GiB")
    other = "all kept" if kept != "activations" else "checkpointed"
    other_bytes = mem["activations" if kept != "activations" else "activations_checkpointed"]
    out += [
        f"  (activations {other}: {other_bytes / gib:.2f} GiB)",
        "",
        f"Same run as LoRA over a 16-bit base: {alt['lora_16bit'] / gib:.2f} GiB; "
        f"a full fine-tune: {alt['full_finetune'] / gib:.2f} GiB.",
    ]
    if plan["fits"] and s["weights_from_disk"]:
        out.append("It fits with the 4-bit weights read from disk as the layers run: each step")
        out.append("takes at least the time to read them (the estimate below leaves that out).")
    elif plan["fits"]:
        out.append("It fits.")
    else:
        out.append(f"It does not fit: {plan['why_not']}")
    speed = plan["speed"]
    if speed:
        below = speed["forward_only_layers"]
        forward_only = (
            f", and {speed['forward_only_layer_seconds']:.2f} s forward only x {below} layers "
            "below the lowest adapted one"
            if below
            else ""
        )
        out.append(
            f"Expected speed: about {speed['tokens_per_s']:.0f} tokens/s, "
            f"{speed['seconds_per_step']:.1f} s a step: one decoder layer of this model's shapes "
            f"(random weights) took {speed['layer_seconds']:.2f} s a pass here, x "
            f"{speed['layers'] - below} layers{forward_only}, + "
            f"{speed['outside_layers_seconds']:.2f} s outside the layers (embedding, loss), + "
            f"{speed['head_seconds']:.2f} s for the output head (an estimate)."
        )
        if speed["run_seconds"]:
            out.append(
                f"{speed['steps']} steps: about {_duration(speed['run_seconds'])} of training "
                "(loading and evaluation besides)."
            )
    elif plan.get("speed_note"):
        out.append(f"Speed not estimated: {plan['speed_note']}.")
    return "\n".join(out)
