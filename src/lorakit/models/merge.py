"""Fold an adapter into a full-precision copy of its base and save a plain transformers model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.atomic import check_new_dir
from lorakit.errors import LorakitError
from lorakit.lora.layer import merge_lora
from lorakit.lora.peft_format import load_adapter
from lorakit.models.loading import load_model


def merge_into_base(model_spec: str, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Load the base in fp32, add the adapter into its weights, save it to `out`.

    Never re-quantized: the merged weights stay in float32. The directory is written to a
    temporary sibling and renamed, so it is never half-written.
    """
    out = Path(out)
    check_new_dir(out, "--out")  # before the slow load: a file, a full or unwritable place
    model, tokenizer, _ = load_model(model_spec, quant="none", dtype=torch.float32)
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
