"""A mixture-of-experts layer's fused expert weights, frozen in NF4.

transformers 5 keeps all experts of a layer in one (experts, out, in) parameter (Mixtral's
`experts.gate_up_proj`, `experts.down_proj`) and its eager forward multiplies by one expert's
slice at a time, `F.linear(x, self.gate_up_proj[i])`. `NF4Experts` takes the parameter's place:
each expert's (out, in) slice is quantized on its own, in bitsandbytes' layout as an NF4Linear's
weight, and indexing it dequantizes that one expert into the compute dtype. The stored model is
therefore 4-bit per expert; a forward holds one dequantized expert at a time (autograd keeps the
slices a backward needs, as it would the parameter's).

Adapters on these weights are `lora.experts.LoRAExperts`, which takes the weight's place in turn.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.kernels import nf4_backend
from lorakit.quant.nf4 import NF4State


def is_experts(module: nn.Module) -> bool:
    """A mixture-of-experts layer's experts fused in (experts, out, in) parameters (transformers
    names these classes *Experts; lorakit's own stand-ins for their weights are not)."""
    kind = type(module)
    return kind.__name__.endswith("Experts") and not kind.__module__.startswith("lorakit.")


def expert_weights(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """name -> (experts, out, in) of the fused expert weights of an experts module, in the order
    the module's class registers them (PEFT nests its wrappers in that order)."""
    found = {}
    transposed = getattr(module, "is_transposed", False)
    for name, w in [*module.named_parameters(recurse=False), *module.named_children()]:
        shape = tuple(w.shape) if hasattr(w, "shape") else ()
        if len(shape) == 3:
            found[name] = (shape[0], shape[2], shape[1]) if transposed else shape
    order = module.__dict__.get("expert_order", [])
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 0))


def replace_weight(module: nn.Module, attr: str, new: nn.Module) -> None:
    """Put `new` (a module indexable by expert) in the place of the fused weight `attr`,
    remembering the class's order of its weights first (a replaced parameter loses its place)."""
    module.__dict__.setdefault("expert_order", list(expert_weights(module)))
    module._parameters.pop(attr, None)
    module._modules.pop(attr, None)
    setattr(module, attr, new)


class NF4Experts(nn.Module):
    """(experts, out, in) weights, one NF4 state per expert; `experts[i]` -> (out, in)."""

    def __init__(self, states: list[NF4State], compute_dtype: torch.dtype) -> None:
        super().__init__()
        first = states[0]
        self.weight_shape = (len(states), *first.shape)
        self.compute_dtype = compute_dtype
        self.weight_dtype = first.dtype
        self.blocksize, self.blocksize2 = first.blocksize, first.blocksize2
        self.double_quant = first.double_quant
        self.register_buffer("packed", torch.stack([s.packed for s in states]))
        absmax = torch.stack([s.absmax for s in states])
        self.register_buffer("absmax", _bits(absmax))
        if self.double_quant:
            scales = torch.stack([s.absmax_scale for s in states])
            offsets = torch.tensor([s.offset for s in states], dtype=torch.float32)
            self.register_buffer("absmax_scale", _bits(scales))
            self.register_buffer("offsets", _bits(offsets))
            self.register_buffer("absmax_code", _bits(first.absmax_code))

    @classmethod
    def from_weight(
        cls, weight: Tensor, compute_dtype: torch.dtype, blocksize: int = 64
    ) -> NF4Experts:
        """Quantize a (experts, out, in) tensor expert by expert (on its own device)."""
        if weight.dim() != 3:
            shape = tuple(weight.shape)
            raise ValueError(f"NF4Experts needs (experts, out, in) weights, got {shape}")
        return cls([nf4_backend.quantize(w, blocksize, True) for w in weight], compute_dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.weight_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def __len__(self) -> int:
        return self.weight_shape[0]

    def state(self, i: int) -> NF4State:
        """Expert i's NF4State, on the buffers' device."""
        dq = self.double_quant
        return NF4State(
            packed=self.packed[i],
            absmax=_floats(self.absmax[i]),
            shape=torch.Size(self.weight_shape[1:]),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            offset=float(_floats(self.offsets[i])) if dq else None,
            absmax_scale=_floats(self.absmax_scale[i]) if dq else None,
            absmax_code=_floats(self.absmax_code) if dq else None,
            blocksize2=self.blocksize2,
        )

    def __getitem__(self, i: int | Tensor) -> Tensor:
        return nf4_backend.dequantize(self.state(int(i)), self.compute_dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """All experts, (experts, out, in), in `dtype` (default: the dtype quantized from)."""
        dtype = dtype or self.weight_dtype
        return torch.stack([nf4_backend.dequantize(self.state(i), dtype) for i in range(len(self))])

    def extra_repr(self) -> str:
        experts, out, inp = self.weight_shape
        return f"{experts} experts x ({out}, {inp}), nf4 blocksize={self.blocksize}"


def _bits(t: Tensor) -> Tensor:
    """float32 kept as int32 bits, so that model.to(bfloat16) does not round the scales."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _floats(t: Tensor) -> Tensor:
    return t.view(torch.float32) if t.dtype == torch.int32 else t
