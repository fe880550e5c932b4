"""Adapters and merged models for llama.cpp and Ollama, as GGUF files.

An adapter becomes what llama.cpp's own `convert_lora_to_gguf.py` writes: the base's GGUF
architecture, `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each
adapted weight (named as llama.cpp names the base's, e.g. `blk.0.attn_q.weight`) two tensors,
`<name>.lora_a` holding A (rank, in) and `<name>.lora_b` holding B (out, rank). llama.cpp adds
`alpha / rank * B @ A` to the weight, so a module whose scaling differs from that (rsLoRA,
alpha_pattern, rank_pattern) has its B scaled to match. LLaMA's converter reorders the rows of
q and k (rotary halves interleaved: `_rotary_rows`); B's rows follow them.

A merged model is written from a GGUF base (`--merged`): every tensor and setting of the base
(tokenizer, chat template), the adapted weights with the adapter added, 2-D weights stored as
F16, Q8_0 or F32.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from lorakit.atomic import atomic_write
from lorakit.errors import LorakitError
from lorakit.lora.peft_format import AdapterConfig, group_weights, read_adapter

# transformers model_type -> (llama.cpp architecture, whether its converter reorders q/k rows).
# Only bases whose converter renames weights without fusing or transposing them.
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
ADAPTER_TYPES = ("f32", "f16")
MERGED_TYPES = ("f16", "q8_0", "f32")


def export_adapter(
    adapter: str | os.PathLike, base_config, out: Path, outtype: str = "f32"
) -> list[str]:
    """Write the adapter at `adapter` as a llama.cpp LoRA GGUF; returns the adapted weights'
    GGUF names."""
    import gguf

    arch, config, terms = adapter_terms(adapter, base_config)
    tensors = {}
    for name, (a, b, scaling) in terms.items():
        # llama.cpp's scale is alpha / rank, rank read from B: the rest goes into B
        b = b * (scaling / (config.alpha / a.shape[0]))
        tensors[name + ".lora_a"] = a
        tensors[name + ".lora_b"] = b
    ftype = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
        writer.add_file_type(ftype)
        for name, t in tensors.items():
            array = t.numpy()
            writer.add_tensor(name, array.astype(np.float16) if outtype == "f16" else array)
        _finish(writer)

    atomic_write(out, write)
    return list(terms)


def export_merged(adapter: str | os.PathLike, base_gguf: Path, out: Path, outtype: str) -> None:
    """Write the GGUF base at `base_gguf` with the adapter added, as one model file, one tensor
    at a time (a 7B never sits in memory whole)."""
    import gguf

    from lorakit.models.loading import ModelSource, load_config

    reader = gguf.GGUFReader(str(base_gguf))
    if "split.count" in reader.fields and int(reader.fields["split.count"].contents()) > 1:
        raise LorakitError(f"{base_gguf} is one part of a split GGUF; merge the parts first")
    arch, _, terms = adapter_terms(adapter, load_config(ModelSource("gguf", base_gguf, "")))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    for name, (a, b, _) in terms.items():
        if name not in shapes:
            raise LorakitError(f"{base_gguf} lacks {name}, which the adapter adapts")
        if shapes[name] != (b.shape[0], a.shape[1]):
            raise LorakitError(
                f"{adapter}: its {name} is {b.shape[0]} x {a.shape[1]} but the base's is "
                f"{shapes[name][0]} x {shapes[name][1]}: the adapter is for another base"
            )
    Q = gguf.GGMLQuantizationType
    wanted = {"f16": Q.F16, "q8_0": Q.Q8_0, "f32": Q.F32}[outtype]
    ftype = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "f32": "ALL_F32"}[outtype]

    def kind(shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        """F32 for vectors; a row Q8_0 cannot cut into blocks of 32 goes F16 (as llama.cpp's
        converter does)."""
        if len(shape) < 2:
            return Q.F32
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        return Q.F16 if shape[-1] % block else wanted

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_settings(reader, writer, base_gguf)
        writer.add_file_type(getattr(gguf.LlamaFileType, ftype))
        for t in reader.tensors:
            shape, q = shapes[t.name], kind(shapes[t.name])
            block, size = gguf.GGML_QUANT_SIZES[q]
            nbytes = math.prod(shape) // block * size
            writer.add_tensor_info(t.name, shape, np.float32, nbytes, raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if t.name in terms:
                a, b, scaling = terms[t.name]
                weight = weight + scaling * (b @ a).numpy()
            q = kind(shapes[t.name])
            if q == Q.F32:
                writer.write_tensor_data(np.ascontiguousarray(weight))
            elif q == Q.F16:
                writer.write_tensor_data(weight.astype(np.float16))
            else:
                writer.write_tensor_data(gguf.quants.quantize(weight, q))
        writer.close()

    atomic_write(out, write)


def _copy_settings(reader, writer, where: Path) -> None:
    """The base's settings (tokenizer, chat template, hyperparameters) into the new file."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer's own, or set by the caller
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        if array and len(field.types) == 1:
            continue  # an empty array: the writer cannot write one, and it says nothing
        if array and field.types[1] == gguf.GGUFValueType.ARRAY:
            raise LorakitError(f"{where}: {key} is an array of arrays, which lorakit cannot copy")
        writer.add_key_value(
            key, field.contents(), field.types[0], field.types[-1] if array else None
        )


def adapter_terms(
    adapter: str | os.PathLike, base_config
) -> tuple[str, AdapterConfig, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """(llama.cpp architecture, the adapter's config, {GGUF weight name: (A, B with its rows
    in llama.cpp's order, scaling)}) of the adapter on a base of `base_config`; refuses what
    llama.cpp cannot take."""
    import gguf

    where = Path(adapter)
    config, weights = read_adapter(adapter)
    if config.target_parameters:
        raise LorakitError(
            f"{where}: the adapter adapts expert weights ({config.target_parameters[0]}), "
            "which llama.cpp's LoRA adapters do not hold"
        )
    modules = group_weights(weights, config, where)
    model_type = base_config.model_type
    if model_type not in ARCHITECTURES:
        raise LorakitError(
            f"{where}: the adapter adapts {next(iter(modules))} of a {model_type} model, whose "
            "weights llama.cpp's converter reshapes; lorakit exports adapters of "
            f"{', '.join(sorted(ARCHITECTURES))} bases (use this one with transformers + PEFT "
            "or `lorakit serve`)"
        )
    arch, reorders = ARCHITECTURES[model_type]
    layers = base_config.num_hidden_layers
    names = gguf.get_tensor_name_map(_arch_enum(arch), layers)
    heads = base_config.num_attention_heads
    kv_heads = getattr(base_config, "num_key_value_heads", None) or heads
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // heads
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    terms = {}
    for module, pair in modules.items():
        name = names.get_name(module)
        if name is None or name == "token_embd" or (name == "output" and tied):
            why = "ties it to the embeddings" if name == "output" else "has no such weight"
            raise LorakitError(
                f"{where}: the adapter adapts {module}, which llama.cpp's {arch} model {why}; "
                "train without it (e.g. --targets default)"
            )
        a, b = pair["A"].float(), pair["B"].float()
        rank = a.shape[0]
        for suffix, count in ((".attn_q", heads), (".attn_k", kv_heads)):
            if name.endswith(suffix):
                if b.shape[0] != count * head_dim or a.shape[1] != base_config.hidden_size:
                    raise LorakitError(
                        f"{where}: its {module} is {b.shape[0]} x {a.shape[1]}, not "
                        f"{count * head_dim} x {base_config.hidden_size}: the adapter is for "
                        "another base"
                    )
                if reorders:
                    b = _rotary_rows(b, count)
        terms[name + ".weight"] = (a.contiguous(), b.contiguous(), _scaling(config, module, rank))
    return arch, config, terms


def _scaling(config: AdapterConfig, module: str, rank: int) -> float:
    alpha = config.alpha_for(module)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q or k projection in the order llama.cpp's LLaMA converter stores them:
    within each head, the first and second rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_enum(arch: str):
    from importlib.metadata import version

    import gguf

    found = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if found is None:
        raise LorakitError(
            f"the installed gguf package ({version('gguf')}) does not know llama.cpp's {arch} "
            "models; pip install -U gguf"
        )
    return found


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
