"""`lorakit eval`: loss and perplexity of the base and of each adapter on the same data."""

from __future__ import annotations

import argparse
import json
import math

from lorakit.cli.common import add_model_flags, load_with_adapters
from lorakit.errors import LorakitError
from lorakit.lora.layer import set_active_adapters
from lorakit.models.loading import context_length
from lorakit.models.precision import default_dtype
from lorakit.training import data as D
from lorakit.training.loss import CHUNK, evaluate
from lorakit.training.packing import dataset_batches, keeps_examples_apart

DEFAULT_SEQ_LEN = 512


def cmd_eval(args: argparse.Namespace) -> None:
    if args.seq_len is not None and args.seq_len < D.MIN_SEQ_LEN:
        raise LorakitError(f"--seq-len {args.seq_len} is too small; use at least {D.MIN_SEQ_LEN}")
    if args.batch_size <= 0:
        raise LorakitError(f"--batch-size must be positive, got {args.batch_size}")
    if args.data:
        examples = list(D.load_examples(args.data, args.skip_bad_lines))
    else:
        examples = D.split_examples(D.load_examples(D.default_dataset_path()))[1]
    model, tokenizer, source, names = load_with_adapters(args)
    limit = context_length(model)
    seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    if limit is not None and seq_len > limit:
        raise LorakitError(
            f"--seq-len {seq_len} exceeds the model's context of {limit} tokens; "
            f"use --seq-len {limit} or less"
        )
    dtype = default_dtype(model.device)
    packed = keeps_examples_apart(model, model.device, dtype)
    batches = dataset_batches(examples, tokenizer, seq_len, args.batch_size, dtype, packed)
    rows = []
    for name in [None, *names]:
        set_active_adapters(model, [name] if name else [])
        loss = evaluate(model, batches, model.device, dtype, CHUNK)
        rows.append(
            {
                "model": name or f"base ({source.name})",
                "loss": loss,
                "perplexity": math.exp(loss) if loss is not None else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  {'loss':>8}  {'perplexity':>10}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.2f}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of the base and each adapter")
    add_model_flags(p)
    p.add_argument("--data", help="JSONL/TXT file (default: the embedded data's eval split)")
    p.add_argument(
        "--seq-len", type=int, help="tokens per packed sequence (default 512, or the context)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
