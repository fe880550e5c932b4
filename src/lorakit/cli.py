"""The `lorakit` command line: argparse subcommands that call the modules, no logic of its own."""

from __future__ import annotations

import argparse
import json
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
    t("--dropout", type=float, help="LoRA dropout (default 0.05)")
    t("--use-rslora", action="store_true", default=None, help="rank-stabilised LoRA scaling")
    t("--targets", help="default, all-linear, names (q_proj,v_proj) or re:REGEX")
    t("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    t("--epochs", type=float, help="passes over the data when --steps is not given (default 1)")
    t("--batch-size", type=int, help="packed sequences per micro-batch (default 4)")
    t("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    t("--seq-len", type=int, help="tokens per packed sequence (default 512)")
    t("--lr", type=float, help="peak learning rate (default 2e-4)")
    t("--warmup", type=float, help="warmup steps, or a fraction of all steps if < 1")
    t("--eval-every", type=int, help="steps between eval losses (default: start and end)")
    t("--save-every", type=int, help="steps between checkpoints (default 50)")
    t("--seed", type=int, help="random seed (default 0)")
    t("--grad-checkpointing", choices=["auto", "on", "off"], help="default auto")
    t("--train-on-prompt", action="store_true", default=None, help="loss on prompt tokens too")
    t("--skip-bad-lines", action="store_true", default=None, help="skip malformed data lines")
    t("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t("--resume", action="store_true", default=None, help="continue the run in --out")
    t("--overwrite", action="store_true", default=None, help="replace the run in --out")
    t("--samples", type=int, default=3, help="held-out prompts answered before/after (0: none)")
    p.set_defaults(func=cmd_train)
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
