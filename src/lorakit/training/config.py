"""Every training setting in one dataclass, and the checks that refuse bad ones before a run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import adapter_names, is_linear_like, layer_features
from lorakit.models.loading import context_length
from lorakit.training.distributed import ranks
from lorakit.training.loss import CHUNK
from lorakit.training.schedule import SCHEDULES
from lorakit.training.tensorboard import REPORTS, check_available


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
    init: str = "default"  # adapter init: default (PEFT's: B = 0) or loftq (NF4 error's SVD)
    targets: str = "default"  # default, all-linear, names, or re:REGEX (see lorakit inspect)
    steps: int | None = None  # optimizer steps; None = run `epochs` over the data
    epochs: float = 1.0  # used when steps is None
    batch_size: int = 4  # packed sequences per batch (split into micro_batch-sized passes)
    grad_accum: int = 1  # batches per optimizer step
    micro_batch: int = 0  # sequences per forward/backward pass; 0 = auto (CPU 1, GPU batch_size)
    seq_len: int = 512  # tokens per packed sequence
    lr: float = 2e-4  # peak learning rate
    warmup: float = 0.05  # warmup: a fraction of the steps (< 1) or a number of steps
    schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    eval_every: int = 0  # steps between eval losses; 0 = at start and end only
    eval_max_sequences: int = 64  # cap the eval set so evaluation stays quick
    save_every: int = 50  # steps between checkpoints (0 = only at the end / on Ctrl-C)
    seed: int = 0
    grad_checkpointing: str = "auto"  # auto, on, off
    cache_weights: str = "auto"  # keep the base dequantized for the run: auto (if small), on, off
    shard_base: bool = False  # under torchrun: split the 4-bit base over the ranks (FSDP2)
    train_on_prompt: bool = False  # also put loss on prompt tokens
    skip_bad_lines: bool = False  # skip (and count) malformed data lines instead of failing
    device: str = "auto"  # auto, cpu, cuda
    memory: str | None = None  # the most memory the run may use ("6GB"); None = what is free
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"  # also write the metrics for: none, tensorboard
    loss_chunk: int = CHUNK  # tokens per chunk of the chunked loss
    extra: dict = field(default_factory=dict)  # free-form notes saved with the config

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, flag: str = "--memory") -> int:
    """'16GB', '16G', '512MiB', '1.5 GiB' -> bytes (binary units, as memory is sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if m is None or float(m.group(1)) <= 0:
        raise LorakitError(f"{flag} {text!r} is not a size; write it like 16GB or 512MB")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), indent=2) + "\n"


# Settings only a --config file (or the Python API) sets: no flag to name in a message.
FILE_ONLY = {"weight_decay", "max_grad_norm", "eval_max_sequences", "loss_chunk", "extra"}
_KINDS = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "dict": ((dict,), "a table"),
}


def flag(key: str) -> str:
    """How a message names setting `key`: its flag, or the key of a config file."""
    return key if key in FILE_ONLY else "--" + key.replace("_", "-")


def check_types(cfg: TrainConfig) -> None:
    """Refuse a setting of the wrong type (rank = "x" in a config file), which would otherwise
    fail deep inside the run with a TypeError."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        kinds = [k for k in kinds if k != "None"]
        ok = any(isinstance(value, _KINDS[k][0]) for k in kinds)
        if not ok or (isinstance(value, bool) and "bool" not in kinds):
            what = " or ".join(_KINDS[k][1] for k in kinds)
            raise LorakitError(f"{flag(f.name)} must be {what}, got {value!r}")


def _positive(key: str, value: float) -> tuple[bool, str]:
    return value > 0 and math.isfinite(value), f"{flag(key)} must be positive, got {value}"


def _not_negative(key: str, value: float) -> tuple[bool, str]:
    return value >= 0 and math.isfinite(value), f"{flag(key)} must be >= 0, got {value}"


def validate(cfg: TrainConfig) -> None:
    """Refuse settings no run can use, with the flag and the fix."""
    check_types(cfg)
    checks = [
        (cfg.rank > 0, f"--rank must be a positive integer, got {cfg.rank}"),
        _positive("alpha", cfg.alpha),
        (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.steps is None or cfg.steps > 0, f"--steps must be positive, got {cfg.steps}"),
        _positive("epochs", cfg.epochs),
        _positive("batch_size", cfg.batch_size),
        _positive("grad_accum", cfg.grad_accum),
        (cfg.micro_batch >= 0, f"--micro-batch must be >= 0 (0 = auto), got {cfg.micro_batch}"),
        _positive("lr", cfg.lr),
        _not_negative("warmup", cfg.warmup),
        _not_negative("weight_decay", cfg.weight_decay),
        _not_negative("max_grad_norm", cfg.max_grad_norm),
        _not_negative("eval_every", cfg.eval_every),
        _positive("eval_max_sequences", cfg.eval_max_sequences),
        _not_negative("save_every", cfg.save_every),
        _positive("loss_chunk", cfg.loss_chunk),
        (cfg.seq_len >= 32, f"--seq-len {cfg.seq_len} is too small; use at least 32 (e.g. 512)"),
        (cfg.quant in ("nf4", "none"), f"--quant must be nf4 or none, got {cfg.quant!r}"),
        (cfg.grad_checkpointing in ("auto", "on", "off"), "--grad-checkpointing: auto, on or off"),
        (
            cfg.schedule in SCHEDULES,
            f"--schedule must be cosine, linear or constant, not {cfg.schedule!r}",
        ),
        (cfg.init in ("default", "loftq"), f"--init must be default or loftq, got {cfg.init!r}"),
        (
            cfg.init != "loftq" or cfg.quant == "nf4",
            "--init loftq corrects the error of the 4-bit base, and --quant none has none; "
            "drop --init loftq, or train with --quant nf4",
        ),
        (cfg.cache_weights in ("auto", "on", "off"), "--cache-weights: auto, on or off"),
        (
            cfg.report_to in REPORTS,
            f"--report-to must be none or tensorboard, not {cfg.report_to!r}",
        ),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
        (
            not cfg.shard_base or ranks() > 1,
            "--shard-base splits the 4-bit base over torchrun's processes; start the run with "
            "torchrun --nproc-per-node N -m lorakit train ... (N of 2 or more)",
        ),
        (
            not cfg.shard_base or cfg.quant == "nf4",
            "--shard-base splits the 4-bit base over the ranks; it needs --quant nf4",
        ),
        (
            not cfg.shard_base or cfg.cache_weights != "on",
            "--cache-weights on keeps the whole base dequantized on every rank, which "
            "--shard-base is there to avoid; drop one of them",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise LorakitError(message)
    if cfg.memory is not None:
        parse_size(cfg.memory)
    if cfg.report_to == "tensorboard":
        check_available()


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called `name`, or None for a parameter (a MoE layer's fused experts)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_rank(cfg: TrainConfig, model: nn.Module, modules: list[str]) -> None:
    """Refuse a --rank above every target layer's smaller dimension: no B A could use it. (A
    rank above some layers' only, like a one-output gate under all-linear, is PEFT's
    behaviour: allowed.)"""
    sizes = {
        name: min(layer_features(module))
        for name in modules
        if is_linear_like(module := _submodule(model, name))
    }
    if sizes and cfg.rank > (most := max(sizes.values())):
        name = max(sizes, key=sizes.get)
        raise LorakitError(
            f"--rank {cfg.rank} is larger than every target layer's smaller dimension (at most "
            f"{most}, {name}); use --rank {most} or less"
        )


def check_fits_model(cfg: TrainConfig, model: nn.Module, tokenizer: object) -> None:
    """Refuse settings this model cannot take, before any data is packed: a --seq-len beyond
    its context (position embeddings past it do not exist, or were never trained); and a model
    without its tokenizer, or already carrying adapters (they would be trained too)."""
    if tokenizer is None:
        raise LorakitError("train: pass the model's tokenizer with it (load_model returns both)")
    present = adapter_names(model)
    if present:
        raise LorakitError(
            f"the model already carries adapter(s) {', '.join(present)} (an earlier train or "
            "load_adapter), which would be trained along with the new one; train a freshly "
            "loaded model"
        )
    limit = context_length(model)
    if limit is not None and cfg.seq_len > limit:
        raise LorakitError(
            f"--seq-len {cfg.seq_len} exceeds the model's context of {limit} tokens; "
            f"use --seq-len {limit} or less"
        )
