"""lorakit: QLoRA fine-tuning on the hardware you already have.

import lorakit
model, tokenizer, source = lorakit.load_model("smollm2")        # NF4 base, frozen
result = lorakit.train(lorakit.TrainConfig(steps=60), model, tokenizer, source.name)
lorakit.load_adapter(model, "lorakit-out", name="jargon")       # any PEFT LoRA adapter
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so `lorakit --help` stays fast.
_EXPORTS = {
    "load_model": "lorakit.loading",
    "TrainConfig": "lorakit.train",
    "train": "lorakit.train",
    "attach_lora": "lorakit.lora",
    "set_active_adapters": "lorakit.lora",
    "row_adapters": "lorakit.lora",
    "merge_lora": "lorakit.lora",
    "save_adapter": "lorakit.adapters",
    "load_adapter": "lorakit.adapters",
    "AdapterConfig": "lorakit.adapters",
    "resolve_targets": "lorakit.targets",
    "quantize_nf4": "lorakit.nf4",
    "dequantize_nf4": "lorakit.nf4",
    "NF4Linear": "lorakit.qlinear",
    "LoRALinear": "lorakit.lora",
    "LorakitError": "lorakit.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
