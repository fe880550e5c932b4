"""A Hugging Face checkpoint's tensors under the names the model built by transformers uses.

Checkpoints on the hub are not always in the layout of transformers' current modules: GPT-NeoX
keeps its head as `embed_out`, Mixtral saves each expert's `w1/w2/w3` where transformers 5 holds
all experts of a layer in one fused (experts x out x in) tensor, older files use `gamma/beta`
for norms. transformers converts them in `from_pretrained` with per-model rules
(`conversion_mapping.get_model_conversion_mapping`: renamings, and converters that merge or
split tensors); lorakit applies the same rules, taken from transformers, to tensors read one at
a time, so that loading stays at the size of the quantized model.

Order: plain tensors are yielded in file order as they are read; a converted target (a fused
expert tensor) once all its pieces are in, which holds one target's pieces in memory at a time.
Only safetensors are read. Tensors that are converted (to NF4, to the compute dtype) are read
with plain reads: pages of a mapped file stay resident until the file is closed, so mapping a
2.3 GB checkpoint made the load peak 2 GB higher than the NF4 model it builds. The 4-bit codes
of a checkpoint stored in 4 bits are kept as they are, so they stay in the file: memory-mapped,
read when a layer first runs, and (clean file pages) dropped again by the kernel when memory
runs short, which is how a base bigger than the machine's memory trains, read from disk layer
by layer. A sharded checkpoint's index names its files, each of which must be there.
"""

from __future__ import annotations

import copy
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.bnb_format import PART, state_from_tensors
from lorakit.quant.nf4 import NF4State

# safetensors' dtype names -> torch dtypes (https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    file: Path
    key: str
    start: int  # absolute offset of the first byte in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        data = torch.empty(self.nbytes, dtype=torch.uint8)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(data.numpy()) != self.nbytes:
                raise LorakitError(
                    f"{self.file} is truncated (tensor {self.key}); download it again"
                )
        return data.view(self.dtype).reshape(self.shape)

    def map(self, maps: dict[Path, mmap.mmap]) -> torch.Tensor:
        """The tensor as a view of its file, mapped once per file (`maps`) copy-on-write:
        nothing is read until it is used, and its pages, never written, stay the kernel's to
        drop and read again. The tensor keeps the mapping alive."""
        if self.file not in maps:
            try:
                with open(self.file, "rb") as f:
                    maps[self.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise LorakitError(f"cannot map {self.file} ({e}); is it readable?") from None
        data = torch.frombuffer(
            maps[self.file], dtype=torch.uint8, count=self.nbytes, offset=self.start
        )
        return data.view(self.dtype).reshape(self.shape)


def entries(file: Path) -> list[Entry]:
    """The tensors of one safetensors file, in file order; LorakitError if the header is bad.

    The format is an 8-byte little-endian header length, a JSON header
    {key: {dtype, shape, data_offsets}}, then the tensors' bytes.
    """
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            raw = sorted(
                (int(v["data_offsets"][0]), int(v["data_offsets"][1]), k, v["dtype"], v["shape"])
                for k, v in header.items()
            )
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LorakitError(f"{file} is not a valid safetensors file ({e})") from None
    out = []
    for start, end, key, dtype_name, shape in raw:
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise LorakitError(f"{file}: tensor {key} has unsupported dtype {dtype_name}")
        entry = Entry(file, key, 8 + length + start, dtype, tuple(int(s) for s in shape))
        if start < 0 or end - start != entry.nbytes or 8 + length + end > size:
            raise LorakitError(f"{file} is truncated or corrupt (tensor {key}); download it again")
        out.append(entry)
    return out


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its shard index names (each must
    exist), else every *.safetensors in it."""
    index = directory / INDEX
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LorakitError(f"{index} is not a valid shard index ({e})") from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise LorakitError(
            f"{directory} lacks {len(missing)} of the {len(names)} shards its {INDEX} names "
            f"(first: {missing[0]}); download the missing files"
        )
    return [directory / n for n in names]


def _transforms(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) transformers applies when loading this model (none if this
    transformers predates them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _nf4_state(
    entry: Entry, parts: dict[str, Entry], name: str, expected: tuple, maps: dict
) -> NF4State:
    """A bitsandbytes 4-bit weight as our NF4State, its shape checked against the model's
    (which holds it as (out, in), or (in, out) for GPT-2's Conv1D). The codes stay in the file
    (`Entry.map`); the scales, 1/32 of their size, are read."""
    try:
        read = {part: e.read() for part, e in parts.items()}
        state = state_from_tensors(entry.key, {"": entry.map(maps), **read})
    except LorakitError as e:
        raise LorakitError(f"{entry.file}: {e}") from None
    if tuple(state.shape) not in (tuple(expected), tuple(expected[::-1])):
        _check_shape(entry, name, state.shape, expected)
    return state


def _check_shape(entry: Entry | None, name: str, shape: tuple, expected: tuple) -> None:
    if tuple(shape) != tuple(expected):
        where = f"{entry.file}: tensor {entry.key}" if entry else f"tensor {name}"
        raise LorakitError(
            f"{where} has shape {list(shape)} but the model's config makes {name} "
            f"{list(expected)}; the weights do not belong to this config.json"
        )


def tensors(directory: Path, model: nn.Module) -> Iterator[tuple[str, torch.Tensor | NF4State]]:
    """(parameter or buffer name in `model`, tensor) for every checkpoint tensor the model has.

    Checkpoint keys are renamed by transformers' rules for this model (and the base-model prefix
    added or dropped); keys the model has no place for are skipped, as transformers does. A
    weight saved by bitsandbytes in 4 bits (quant/bnb_format.py) comes as its NF4State, read
    with the tensors stored beside it.
    """
    from transformers.core_model_loading import rename_source_key

    expected = {n: tuple(p.shape) for n, p in model.state_dict(keep_vars=True).items()}
    renamings, converters = _transforms(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    fused: dict[str, object] = {}
    maps: dict[Path, mmap.mmap] = {}  # each file's mapping, for the 4-bit codes
    every = [entry for file in checkpoint_files(directory) for entry in entries(file)]
    parts: dict[str, dict[str, Entry]] = {}  # a 4-bit weight's key -> its tensors by suffix
    plain = []
    for entry in every:
        if m := PART.match(entry.key):
            parts.setdefault(m["weight"], {})[m["part"]] = entry
        else:
            plain.append(entry)
    for entry in plain:
        name, pattern = rename_source_key(entry.key, renamings, converters, prefix, expected)
        if name not in expected and entry.key in expected:
            name, pattern = entry.key, None  # a key already right must not be renamed
        if name not in expected:
            continue
        if entry.key in parts:
            yield name, _nf4_state(entry, parts[entry.key], name, expected[name], maps)
        elif pattern is None:
            _check_shape(entry, name, entry.shape, expected[name])
            yield name, entry.read()
        else:  # one piece of a converted tensor: read when the target is complete
            converter = fused.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            converter.add_tensor(name, entry.key, pattern, partial(Entry.read, entry))
    for first, converter in fused.items():
        try:
            out = converter.convert(first, model=model, config=model.config)
        except (RuntimeError, ValueError, IndexError) as e:
            msg = f"{directory}: cannot assemble {first} from its pieces ({e})"
            raise LorakitError(msg) from None
        for name, value in out.items():
            value = value[0] if isinstance(value, list) else value
            if name in expected:
                _check_shape(None, name, value.shape, expected[name])
                yield name, value
