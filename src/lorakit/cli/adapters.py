"""`lorakit merge` and `lorakit adapters`: adapters as files (fold into a base, combine, list)."""

from __future__ import annotations

import argparse
import json
import math

from lorakit.cli.common import add_model_flags, warn
from lorakit.errors import LorakitError
from lorakit.lora.combine import combine_adapters
from lorakit.lora.library import adapter_library
from lorakit.models.loading import resolve_model
from lorakit.models.merge import merge_into_base, merge_quant
from lorakit.models.precision import resolve_device


def cmd_merge(args: argparse.Namespace) -> None:
    if not args.adapter:
        raise LorakitError("give at least one --adapter DIR")
    if args.combine or args.weights:
        config = combine_adapters(args.adapter, _weights(args.weights, len(args.adapter)), args.out)
        print(f"combined {len(args.adapter)} adapters into {args.out} (rank {config.rank})")
        return
    if len(args.adapter) > 1:
        raise LorakitError(
            "merge folds one adapter into the base; to combine several into one "
            "adapter add --weights W1,W2,..."
        )
    device = resolve_device(args.device)
    merge_into_base(args.model, args.adapter[0], args.out, args.quant, device)  # says if LoftQ
    quant = merge_quant(args.adapter[0], args.quant, say=False)
    base = "its NF4-rounded base" if quant == "nf4" else args.model
    print(f"merged {args.adapter[0]} into {base}: a transformers model in {args.out}")


def _weights(text: str | None, n: int) -> list[float]:
    if not text:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise LorakitError(f"--weights {text!r}: give numbers separated by commas") from None
    if len(weights) != n:
        raise LorakitError(f"--weights has {len(weights)} numbers for {n} adapters")
    if not all(math.isfinite(w) for w in weights) or sum(abs(w) for w in weights) == 0:
        raise LorakitError(f"--weights {text!r} must be finite and not all zero")
    return weights


def _base_name(spec: str | None) -> str | None:
    """The name adapters record for the model `spec` names (an alias resolved), or spec."""
    if spec is None:
        return None
    try:
        return resolve_model(spec).name
    except LorakitError:  # not on this machine: compare the name as given
        return spec


def cmd_adapters(args: argparse.Namespace) -> None:
    rows = adapter_library(args.folder, base=_base_name(args.model))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no adapters under {args.folder}")
        return
    head = ("name", "base model", "rank", "targets", "MB", "steps", "eval loss")
    table = [head] + [
        (
            r["name"],
            r["base_model"] or "?",
            str(r["rank"]),
            r["targets"],
            f"{r['size_mb']:.1f}",
            str(r["steps"] or ""),
            f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r.get("warning"):
            warn(r["warning"])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into the base, or combine adapters")
    add_model_flags(p, adapters=False, quant="none")
    p.add_argument("--adapter", action="append", help="adapter DIR (repeat to combine)")
    p.add_argument("--weights", help="combine: comma-separated weights, one per adapter")
    p.add_argument("--combine", action="store_true", help="combine adapters (equal weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("adapters", help="the adapters in a folder: base, rank, size, metrics")
    p.add_argument("folder", nargs="?", default=".", help="folder to scan (default: .)")
    p.add_argument("--model", help="warn about adapters trained on another base")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters)
