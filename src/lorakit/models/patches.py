"""Training's faster forwards for transformers' modules, applied in a context that undoes them.

Within `training_patches(model)`:
- a model on sdpa attention attends packed rows example by example
  (`packed_attention.packed_attention`, used when a forward pass is given `segments=`);
- LLaMA-style RMSNorms (frozen weight) and SiLU MLPs run their bf16 CPU arithmetic through one
  compiled pass each way (`kernels.rms_norm`, `kernels.swiglu`);
- the rotary embedding of LLaMA, Mistral, Qwen2 and Qwen3 attention does too (`kernels.rotary`).

Each patched forward checks at every call that its kernel applies (bf16, CPU, the library
built) and otherwise runs the module's own arithmetic, so a patched model gives the same results
anywhere. transformers' attention looks `apply_rotary_pos_emb` up in its modeling module at each
call, so that function is replaced in the module, for every model of those architectures in the
process, while the context lasts (the results are the same, bit for bit). On leaving, every
forward, function and attention setting is put back as it was.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from torch import Tensor, nn

from lorakit.kernels.rms_norm import RMSNormFunction, rms_norm_applies
from lorakit.kernels.rotary import RopeFunction, rope_applies
from lorakit.kernels.swiglu import SwiGLUFunction, swiglu_applies
from lorakit.models.packed_attention import enable_packed_attention

# weight * bf16(x * rsqrt(mean(x^2) + eps)) in float32: the arithmetic of kernels.rms_norm
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn a SiLU
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# q and k rotated by their modeling module's apply_rotary_pos_emb(q, k, cos, sin)
ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    weight = self.weight
    if not weight.requires_grad and rms_norm_applies(x, weight):
        return RMSNormFunction.apply(x, weight, self.variance_epsilon)
    return type(self).forward(self, x)


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    if swiglu_applies(g, u):
        return self.down_proj(SwiGLUFunction.apply(g, u))
    return self.down_proj(self.act_fn(g) * u)


def _fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202
        plain = cos.requires_grad or sin.requires_grad or unsqueeze_dim != 1
        if not plain and rope_applies(q, cos, sin) and rope_applies(k, cos, sin):
            return RopeFunction.apply(q, cos, sin), RopeFunction.apply(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.lorakit_original = original
    return apply_rotary_pos_emb


def _is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _set_forward(stack: ExitStack, module: nn.Module, forward: Callable) -> None:
    """module.forward = forward (bound), undone when `stack` closes."""
    own = module.__dict__.get("forward")  # an instance-level forward (a hook library's) to restore

    def restore() -> None:
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    module.forward = types.MethodType(forward, module)
    stack.callback(restore)


def _patch_rotary(stack: ExitStack, model: nn.Module) -> int:
    names = {type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTIONS}
    count = 0
    for name in sorted(names):
        module = sys.modules.get(name)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if original is None or hasattr(original, "lorakit_original"):
            continue  # not there, or already patched by an enclosing context
        module.apply_rotary_pos_emb = _fused_rotary(original)
        stack.callback(setattr, module, "apply_rotary_pos_emb", original)
        count += 1
    return count


def _patch_attention(stack: ExitStack, model: nn.Module) -> bool:
    if not hasattr(model, "config"):
        return False  # a module, not a transformers model
    previous = getattr(model.config, "_attn_implementation", None)
    if not enable_packed_attention(model):
        return False
    stack.callback(model.set_attn_implementation, previous)
    return True


@contextmanager
def training_patches(model: nn.Module, packed_attention: bool = True) -> Iterator[dict]:
    """Within the block, `model` trains with the forwards of the module docstring; yields what
    was patched ({"attention": bool, "norms": n, "mlps": n, "rotary": n})."""
    with ExitStack() as stack:
        done = {"attention": packed_attention and _patch_attention(stack, model)}
        norms = [
            m
            for m in model.modules()
            if type(m).__name__ in NORMS and hasattr(m, "variance_epsilon")
        ]
        mlps = [m for m in model.modules() if type(m).__name__ in MLPS and _is_silu(m.act_fn)]
        for m in norms:
            _set_forward(stack, m, _norm_forward)
        for m in mlps:
            _set_forward(stack, m, _mlp_forward)
        done.update(norms=len(norms), mlps=len(mlps), rotary=_patch_rotary(stack, model))
        yield done


def checkpoint_layers(model: nn.Module) -> Callable[[], None]:
    """Turn on transformers' activation checkpointing (non-reentrant); returns what turns it
    off. (transformers 5 renamed gradient_checkpointing_enable and warns on the old name.)"""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        return model.activation_checkpointing_disable
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.gradient_checkpointing_disable
