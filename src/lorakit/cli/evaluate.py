"""`lorakit eval`: loss and perplexity of the base and of each adapter on the same data; with
`--generate` also their answers' exact match and label accuracy (inference.task_metrics)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from lorakit.cli.common import add_model_flags, load_with_adapters
from lorakit.errors import LorakitError
from lorakit.inference import task_metrics as T
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
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise LorakitError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.data:
        examples = list(D.load_examples(args.data, args.skip_bad_lines))
    else:
        examples = D.split_examples(D.load_examples(D.default_dataset_path()))[1]
    items = T.questions(examples) if args.generate else []
    if args.generate and not items:  # before the slow load
        raise LorakitError(
            "--generate answers instructions or chats, and the data has none (plain text "
            "only); drop --generate"
        )
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
    references = [reference for _, reference in items]
    new_tokens = args.max_new_tokens or T.answer_length(tokenizer, references)
    rows = []
    for name in [None, *names]:
        set_active_adapters(model, [name] if name else [])
        loss = evaluate(model, batches, model.device, dtype, CHUNK)
        row = {
            "model": name or f"base ({source.name})",
            "loss": loss,
            "perplexity": math.exp(loss) if loss is not None else None,
        }
        if items:
            answers = T.answer_all(model, tokenizer, items, name, new_tokens)
            row.update(dataclasses.asdict(T.score(answers, references)))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    width = max(len(r["model"]) for r in rows)
    labels = rows[0].get("accuracy") is not None
    head = f"{'model':<{width}}  {'loss':>8}  {'perplexity':>10}"
    if "exact_match" in rows[0]:
        head += f"  {'exact match':>11}" + (f"  {'accuracy':>8}" if labels else "")
    print(head)
    for r in rows:
        line = f"{r['model']:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.2f}"
        if "exact_match" in r:
            line += f"  {r['exact_match']:>11.3f}" + (f"  {r['accuracy']:>8.3f}" if labels else "")
        print(line)
    if "exact_match" in rows[0]:
        print(f"\n{rows[0]['answered']} held-out instructions answered greedily")
    for r in rows if labels else []:
        columns = list(next(iter(r["confusion"].values())))
        cell = max(8, *(len(c) for c in columns))
        print(f"\n{r['model']}: reference label (rows) x answered label (columns)")
        print(" " * cell + "".join(f"  {c:>{cell}}" for c in columns))
        for ref, counts in r["confusion"].items():
            print(f"{ref:<{cell}}" + "".join(f"  {counts[c]:>{cell}}" for c in columns))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="loss and perplexity of the base and each adapter (--generate: task metrics)"
    )
    add_model_flags(p)
    p.add_argument("--data", help="JSONL/TXT file (default: the embedded data's eval split)")
    p.add_argument(
        "--seq-len", type=int, help="tokens per packed sequence (default 512, or the context)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument(
        "--generate",
        action="store_true",
        help="also answer each instruction of the data greedily: exact match, and accuracy with "
        "a confusion table where the answers are a few labels",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="--generate: the longest answer (default: the longest reference + 16, at most 256)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
