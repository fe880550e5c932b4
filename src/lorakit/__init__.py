"""lorakit: QLoRA fine-tuning on the hardware you already have.

    import lorakit
    model, tokenizer, source = lorakit.load_model("smollm2")        # NF4 base, frozen
    result = lorakit.train(lorakit.TrainConfig(steps=60), model, tokenizer, source.name)
    print(lorakit.generate(model, tokenizer, "What is a kludge?"))  # with the new adapter
    lorakit.load_adapter(model, "other-run", name="other")           # any PEFT LoRA adapter

The package reads bottom-up (each floor imports only the ones below it): `quant.nf4` (the NF4
format), `kernels` (compiled CPU kernels), `quant.linear` (the 4-bit layer), `lora` (adapters,
targets, PEFT's format), `models` (loading, chat templates, training's forwards), `training` and
`inference` (side by side), `server`, and `cli` on top.
"""

from lorakit.errors import LorakitError
from lorakit.inference.generate import generate, generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.lora.layer import (
    LoRALinear,
    active_adapters,
    attach_lora,
    merge_lora,
    row_adapters,
    set_active_adapters,
)
from lorakit.lora.peft_format import AdapterConfig, load_adapter, save_adapter
from lorakit.lora.targets import resolve_targets
from lorakit.models.loading import load_model
from lorakit.models.merge import merge_into_base
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import NF4State, dequantize_nf4, quantize_nf4
from lorakit.training.config import TrainConfig
from lorakit.training.rundir import TrainResult
from lorakit.training.trainer import train

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "LoRALinear",
    "LorakitError",
    "NF4Linear",
    "NF4State",
    "Sampling",
    "TrainConfig",
    "TrainResult",
    "active_adapters",
    "attach_lora",
    "dequantize_nf4",
    "generate",
    "generate_ids",
    "load_adapter",
    "load_model",
    "merge_into_base",
    "merge_lora",
    "quantize_nf4",
    "resolve_targets",
    "row_adapters",
    "save_adapter",
    "set_active_adapters",
    "train",
]
