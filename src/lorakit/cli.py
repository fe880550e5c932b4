"""The `lorakit` command line: argparse subcommands that call the modules, no logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import sys

from lorakit.errors import LorakitError


def cmd_inspect(args: argparse.Namespace) -> None:
    from lorakit.loading import empty_model, load_config, resolve_model
    from lorakit.targets import anatomy, format_anatomy

    source = resolve_model(args.model)
    model = empty_model(load_config(source))
    report = anatomy(model, rank=args.rank, spec=args.targets)
    report["model"] = source.name
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_anatomy(report, title=source.name))


def read_config_file(path: str) -> dict:
    """Settings from a TOML or YAML file (the same keys as the flags, with _ for -)."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise LorakitError(f"config file {path} not found")
    try:
        if file.suffix == ".toml":
            import tomllib

            return tomllib.loads(file.read_text())
        if file.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(file.read_text()) or {}
    except Exception as e:  # tomllib / yaml parse errors: report, no traceback
        raise LorakitError(f"config file {path} is not valid: {e}") from None
    raise LorakitError(f"config file {path}: use a .toml, .yaml or .yml file")


# `lorakit train` on the embedded data, without --steps/--epochs/--lr: a few minutes on 2 cores.
DEMO_PRESET = {"steps": 30, "lr": 1e-3}


def train_config(args: argparse.Namespace):
    """Defaults < --config file < flags given on the command line."""
    from lorakit.train import TrainConfig

    keys = TrainConfig.keys()
    settings = read_config_file(args.config) if args.config else {}
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise LorakitError(
            f"unknown setting(s) {', '.join(unknown)} in {args.config}; valid: "
            + ", ".join(k for k in keys if k != "extra")
        )
    settings.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    if settings.get("data") is None and not {"steps", "epochs", "lr"} & settings.keys():
        settings.update(DEMO_PRESET)  # the embedded data: a quick demo, not a full epoch
    try:
        return TrainConfig(**settings)
    except TypeError as e:
        raise LorakitError(f"bad setting: {e}") from None


def print_samples(result, samples: list[dict]) -> None:
    for i, s in enumerate(samples, 1):
        print(f"\n[{i}] {s['prompt']}")
        print(f"  base : {s['base']}")
        print(f"  tuned: {s['tuned']}")
        print(f"  ref  : {s['reference']}")


def cmd_train(args: argparse.Namespace) -> None:
    from lorakit.train import run_training

    cfg = train_config(args)
    result, samples = run_training(cfg, samples=args.samples)
    if samples:
        print("\nAnswers to held-out prompts, before and after training (greedy):")
        print_samples(result, samples)
    state = "interrupted; resume with --resume" if result.interrupted else "done"
    before = f"{result.first_eval_loss:.3f}" if result.first_eval_loss is not None else "n/a"
    after = f"{result.final_eval_loss:.3f}" if result.final_eval_loss is not None else "n/a"
    print(
        f"\n{state}: {result.steps} steps, {result.wall_s:.0f}s, {result.tokens_per_s:.0f} tok/s; "
        f"eval loss {before} -> {after}; adapter {result.adapter_mb:.1f} MB in {result.out}/"
    )
    if result.interrupted:
        raise KeyboardInterrupt


def _adapter_spec(spec: str) -> tuple[str, str]:
    """(name, dir) from an --adapter value: NAME=DIR, or DIR named after its folder."""
    from pathlib import Path

    name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
    return name, path


def _load_with_adapters(args: argparse.Namespace, quant: str = "nf4"):
    """The base model plus each --adapter (NAME=DIR or DIR, named after its folder)."""
    from lorakit.adapters import load_adapter
    from lorakit.loading import load_model

    model, tokenizer, source = load_model(args.model, quant=quant)
    names = []
    for spec in args.adapter or []:
        name, path = _adapter_spec(spec)
        config = load_adapter(model, path, name=name)
        if config.base_model and config.base_model != source.name:
            print(
                f"warning: adapter {name} was trained on {config.base_model}, not {source.name}",
                file=sys.stderr,
            )
        names.append(name)
    return model, tokenizer, source, names


def _sampling(args: argparse.Namespace):
    from lorakit.generate import Sampling

    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop or ()),
        seed=args.seed,
    )


def _reply(model, tokenizer, messages: list[dict], sampling, stream: bool) -> str:
    from lorakit.data import encode_prompt
    from lorakit.generate import generate_ids
    from lorakit.loss import autocast

    prompt = encode_prompt(messages, tokenizer)
    streamed: list[int] = []
    printed = ""

    def on_token(row: int, token: int) -> None:
        nonlocal printed
        streamed.append(token)
        text = tokenizer.decode(streamed, skip_special_tokens=True)
        print(text[len(printed) :], end="", flush=True)
        printed = text

    with autocast(model.device, model.dtype):
        ids = generate_ids(
            model,
            [prompt],
            sampling,
            eos_ids=[tokenizer.eos_token_id],
            pad_id=tokenizer.pad_token_id or 0,
            decode=lambda x: tokenizer.decode(x, skip_special_tokens=True),
            on_token=on_token if stream else None,
        )[0]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stream:
        print(text[len(printed) :])
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    from lorakit.lora import set_active_adapters

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LorakitError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    model, tokenizer, _, names = _load_with_adapters(args)
    set_active_adapters(model, names)
    messages = [{"role": "user", "content": prompt.strip()}]
    if args.raw:
        from lorakit.generate import generate_ids

        ids = generate_ids(
            model, [tokenizer.encode(prompt)], _sampling(args), eos_ids=[tokenizer.eos_token_id]
        )[0]
        print(tokenizer.decode(ids, skip_special_tokens=True))
        return
    _reply(model, tokenizer, messages, _sampling(args), stream=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from lorakit.lora import set_active_adapters

    model, tokenizer, source, names = _load_with_adapters(args)
    set_active_adapters(model, names)
    who = f"{source.name}" + (f" + {', '.join(names)}" if names else "")
    print(f"chatting with {who}; empty line or Ctrl-D to quit, /reset to forget the history")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line:
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        history.append(
            {
                "role": "assistant",
                "content": _reply(model, tokenizer, history, _sampling(args), stream=True),
            }
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from lorakit import data as D
    from lorakit.loading import default_dtype
    from lorakit.lora import set_active_adapters
    from lorakit.loss import CHUNK, dataset_batches, evaluate

    if args.data:
        examples = list(D.load_examples(args.data, args.skip_bad_lines))
    else:
        examples = D.split_examples(D.load_examples(D.default_dataset_path()))[1]
    model, tokenizer, source, names = _load_with_adapters(args, quant=args.quant)
    dtype = default_dtype(model.device)
    batches = dataset_batches(examples, tokenizer, args.seq_len, args.batch_size, dtype)
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


def cmd_merge(args: argparse.Namespace) -> None:
    from lorakit.adapters import combine_adapters, merge_into_base

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
    merge_into_base(args.model, args.adapter[0], args.out)
    print(f"merged {args.adapter[0]} into {args.model}: a transformers model in {args.out}")


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


def cmd_adapters(args: argparse.Namespace) -> None:
    from lorakit.adapters import adapter_library

    rows = adapter_library(args.folder, base=args.model)
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
            print(f"warning: {r['warning']}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    try:
        import uvicorn

        from lorakit import serve
    except ImportError as e:
        raise LorakitError(
            f"lorakit serve needs FastAPI and uvicorn ({e}); pip install 'lorakit[serve]'"
        ) from None
    from lorakit.engine import Engine
    from lorakit.loading import load_model

    if not 0 <= args.port <= 65535:
        raise LorakitError(f"--port {args.port} is not a port number (0-65535)")
    for flag in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) <= 0:
            raise LorakitError(f"--{flag.replace('_', '-')} must be positive")
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    adapters = [_adapter_spec(spec) for spec in args.adapter or []]
    for adapter, path in adapters:
        if not serve.ADAPTER_NAME.match(adapter):
            raise LorakitError(f"adapter name {adapter!r}: use letters, digits, '.', '_', '-'")
        if not Path(path).is_dir():
            raise LorakitError(f"adapter directory {path} not found")
    for folder in args.adapter_dir or []:
        if not Path(folder).is_dir():
            raise LorakitError(f"--adapter-dir {folder} is not a directory")
    dirs = [Path(p).resolve().parent for _, p in adapters] + (args.adapter_dir or [])

    model, tokenizer, source = load_model(args.model)
    name = args.served_name or source.name
    if name in {a for a, _ in adapters}:
        raise LorakitError(f"{name!r} names both the base and an adapter; rename one")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = Engine(model, eos, tokenizer.pad_token_id or 0, args.max_batch, args.max_queue)
    for adapter, path in adapters:
        config = engine.load_adapter(adapter, path).result()
        if config.base_model and config.base_model != source.name:
            print(f"warning: adapter {adapter} was trained on {config.base_model}", file=sys.stderr)
    app = serve.create_app(engine, tokenizer, name, dirs, api_key, args.max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    models = ", ".join([name, *(a for a, _ in adapters)])
    print(f"serving {models} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="HF dir, .gguf file or alias")
    p.add_argument("--adapter", action="append", help="adapter DIR or NAME=DIR (repeatable)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    _add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="QLoRA fine-tuning on the hardware you already have."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="the model's anatomy: modules, shapes, LoRA targets, sizes")
    p.add_argument("model", nargs="?", default="smollm2", help="HF dir, .gguf file or alias")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the size estimate")
    p.add_argument(
        "--targets", default=None, help="default, all-linear, names (q_proj,v_proj) or re:REGEX"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="QLoRA fine-tuning (no arguments: default model and data)")
    t = p.add_argument
    t("--config", help="TOML or YAML file with the same settings as the flags")
    t("--model", help="HF dir, .gguf file or alias (default: smollm2, the embedded default)")
    t("--data", help="JSONL (text, instruction or chat) or .txt; default: embedded Jargon File")
    t("--eval-data", help="held-out file (default: a fixed split of --data)")
    t("--out", help="output directory (default: lorakit-out)")
    t("--quant", choices=["nf4", "none"], help="nf4 = QLoRA (default); none = plain LoRA")
    t("--rank", type=int, help="LoRA rank (default 16)")
    t("--alpha", type=float, help="LoRA alpha (default 32)")
    t("--dropout", type=float, help="LoRA dropout (default 0)")
    t("--use-rslora", action="store_true", default=None, help="rank-stabilised LoRA scaling")
    t("--targets", help="default, all-linear, names (q_proj,v_proj) or re:REGEX")
    t("--steps", type=int, help="optimizer steps (default: --epochs; 30 on the embedded data)")
    t("--epochs", type=float, help="passes over the data when --steps is not given (default 1)")
    t("--batch-size", type=int, help="packed sequences per batch (default 4)")
    t("--grad-accum", type=int, help="batches per optimizer step (default 1)")
    t(
        "--micro-batch",
        type=int,
        help="sequences per pass (default 0: auto; on CPU ~2048 tokens for a model of hidden "
        "size < 1024, else 1; on GPU the whole batch)",
    )
    t("--seq-len", type=int, help="tokens per packed sequence (default 512)")
    t("--lr", type=float, help="peak learning rate (default 2e-4; 1e-3 for the 30-step demo)")
    t("--warmup", type=float, help="warmup steps, or a fraction of all steps if < 1")
    t("--eval-every", type=int, help="steps between eval losses (default: start and end)")
    t("--save-every", type=int, help="steps between checkpoints (default 50)")
    t("--seed", type=int, help="random seed (default 0)")
    t("--grad-checkpointing", choices=["auto", "on", "off"], help="default auto")
    t(
        "--cache-weights",
        choices=["auto", "on", "off"],
        help="keep the 4-bit base dequantized during the run: faster, costs its bf16 size "
        "(default auto: on when that is under 1/8 of free memory)",
    )
    t("--train-on-prompt", action="store_true", default=None, help="loss on prompt tokens too")
    t("--skip-bad-lines", action="store_true", default=None, help="skip malformed data lines")
    t("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t("--resume", action="store_true", default=None, help="continue the run in --out")
    t("--overwrite", action="store_true", default=None, help="replace the run in --out")
    t("--samples", type=int, default=3, help="held-out prompts answered before/after (0: none)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer one prompt (--prompt or stdin), streamed")
    _add_sampling_flags(p)
    p.add_argument("--prompt", help="the prompt (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="continue the text; no chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history")
    _add_sampling_flags(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="loss and perplexity of the base and each adapter")
    _add_model_flags(p)
    p.add_argument("--data", help="JSONL/TXT file (default: the embedded data's eval split)")
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold an adapter into the base, or combine adapters")
    p.add_argument("--model", default="smollm2", help="base model (merge into it)")
    p.add_argument("--adapter", action="append", help="adapter DIR (repeat to combine)")
    p.add_argument("--weights", help="combine: comma-separated weights, one per adapter")
    p.add_argument("--combine", action="store_true", help="combine adapters (equal weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: one base, many adapters chosen per request",
        description="Serve the base and its adapters over OpenAI's API (/v1/models, "
        "/v1/completions, /v1/chat/completions); a request's `model` names the base or an "
        "adapter. POST /v1/adapters {name, path} and DELETE /v1/adapters/NAME load and unload "
        "adapters while serving, from the allowed directories only: the parent folders of the "
        "--adapter directories and every --adapter-dir.",
    )
    _add_model_flags(p)
    p.add_argument("--adapter-dir", action="append", help="folder adapters may be loaded from")
    p.add_argument("--served-name", help="the base's name in the API (default: the model's)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or LORAKIT_API_KEY)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="most new tokens a request may ask for (default 1024)",
    )
    p.add_argument(
        "--max-batch", type=int, default=32, help="most requests decoded together (default 32)"
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("adapters", help="the adapters in a folder: base, rank, size, metrics")
    p.add_argument("folder", nargs="?", default=".", help="folder to scan (default: .)")
    p.add_argument("--model", help="warn about adapters trained on another base")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
