"""The checkpoint format transformers + bitsandbytes save a 4-bit model in, for our NF4 states.

Our NF4 layout is bitsandbytes' bit for bit (quant/nf4.py), so saving and loading are renames:
a quantized `x.weight` is stored as

    x.weight                                   uint8 (n_bytes, 1)   the packed codes
    x.weight.absmax                            uint8 (or float32 without double quantization)
    x.weight.quant_map                         float32 (16,)        the NF4 code
    x.weight.nested_absmax                     float32              double quantization's scales
    x.weight.nested_quant_map                  float32 (256,)       the 8-bit dynamic code
    x.weight.quant_state.bitsandbytes__nf4     uint8                JSON: quant_type, blocksize,
                                                                    dtype, shape, nested_* ...

(`bitsandbytes.functional.QuantState.as_dict(packed=True)`), and config.json carries a
`quantization_config` with `quant_method: bitsandbytes, load_in_4bit: true`.
"""

from __future__ import annotations

import json
import re

import torch
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.quant.nf4 import NF4_CODE, NF4State

STATE_KEY = "quant_state.bitsandbytes__nf4"
# The tensors stored beside a quantized `x.weight`, by their suffix.
PART = re.compile(
    r"^(?P<weight>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|"
    r"quant_state\.bitsandbytes__\w+)$"
)


def quantization_config(compute_dtype: torch.dtype, skip_modules: list[str]) -> dict:
    """config.json's `quantization_config` for NF4 with double quantization (what QLoRA uses
    and lorakit writes): transformers' BitsAndBytesConfig as it serialises it."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def is_prequantized(config: object, where: object) -> bool:
    """Whether a model's config says its checkpoint is already NF4 (bitsandbytes 4-bit); a
    LorakitError for quantized checkpoints lorakit cannot read (8-bit, FP4, GPTQ, AWQ ...)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "unknown")
    if method != "bitsandbytes":
        problem = f"is quantized with {method}, which lorakit does not read"
    elif not qc.get("load_in_4bit"):
        problem = "is a bitsandbytes 8-bit checkpoint; lorakit reads 4-bit NF4 ones"
    elif qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        problem = "is a bitsandbytes 4-bit FP4 checkpoint; lorakit reads NF4 ones"
    else:
        return True
    raise LorakitError(
        f"{where} {problem}; use the 16-bit original (lorakit quantizes it to NF4 as it loads)"
    )


def state_tensors(state: NF4State) -> dict[str, Tensor]:
    """The tensors bitsandbytes saves for one quantized weight, by suffix ("" is the weight)."""
    info: dict = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {
        "": state.packed.reshape(-1, 1),
        "absmax": state.absmax,
        "quant_map": torch.tensor(NF4_CODE, dtype=torch.float32),
    }
    if state.double_quant:
        info |= {
            "nested_blocksize": state.blocksize2,
            "nested_dtype": "float32",
            "nested_offset": state.offset,
        }
        out |= {"nested_absmax": state.absmax_scale, "nested_quant_map": state.absmax_code}
    out[STATE_KEY] = torch.frombuffer(bytearray(json.dumps(info).encode()), dtype=torch.uint8)
    return out


def state_from_tensors(name: str, parts: dict[str, Tensor]) -> NF4State:
    """The NF4State of weight `name` from its saved tensors (by suffix, "" for the weight);
    a LorakitError naming the tensor that is missing or does not fit."""
    info_keys = [k for k in parts if k.startswith("quant_state.")]
    if info_keys != [STATE_KEY]:
        found = info_keys[0].rpartition("__")[2] if info_keys else None
        if found:
            raise LorakitError(f"tensor {name} is bitsandbytes {found}; lorakit reads NF4 only")
        raise LorakitError(f"tensor {name}.{STATE_KEY} is missing; the checkpoint is incomplete")
    try:
        info = json.loads(bytes(parts[STATE_KEY].tolist()).decode())
        shape = torch.Size(int(s) for s in info["shape"])
        blocksize = int(info["blocksize"])
        dtype = getattr(torch, info["dtype"])
        nested = "nested_offset" in info
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LorakitError(f"tensor {name}.{STATE_KEY} is not a bitsandbytes state ({e})") from None
    needed = ["", "absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] * nested)
    for part in needed:
        if part not in parts:
            what = f"{name}.{part}" if part else name
            raise LorakitError(f"tensor {what} is missing; the checkpoint is incomplete")
    if not torch.equal(parts["quant_map"].float(), torch.tensor(NF4_CODE)):
        raise LorakitError(f"tensor {name}.quant_map is not the NF4 code; lorakit reads NF4 only")
    n_blocks = -(-shape.numel() // blocksize)
    packed = parts[""].view(torch.uint8).reshape(-1)
    if packed.numel() != -(-shape.numel() // 2) or parts["absmax"].numel() != n_blocks:
        raise LorakitError(
            f"tensor {name} holds {packed.numel()} bytes and {parts['absmax'].numel()} scales, "
            f"not what its shape {list(shape)} needs; the checkpoint is corrupt"
        )
    return NF4State(
        packed=packed,
        absmax=parts["absmax"],
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        offset=float(info["nested_offset"]) if nested else None,
        absmax_scale=parts["nested_absmax"].float() if nested else None,
        absmax_code=parts["nested_quant_map"].float() if nested else None,
        blocksize2=int(info.get("nested_blocksize", 256)),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
