"""The memory a training run needs, estimated from the model's shapes (a model on meta will do):
what `--grad-checkpointing auto` and `--cache-weights auto` decide on, and the one-line
refusal, before the weights load, when the run cannot fit the device, naming what would."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.anatomy import NF4_BITS
from lorakit.lora.targets import (
    experts_weights,
    linear_modules,
    lora_param_count,
    lowest_adapted_layer,
    resolve_targets,
)
from lorakit.models.precision import default_dtype
from lorakit.quant.bnb_format import is_prequantized
from lorakit.quant.linear import free_memory
from lorakit.training.config import TrainConfig, parse_size
from lorakit.training.distributed import is_main, ranks

GiB = 2**30
# Bytes a transformer layer keeps for backward per token and hidden unit in 16 bits, attention
# scores left out (Korthikanti et al., "Reducing Activation Recomputation", 2022: 34 s b h).
ACTIVATION_BYTES = 34
ADAPTER_BYTES = 16  # a LoRA parameter: fp32 weight, gradient and AdamW's two moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, each part of a training run's peak."""

    base: int  # the base as stored: NF4 linear layers (or not, quant="none"), the rest as is
    cache: int  # the quantized layers dequantized to the compute dtype (the weight cache)
    adapter: int  # the LoRA parameters with their gradients and optimizer state
    activations: int  # what one micro-batch keeps for backward without checkpointing
    checkpointed: int  # the same with checkpointing: each layer's input, one layer's whole
    loss: int  # a chunk of logits in fp32 and its gradient
    codes: int = 0  # of base: the NF4 linear layers' 4-bit codes
    mapped: bool = False  # the codes stay in a checkpoint stored in 4 bits, memory-mapped

    def total(self, checkpointing: bool, cache: bool) -> int:
        kept = self.checkpointed if checkpointing else self.activations
        return self.base + self.adapter + kept + self.loss + (self.cache if cache else 0)


def estimate(
    model: nn.Module,
    cfg: TrainConfig,
    dtype: torch.dtype,
    micro: int,
    quant: str | None = None,
    device: torch.device | str = "cpu",
) -> MemoryEstimate:
    """The estimate for training `model` (its weights on meta: `models.loading.empty_model`) as
    `cfg` says on `device`, `micro` sequences a pass, the base stored as `quant` (default
    cfg.quant)."""
    nf4 = (quant or cfg.quant) == "nf4"
    tokens = micro * cfg.seq_len
    size = torch.empty(0, dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters())
    linears = linear_modules(model).values()
    linear = sum(m.weight.numel() for m in linears)
    experts = experts_weights(model)  # NF4, one state per expert
    expert = sum(e * o * i for e, o, i in experts.values())
    tables = len(linears) + len(experts)  # NF4Experts keep one code table for all experts
    # NF4: the codes and block scales, plus each matrix's 256-entry table of the scales' code
    four_bit = linear + expert
    stored = int(four_bit * NF4_BITS / 8) + 1024 * tables if nf4 else four_bit * size
    base = stored + (total - four_bit) * size
    selected, _ = resolve_targets(model, cfg.targets)
    text = model.config.get_text_config()
    hidden = text.hidden_size
    # only the layers from the lowest adapted one up keep anything for backward
    layers = text.num_hidden_layers - lowest_adapted_layer(model, selected)
    per_layer = tokens * hidden * ACTIVATION_BYTES * size // 2
    return MemoryEstimate(
        base=base,
        cache=linear * size if nf4 else 0,
        adapter=lora_param_count(model, selected, cfg.rank) * ADAPTER_BYTES,
        activations=layers * per_layer,
        checkpointed=layers * tokens * hidden * size + per_layer,
        loss=2 * min(cfg.loss_chunk, tokens) * text.vocab_size * 4,
        codes=linear // 2 if nf4 else 0,
        mapped=nf4 and torch.device(device).type == "cpu" and _codes_in_file(model),
    )


def sharded(est: MemoryEstimate, shards: int, layers: int) -> MemoryEstimate:
    """`est` with the 4-bit layers split over `shards` ranks (--shard-base, training.sharding):
    each rank keeps its share of them plus two decoder layers' gathered whole (the one running
    and the next, prefetched); the rest of the base stays whole, and nothing is memory-mapped."""
    four_bit = int(est.codes * NF4_BITS / 4)
    kept = four_bit // shards + 2 * four_bit // max(layers, 1)
    return replace(est, base=est.base - four_bit + kept, mapped=False)


def _codes_in_file(model: nn.Module) -> bool:
    """Whether every linear layer lorakit quantizes comes from the checkpoint in 4 bits, so its
    codes stay memory-mapped (a layer the checkpoint keeps in 16 bits, listed in its
    `llm_int8_skip_modules`, is quantized in memory instead)."""
    if not is_prequantized(model.config, "the model's config.json"):
        return False
    qc = model.config.quantization_config
    skipped = (qc if isinstance(qc, dict) else qc.to_dict()).get("llm_int8_skip_modules") or []
    return not any(key in name for name in linear_modules(model) for key in skipped)


def device_budget(device: torch.device, cap: int | None = None) -> int:
    """Bytes a run may use on the device: its free memory, within the process's share of a GPU
    (`torch.cuda.set_per_process_memory_fraction`) where one is set, and within `cap` bytes for
    the whole process (`--memory`) counting what it holds already."""
    free = free_memory(device)
    if device.type == "cuda":
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = getter(device) if getter is not None else 1.0
        total = torch.cuda.get_device_properties(device).total_memory
        free = min(free, int(fraction * total) - torch.cuda.memory_reserved(device))
    if cap is not None:
        held = torch.cuda.memory_reserved(device) if device.type == "cuda" else resident_bytes()
        free = min(free, cap - held)
    return max(free, 0)


def run_budget(cfg: TrainConfig, device: torch.device) -> int:
    """`device_budget` within the run's `--memory`, if it has one."""
    return device_budget(device, parse_size(cfg.memory) if cfg.memory else None)


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def streaming_note(est: MemoryEstimate, budget: int) -> str | None:
    """What to tell the user when the run's leanest settings fit `budget` only with the 4-bit
    codes left in their file, read from disk as each layer runs (and dropped by the kernel
    again when memory runs short); None when they fit in memory."""
    if not est.mapped or est.total(checkpointing=True, cache=False) <= budget:
        return None
    return (
        f"the 4-bit weights ({_gib(est.codes)}) do not all fit in the {_gib(budget)} free: "
        "they stay in the checkpoint's files, memory-mapped, and what memory cannot hold is "
        "read from disk again as the layers run (up to three times a step)"
    )


def check_run(est: MemoryEstimate, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a run that cannot fit its budget (`choose`), before any weight is read; say so
    when it fits only with the 4-bit weights read from disk."""
    budget = run_budget(cfg, device)
    choose(est, budget, cfg.grad_checkpointing, cfg.cache_weights)
    if (note := streaming_note(est, budget)) and is_main():
        print(note)


def fits(est: MemoryEstimate, cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `check_run` would let the run go (quietly)."""
    try:
        choose(est, run_budget(cfg, device), cfg.grad_checkpointing, cfg.cache_weights)
    except LorakitError:
        return False
    return True


def choose(
    est: MemoryEstimate, budget: int, grad_checkpointing: str, cache_weights: str
) -> tuple[bool, bool]:
    """(checkpointing, cache) for the settings given (auto, on, off) and `budget` bytes, the base
    not loaded yet. auto: checkpointing when the activations would take over a quarter of what
    the rest leaves (they grow with the batch, everything else does not); the cache when it
    takes under an eighth of the budget and still fits. Raises LorakitError, naming what fits,
    when a setting that was asked for, or the leanest run, does not fit."""
    where = f"the {_gib(budget)} free"
    lean = est.total(checkpointing=True, cache=False)
    need = lean - est.codes if est.mapped else lean  # mapped codes can stay on disk
    if need > budget:
        if est.mapped or lean - est.codes > budget:
            fix = "use a smaller --micro-batch or --seq-len, or a smaller model"
        else:  # it would train with the codes left in a 4-bit checkpoint, read from disk
            fix = (
                f"all but the 4-bit weights ({_gib(est.codes)}) would fit, and those can be "
                "read from disk as the layers run: write the model in 4 bits once with "
                "`lorakit quantize MODEL --out DIR` and train DIR"
            )
        streamed = " with the 4-bit weights read from disk" if est.mapped else ""
        base = est.base - est.codes if est.mapped else est.base
        raise LorakitError(
            f"this run needs at least {_gib(need)}{streamed} (base {_gib(base)}, "
            f"activations with checkpointing {_gib(est.checkpointed)}) and {where} are not "
            f"enough; {fix}"
        )
    rest = budget - lean + est.checkpointed  # what the activations may take
    full = est.total(checkpointing=False, cache=False)
    if grad_checkpointing == "auto":
        checkpointing = est.activations > rest / 4 or full > budget
    else:
        checkpointing = grad_checkpointing == "on"
        if not checkpointing and full > budget:
            raise LorakitError(
                f"--grad-checkpointing off needs about {_gib(full)} and {where}"
                f" are not enough; use --grad-checkpointing on (about {_gib(lean)})"
                " or a smaller --micro-batch"
            )
    with_cache = est.total(checkpointing, cache=True)
    if cache_weights == "auto":
        cache = est.cache > 0 and est.cache < budget / 8 and with_cache <= budget
    else:
        cache = cache_weights == "on"
        if cache and with_cache > budget:
            raise LorakitError(
                f"--cache-weights on needs about {_gib(with_cache)} and {where} are not enough;"
                f" use --cache-weights off (about {_gib(est.total(checkpointing, False))})"
            )
    return checkpointing, cache


# Tokens per pass for a small model on CPU. SmolLM2-135M, sequences of 512 tokens, throwaway
# in-process A/Bs: two per pass instead of one 4.35 -> 4.12 s per 4 sequences; four instead of
# two 4.47 -> 4.34 and 4.45 -> 4.32 s (peak RSS over 16-sequence steps ~1500 -> ~2050 MB).
PASS_TOKENS = 2048


def micro_batch_size(
    cfg: TrainConfig, device: torch.device, model: nn.Module, dtype: torch.dtype | None = None
) -> int:
    """Sequences per forward/backward pass. Splitting a batch gives the same gradients (the
    loss is normalised over the whole step) and keeps activations small. Auto: the whole batch
    (under torchrun, a rank's share of it) on a GPU; on a CPU computing in 16 bits (`dtype`,
    default the device's), about PASS_TOKENS tokens for a small model (hidden size under
    1024), whose 512-token passes are bound by per-operation overhead; else one sequence: a
    larger model's matmuls run at full speed with one, and in fp32 (a CPU without BF16)
    activations take twice the memory for little speed (SmolLM2, 16 x 512 tokens a step: 4
    sequences a pass 79 tokens/s at 5.2 GB peak, 2 55 at 3.4 GB, 1 68 at 2.3 GB;
    BENCHMARKS.md)."""
    if cfg.micro_batch:
        return min(cfg.micro_batch, cfg.batch_size)
    share = math.ceil(cfg.batch_size / ranks())  # under torchrun: every rank gets a pass
    if device.type != "cpu":
        return share
    dtype = dtype or default_dtype(device)
    if model.config.get_text_config().hidden_size >= 1024 or dtype == torch.float32:
        return 1
    return max(1, min(share, PASS_TOKENS // cfg.seq_len))
