"""Fold an adapter into a full-precision copy of its base and save a plain transformers model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import check_new_dir
from lorakit.errors import LorakitError
from lorakit.lora.layer import is_conv1d, merge_lora
from lorakit.lora.peft_format import load_adapter, read_adapter
from lorakit.models.loading import load_model, quantizable_modules
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4


def merge_into_base(
    model_spec: str,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    quant: str = "none",
    device: str | torch.device = "cpu",
) -> Path:
    """Load the base in fp32 (on `device`), add the adapter into its weights, save it to `out`.

    quant="nf4" first rounds every quantizable weight through NF4 and back: the base exactly as
    QLoRA trained the adapter against it, rather than the original weights (always so for a
    LoftQ adapter: `merge_quant`). Never re-quantized:
    the merged weights stay in float32. The directory is written to a temporary sibling and
    renamed, so it is never half-written.
    """
    if quant not in ("nf4", "none"):
        raise LorakitError(f"unknown quantization {quant!r}; use nf4 or none")
    out = Path(out)
    check_new_dir(out, "--out")  # before the slow load: a file, a full or unwritable place
    quant = merge_quant(adapter, quant)
    model, tokenizer, _ = load_model(model_spec, quant="none", dtype=torch.float32, device=device)
    if quant == "nf4":
        round_trip_nf4(model)
    load_adapter(model, adapter, name="merge")
    merge_lora(model, "merge", unload=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise LorakitError(
            f"cannot write into {out.parent} ({e.strerror or e}); choose a writable --out"
        ) from None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(
            f"could not write {out}: {e.strerror or e}; free some disk space"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merge_quant(adapter: str | os.PathLike, quant: str, say: bool = True) -> str:
    """The base to merge into: "nf4" for a LoftQ adapter whatever was asked (it holds the
    NF4 base's error, which the 16-bit weights do not have: merged into them it would count
    twice), with a note saying so (`say`); else `quant`."""
    if quant != "nf4" and read_adapter(adapter)[0].init == "loftq":
        if say:
            print(
                f"note: {adapter} is a LoftQ adapter, started from the NF4 base's quantization "
                "error: merging it into the dequantized NF4 weights (--quant nf4), not the "
                "16-bit ones"
            )
        return "nf4"
    return quant


@torch.no_grad()
def round_trip_nf4(model: nn.Module, blocksize: int = 64) -> None:
    """Replace each weight `load_model(quant="nf4")` would quantize by its NF4 round trip,
    quantized in the same orientation (Conv1D's transposed), so the values are bit for bit
    what the 4-bit base computes with."""
    for name in quantizable_modules(model):
        weight = model.get_submodule(name).weight
        flip = is_conv1d(model.get_submodule(name))
        source = weight.T if flip else weight
        rounded = dequantize_nf4(quantize_nf4(source, blocksize), torch.float32)
        weight.copy_(rounded.T if flip else rounded)
