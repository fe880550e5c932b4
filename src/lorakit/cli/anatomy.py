"""`lorakit inspect`: the model's anatomy."""

from __future__ import annotations

import argparse
import json

from lorakit.lora.anatomy import anatomy, format_anatomy
from lorakit.models.loading import empty_model, load_config, resolve_model


def cmd_inspect(args: argparse.Namespace) -> None:
    source = resolve_model(args.model, weights=False)
    model = empty_model(load_config(source))
    report = anatomy(model, rank=args.rank, spec=args.targets)
    report["model"] = source.name
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_anatomy(report, title=source.name))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="the model's anatomy: modules, shapes, LoRA targets, sizes")
    p.add_argument("model", nargs="?", default="smollm2", help="HF dir, .gguf file or alias")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the size estimate")
    p.add_argument(
        "--targets", default=None, help="default, all-linear, names (q_proj,v_proj) or re:REGEX"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)
