"""The SwiGLU of LLaMA-style MLPs for training on CPU in bf16: one compiled pass each way.

transformers' LlamaMLP (and Mistral's, Qwen2's, Qwen3's: the same code) computes
down(silu(gate(x)) * up(x)): a silu and a multiply forward, two multiplies and a
silu_backward backward, each a pass over (tokens, intermediate) bf16 activations, and autograd
keeps g, silu(g) and u. `fuse_swiglus` routes the silu * up part through `nf4_kernel.swiglu`
and `swiglu_backward` instead: the same bf16 results bit for bit, one pass each, only g and u
kept. The projections stay the model's own (NF4, LoRA or plain). Elsewhere (a GPU, float32, no
compiled library) the original arithmetic runs.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from lorakit import nf4_kernel

# forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn a SiLU
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:  # noqa: ANN001
        h = nf4_kernel.swiglu(g, u)
        assert h is not None
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):  # noqa: ANN001, ANN205
        g, u = ctx.saved_tensors
        grads = nf4_kernel.swiglu_backward(dh, g, u)
        assert grads is not None
        return grads


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    if (
        g.dtype == u.dtype == torch.bfloat16
        and g.device.type == u.device.type == "cpu"
        and g.shape == u.shape
        and nf4_kernel.library() is not None
    ):
        h = _SwiGLU.apply(g, u)
    else:
        h = self.act_fn(g) * u
    return self.down_proj(h)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_swiglus(model: nn.Module) -> int:
    """Route the model's LLaMA-style SiLU MLPs through the compiled passes where they apply (see
    the module's docstring); returns how many MLPs were routed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
