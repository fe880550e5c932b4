"""`lorakit train`: settings from flags and a config file, the run, then the base's and the tuned
model's answers to a few held-out prompts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.generate import generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.models.chat import encode_prompt, pad_id
from lorakit.models.precision import autocast, resolve_device
from lorakit.training import data as D
from lorakit.training.config import TrainConfig, validate
from lorakit.training.distributed import is_main, join, leave
from lorakit.training.rundir import TrainResult, check_out_dir
from lorakit.training.trainer import load_for_training, train

# `lorakit train` on the embedded data, without --steps/--epochs/--lr: a few minutes on 2 cores.
DEMO_PRESET = {"steps": 30, "lr": 1e-3}


def read_config_file(path: str) -> dict:
    """Settings from a TOML or YAML file (the same keys as the flags, with _ for -)."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "not found"
        raise LorakitError(f"config file {path} {what}; give a .toml or .yaml file")
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise LorakitError(f"config file {path}: use a .toml, .yaml or .yml file")
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not a setting
        if file.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except Exception as e:  # tomllib / yaml parse errors: report, no traceback
        # YAML's messages span lines (with a caret under the column): one line here.
        lines = [x.strip() for x in str(e).splitlines() if x.strip().strip("^")]
        raise LorakitError(
            f"config file {path} is not valid: {'; '.join(lines) or type(e).__name__}"
        ) from None


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags given on the command line."""
    keys = TrainConfig.keys()
    settings = read_config_file(args.config) if args.config else {}
    if not isinstance(settings, dict):
        raise LorakitError(f"config file {args.config} must hold key = value settings")
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise LorakitError(
            f"unknown setting(s) {', '.join(unknown)} in {args.config}; valid: "
            + ", ".join(k for k in keys if k != "extra")
        )
    targets = settings.get("targets")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        settings["targets"] = ",".join(targets)  # targets = ["q_proj", "v_proj"] in a file
    settings.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    if settings.get("data") is None and not {"steps", "epochs", "lr"} & settings.keys():
        settings.update(DEMO_PRESET)  # the embedded data: a quick demo, not a full epoch
    try:
        return TrainConfig(**settings)
    except TypeError as e:
        raise LorakitError(f"bad setting: {e}") from None


def held_out_answers(
    model: nn.Module, tokenizer: Any, cfg: TrainConfig, n: int, max_new_tokens: int = 64
) -> list[dict]:
    """Greedy answers of the bare base and of base + adapter to n held-out prompts."""
    if cfg.eval_data:
        eval_ex = list(D.load_examples(cfg.eval_data, cfg.skip_bad_lines))
    else:
        examples = D.load_examples(cfg.data or D.default_dataset_path(), cfg.skip_bad_lines)
        eval_ex = D.split_examples(examples, seed=cfg.seed)[1]
    chats = [
        e["messages"] for e in eval_ex if e.get("messages", [{}])[-1].get("role") == "assistant"
    ][:n]
    if not chats:
        return []
    prompts = [encode_prompt(m[:-1], tokenizer) for m in chats]
    # One batch: the first n rows run the bare base, the next n the adapter.
    rows = [None] * len(prompts) + ["default"] * len(prompts)
    with autocast(model.device, model.dtype):
        ids = generate_ids(
            model,
            prompts * 2,
            Sampling(max_new_tokens=max_new_tokens),
            eos_ids=[tokenizer.eos_token_id],
            pad_id=pad_id(tokenizer),
            adapters=rows,
        )
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    return [
        {
            "prompt": m[-2]["content"],
            "base": texts[i],
            "tuned": texts[len(prompts) + i],
            "reference": _shorten(m[-1]["content"]),
        }
        for i, m in enumerate(chats)
    ]


def _shorten(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def run_training(cfg: TrainConfig, samples: int = 3) -> tuple[TrainResult, list[dict]]:
    """Load, train, then answer held-out prompts before and after."""
    validate(cfg)
    # Refuse a bad --out or data file before the slow model load.
    check_out_dir(cfg)
    D.load_examples(cfg.data or D.default_dataset_path(), cfg.skip_bad_lines)
    if cfg.eval_data:
        D.load_examples(cfg.eval_data, cfg.skip_bad_lines)
    device = resolve_device(cfg.device)
    join(device)  # under torchrun: this rank's GPU chosen before the model goes to one
    model, tokenizer, source = load_for_training(cfg, device)
    result = train(cfg, model, tokenizer, base_name=source.name)
    if result.interrupted or samples <= 0 or not is_main():
        return result, []
    if cfg.shard_base:  # answering would need every rank's shard, one token at a time
        print(
            f"(no sample answers: the base is split over the ranks; run `lorakit generate "
            f"--model {cfg.model} --adapter {cfg.out}` to see the tuned model's answers)"
        )
        return result, []
    with torch.no_grad():
        return result, held_out_answers(model, tokenizer, cfg, samples)


def cmd_train(args: argparse.Namespace) -> None:
    if args.samples < 0:
        raise LorakitError(f"--samples must be >= 0 (0: none), got {args.samples}")
    cfg = train_config(args)
    try:
        result, samples = run_training(cfg, samples=args.samples)
        main = is_main()  # under torchrun rank 0 alone reports
    finally:
        leave()
    if not main:
        return
    if samples:
        print("\nAnswers to held-out prompts, before and after training (greedy):")
        for i, s in enumerate(samples, 1):
            print(f"\n[{i}] {s['prompt']}")
            print(f"  base : {s['base']}")
            print(f"  tuned: {s['tuned']}")
            print(f"  ref  : {s['reference']}")
    state = "interrupted; resume with --resume" if result.interrupted else "done"
    before = f"{result.first_eval_loss:.3f}" if result.first_eval_loss is not None else "n/a"
    after = f"{result.final_eval_loss:.3f}" if result.final_eval_loss is not None else "n/a"
    print(
        f"\n{state}: {result.steps} steps, {result.wall_s:.0f}s, {result.tokens_per_s:.0f} tok/s; "
        f"eval loss {before} -> {after}; adapter {result.adapter_mb:.1f} MB in {result.out}/"
    )
    if result.interrupted:
        raise KeyboardInterrupt


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    t(
        "--init",
        choices=["default", "loftq"],
        help="adapter init: default (PEFT's, B = 0) or loftq (from the SVD of the NF4 base's "
        "error: starts nearer the 16-bit model; reads the 16-bit weights once more)",
    )
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
    t(
        "--schedule",
        choices=["cosine", "linear", "constant"],
        help="learning rate after warmup: cosine (default) or linear decay to 0, or constant",
    )
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
    t(
        "--shard-base",
        action="store_true",
        default=None,
        help="under torchrun: split the 4-bit base over the ranks (FSDP2), for a base bigger "
        "than one device",
    )
    t(
        "--report-to",
        choices=["none", "tensorboard"],
        help="also write the metrics as TensorBoard events in OUT/tensorboard (default none)",
    )
    t("--train-on-prompt", action="store_true", default=None, help="loss on prompt tokens too")
    t("--skip-bad-lines", action="store_true", default=None, help="skip malformed data lines")
    t("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t(
        "--memory",
        help="the most memory the run may use, e.g. 6GB (default: what is free); the auto "
        "settings and the refusal follow it",
    )
    t("--resume", action="store_true", default=None, help="continue the run in --out")
    t("--overwrite", action="store_true", default=None, help="replace the run in --out")
    t("--samples", type=int, default=3, help="held-out prompts answered before/after (0: none)")
    p.set_defaults(func=cmd_train)
