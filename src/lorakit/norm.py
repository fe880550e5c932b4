"""RMSNorm for LoRA training on CPU in bf16: forward and backward each in one compiled pass.

transformers' LlamaRMSNorm (and Mistral's, Qwen2's, Qwen3's: the same arithmetic) runs as
eight PyTorch operations forward and more backward, each a pass over float32 copies of the
activations, and autograd keeps those copies; a model has two a layer. With the weight frozen
(always, for LoRA) `fuse_rms_norms` routes them through `nf4_kernel.rms_norm` and
`rms_norm_backward` instead: bf16 in and out, float32 inside, only x kept for backward.
Elsewhere (a GPU, float32, a trainable weight, no compiled library) the module's own forward
runs.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from lorakit import nf4_kernel

# weight * bf16(x * rsqrt(mean(x^2) + eps)) in float32: the arithmetic of nf4_kernel.rms_norm
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        out = nf4_kernel.rms_norm(x, weight, eps)
        assert out is not None
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        dx = nf4_kernel.rms_norm_backward(dy, x, weight, ctx.eps)
        assert dx is not None
        return dx, None, None


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    weight = self.weight
    if (
        not weight.requires_grad
        and weight.shape == x.shape[-1:]
        and x.dtype == weight.dtype == torch.bfloat16
        and x.device.type == weight.device.type == "cpu"
        and nf4_kernel.library() is not None
    ):
        return _RMSNorm.apply(x, weight, self.variance_epsilon)
    return type(self).forward(self, x)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route the model's LLaMA-style RMSNorms through the compiled passes where they apply (see
    the module's docstring); returns how many norms were routed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
