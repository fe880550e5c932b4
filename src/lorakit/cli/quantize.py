"""`lorakit quantize`: write a model once in NF4 (bitsandbytes' 4-bit format) so that every later
command, and transformers + bitsandbytes, loads 4 bits instead of quantizing 16."""

from __future__ import annotations

import argparse
import time

from lorakit.errors import LorakitError
from lorakit.kernels.bnb_nf4 import BLOCKSIZES
from lorakit.models.checkpoint import checkpoint_files
from lorakit.models.loading import resolve_model
from lorakit.models.quantized import quantize_model


def cmd_quantize(args: argparse.Namespace) -> None:
    if args.blocksize not in BLOCKSIZES:
        raise LorakitError(
            f"--blocksize {args.blocksize}: bitsandbytes reads 64, 128, ... 4096 (a power of 2)"
        )
    source = resolve_model(args.model)
    if source.kind == "hf":
        before = sum(f.stat().st_size for f in checkpoint_files(source.path))
    else:
        before = source.path.stat().st_size
    start = time.perf_counter()
    out = quantize_model(args.model, args.out, blocksize=args.blocksize, progress=True)
    after = sum(f.stat().st_size for f in checkpoint_files(out))
    print(
        f"wrote {out}: NF4 in bitsandbytes' 4-bit format, {after / 2**20:,.1f} MiB "
        f"(the source: {before / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s; "
        f"use it with --model {out}, or AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write the model once in NF4 (transformers + bitsandbytes' 4-bit format)",
    )
    p.add_argument("model", nargs="?", default="smollm2", help="HF dir, .gguf file or alias")
    p.add_argument("--out", required=True, help="new directory for the NF4 model")
    p.add_argument("--blocksize", type=int, default=64, help="values per NF4 scale (64)")
    p.set_defaults(func=cmd_quantize)
