"""`lorakit plan`: memory and time for a run, from the model's config alone."""

from __future__ import annotations

import argparse
import json

from lorakit.errors import LorakitError
from lorakit.models.loading import context_length, empty_model, load_config, resolve_model
from lorakit.models.precision import default_dtype, resolve_device
from lorakit.training import memory
from lorakit.training.config import TrainConfig, parse_size, validate
from lorakit.training.plan import format_plan, make_plan


def cmd_plan(args: argparse.Namespace) -> None:
    known = set(TrainConfig.keys()) - {"model"}
    settings = {k: v for k, v in vars(args).items() if k in known and v is not None}
    cfg = TrainConfig(model=args.model, **settings)
    validate(cfg)
    device = resolve_device(cfg.device)
    budget = parse_size(args.memory) if args.memory else memory.device_budget(device)
    source = resolve_model(args.model, weights=False)
    model = empty_model(load_config(source))
    limit = context_length(model)
    if limit is not None and cfg.seq_len > limit:
        raise LorakitError(
            f"--seq-len {cfg.seq_len} exceeds the model's context of {limit} tokens; "
            f"use --seq-len {limit} or less"
        )
    dtype = default_dtype(device)
    plan = make_plan(model, cfg, device, dtype, budget, calibrate=not args.no_calibrate)
    plan["model"] = source.name
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan, title=source.name))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="will a run fit, and how long will it take (reads config.json only)"
    )
    p.add_argument("model", nargs="?", default="smollm2", help="HF dir, .gguf file or alias")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--memory", help="memory to plan for, e.g. 16GB (default: what is free now)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sequence (512)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences a step (4)")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, help="sequences a pass")
    p.add_argument("--steps", type=int, help="optimizer steps: the run's time too")
    p.add_argument("--rank", type=int, help="LoRA rank (16)")
    p.add_argument("--targets", help="default, all-linear, names or re:REGEX")
    p.add_argument("--quant", choices=["nf4", "none"], help="base in NF4 (default) or 16-bit")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", choices=["auto", "on", "off"])
    p.add_argument("--cache-weights", dest="cache_weights", choices=["auto", "on", "off"])
    p.add_argument(
        "--no-calibrate", action="store_true", help="skip timing one layer here (no speed estimate)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
