"""What several commands share: the --model/--adapter and sampling flags, loading a model with
its adapters, and one-line warnings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.sampling import Sampling
from lorakit.lora.peft_format import load_adapter
from lorakit.models.loading import ModelSource, load_model
from lorakit.models.precision import resolve_device


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def add_model_flags(p: argparse.ArgumentParser, adapters: bool = True, quant: str = "nf4") -> None:
    """--model, --adapter (unless adapters=False), --device and --quant (default `quant`)."""
    p.add_argument("--model", default="smollm2", help="HF dir, .gguf file or alias")
    if adapters:
        p.add_argument("--adapter", action="append", help="adapter DIR or NAME=DIR (repeatable)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default): a CUDA GPU if one is visible, else the CPU",
    )
    p.add_argument(
        "--quant",
        choices=["nf4", "none"],
        default=quant,
        help=f"nf4: the base in 4 bits, as QLoRA trains it; none: full precision (default {quant})",
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def sampling(args: argparse.Namespace) -> Sampling:
    s = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop or ()),
        seed=args.seed,
    )
    s.validate()
    return s


def adapter_spec(spec: str) -> tuple[str, str]:
    """(name, dir) from an --adapter value: NAME=DIR, or DIR named after its folder (a '.' in
    the folder's name becomes '_': adapter names cannot hold one)."""
    if "=" in spec:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise LorakitError(f"--adapter {spec!r}: give NAME=DIR (both non-empty) or DIR")
        return name, path
    return Path(spec).resolve().name.replace(".", "_"), spec


def load_with_adapters(args: argparse.Namespace) -> tuple[nn.Module, Any, ModelSource, list[str]]:
    """The base model (--model, --quant, on --device) plus each --adapter (NAME=DIR or DIR,
    named after its folder)."""
    specs = [adapter_spec(spec) for spec in args.adapter or []]
    device = resolve_device(args.device)  # before the slow model load, as the adapters
    for _, path in specs:
        if not Path(path).is_dir():
            raise LorakitError(f"adapter directory {path} not found")
    model, tokenizer, source = load_model(args.model, quant=args.quant, device=device)
    names = []
    for name, path in specs:
        config = load_adapter(model, path, name=name)
        if config.base_model and config.base_model != source.name:
            warn(f"adapter {name} was trained on {config.base_model}, not {source.name}")
        if config.init == "loftq" and args.quant != "nf4":
            warn(
                f"adapter {name} is a LoftQ adapter, made for the NF4 base: on this 16-bit base "
                "it corrects an error the base does not have; use --quant nf4"
            )
        names.append(name)
    return model, tokenizer, source, names
