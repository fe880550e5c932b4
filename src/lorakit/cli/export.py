"""`lorakit export`: an adapter, or a base with it merged in, as a GGUF file for llama.cpp and
Ollama (models.gguf_export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.cli.common import warn
from lorakit.errors import LorakitError
from lorakit.lora.peft_format import read_adapter
from lorakit.models.gguf_export import (
    ADAPTER_TYPES,
    MERGED_TYPES,
    export_adapter,
    export_merged,
)
from lorakit.models.loading import (
    DEFAULT_MODEL,
    DEFAULT_NAME,
    ModelSource,
    load_config,
    resolve_model,
)


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise LorakitError(f"--out {out} is a directory; give a file name such as {out}/x.gguf")
    if out.exists() and not args.overwrite:
        raise LorakitError(f"{out} exists; add --overwrite to replace it, or choose another --out")
    config, _ = read_adapter(args.adapter)
    source = _base(args.model, config.base_model)
    if config.init == "loftq":
        warn(
            "the adapter was trained with --init loftq: it corrects lorakit's 4-bit base, so "
            "on llama.cpp's base its answers may differ from lorakit's"
        )
    if args.merged:
        outtype = args.outtype or "f16"
        if outtype not in MERGED_TYPES:
            raise LorakitError(f"--outtype for --merged: {', '.join(MERGED_TYPES)}")
        if source.kind != "gguf":
            raise LorakitError(
                f"--merged writes the adapter into a GGUF base, and {source.path} is a Hugging "
                f"Face model; run `lorakit merge --model {source.path} --adapter "
                f"{args.adapter} --out DIR`, then llama.cpp's convert_hf_to_gguf.py DIR"
            )
        export_merged(args.adapter, source.path, out, outtype)
        print(f"wrote {out} ({_mb(out)}): {source.path.name} with {args.adapter} merged in")
        print(f"  llama.cpp: llama-cli -m {out}    Ollama Modelfile: FROM {out}")
        return
    outtype = args.outtype or "f32"
    if outtype not in ADAPTER_TYPES:
        raise LorakitError(f"--outtype for an adapter: {', '.join(ADAPTER_TYPES)}")
    names = export_adapter(args.adapter, load_config(source), out, outtype)
    base = source.path if source.kind == "gguf" else "BASE.gguf"
    print(f"wrote {out} ({_mb(out)}): a llama.cpp LoRA adapter over {len(names)} weights")
    print(f"  llama.cpp: llama-cli -m {base} --lora {out}")
    print(f"  Ollama Modelfile: FROM {base}  then  ADAPTER {out}")


def _base(model: str | None, recorded: str | None) -> ModelSource:
    """The base: --model, else the one the adapter records (the embedded default by name)."""
    if model is not None:
        return resolve_model(model, weights=False)
    if recorded in (None, DEFAULT_NAME):
        return resolve_model(DEFAULT_MODEL)
    try:
        return resolve_model(recorded, weights=False)
    except LorakitError:
        raise LorakitError(
            f"the adapter's base {recorded!r} is not on this machine; give it with --model "
            "(a Hugging Face directory, its config.json or a .gguf file)"
        ) from None


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MB"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="an adapter (or a merged model) as GGUF for llama.cpp")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="gguf (llama.cpp, Ollama)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument(
        "--model",
        help="the base (default: the one the adapter records); a .gguf file for --merged",
    )
    p.add_argument(
        "--merged",
        action="store_true",
        help="write the whole base with the adapter merged in (needs a GGUF base)",
    )
    p.add_argument(
        "--outtype",
        help="adapter: f32 (default) or f16; --merged: f16 (default), q8_0 or f32",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
