"""`lorakit quantize`: a model written once in NF4, in the format transformers + bitsandbytes
save a 4-bit model in (quant/bnb_format.py), so that every later load reads 4 bits instead of
quantizing 16, and `AutoModelForCausalLM.from_pretrained(DIR)` with bitsandbytes loads it too.

The source is read one tensor at a time (models/checkpoint.py, or a GGUF file), each linear
layer's weight quantized as `load_model` would and written in shards of at most `shard_bytes`:
memory holds one shard and one tensor in full precision, never the model. Mixture-of-experts'
fused expert weights stay 16-bit (bitsandbytes quantizes only linear layers); lorakit quantizes
them as it loads. Everything is written in a hidden folder beside `out`, which is renamed to
`out` only when complete: a failed run (a full disk, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import atomic_dir, check_new_dir
from lorakit.errors import LorakitError
from lorakit.kernels import nf4_backend
from lorakit.lora.layer import is_conv1d, is_linear_like
from lorakit.models.checkpoint import INDEX, SAFETENSORS_DTYPES
from lorakit.models.loading import (
    empty_model,
    load_config,
    load_tokenizer,
    quantizable_modules,
    read_tensors,
    resolve_model,
)
from lorakit.quant.bnb_format import is_prequantized, quantization_config, state_tensors

SHARD_BYTES = 2 * 2**30
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """One safetensors file, written tensor by tensor (safetensors' own `save_file` first
    copies every tensor into one bytes object: twice the memory)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows padding; aligned data reads faster
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Tensors added one by one, written in files of at most `shard_bytes` (one tensor larger
    than that gets a file of its own), named and indexed as transformers names them."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        path = self.directory / f".shard-{len(self.shards)}"
        write_safetensors(path, self.pending)
        self.shards.append((path, [name for name, _ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        """Write what is pending, give the shards their final names, and the index if more
        than one."""
        if self.pending or not self.shards:
            self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map |= dict.fromkeys(names, final)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_quantized(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: Path,
    blocksize: int = 64,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = False,
) -> None:
    """Write `tensors` (names as in `model`, built on meta) into `directory`: the linear layers'
    weights NF4-quantized in bitsandbytes' format, the rest in the config's dtype (bfloat16 if
    it names none); then config.json with its `quantization_config`."""
    from tqdm.auto import tqdm

    config = model.config
    dtype = getattr(config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16
    quantize = quantizable_modules(model)
    params = model.state_dict(keep_vars=True)
    owner: dict[int, str] = {}  # tied parameters are written once, under their first name
    for name, param in params.items():
        owner.setdefault(id(param), name)
    needed = {name for name, param in model.named_parameters() if owner[id(param)] == name}
    writer = ShardWriter(directory, shard_bytes)
    for name, tensor in tqdm(tensors, total=len(needed), desc="quantize", disable=not progress):
        if name not in params or owner[id(params[name])] != name:
            continue
        module_name, _, attr = name.rpartition(".")
        if module_name in quantize and attr == "weight":
            weight = tensor.T if is_conv1d(model.get_submodule(module_name)) else tensor
            state = nf4_backend.quantize(weight, blocksize)
            for suffix, part in state_tensors(state).items():
                writer.add(f"{name}.{suffix}" if suffix else name, part)
        else:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        needed.discard(name)
    if needed:
        raise LorakitError(
            f"the source lacks {len(needed)} weight(s) the {config.model_type} model needs "
            f"(first: {sorted(needed)[0]}); is it a complete checkpoint?"
        )
    writer.close()
    skip = [n for n, m in model.named_modules() if is_linear_like(m) and n not in quantize]
    config.quantization_config = quantization_config(dtype, skip)
    config.dtype = dtype
    config.save_pretrained(directory)


def quantize_model(
    spec: str | os.PathLike | None,
    out: str | os.PathLike,
    blocksize: int = 64,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """`lorakit quantize`: the model `spec` (a directory, a GGUF file, an alias) written to the
    new directory `out` in NF4, with its tokenizer and generation config."""
    out = Path(out)
    check_new_dir(out)
    source = resolve_model(spec)
    config = load_config(source)
    if is_prequantized(config, source.path):
        raise LorakitError(f"{source.path} is already NF4 (bitsandbytes 4-bit); use it as it is")
    model = empty_model(config)
    tokenizer = load_tokenizer(source)  # before the slow part: a missing tokenizer fails now

    def write(directory: Path) -> None:
        write_quantized(
            model, read_tensors(source, model), directory, blocksize, shard_bytes, progress
        )
        tokenizer.save_pretrained(directory)
        if source.kind == "hf" and (source.path / "generation_config.json").is_file():
            shutil.copy(source.path / "generation_config.json", directory)

    atomic_dir(out, write)
    return out
