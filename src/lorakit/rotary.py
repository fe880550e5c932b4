"""The rotary embedding for training on CPU in bf16: one compiled pass each way.

transformers' apply_rotary_pos_emb computes q * cos + rotate_half(q) * sin (and the same for
k): a slice, a negation, a concatenation, two products and a sum forward, more backward, each a
pass over the queries or keys, for every layer. `fuse_rotary` has the attention of LLaMA,
Mistral, Qwen2 and Qwen3 models call `nf4_kernel.rope` instead: the same bf16 results bit for
bit, one pass each way, nothing but cos and sin kept. Elsewhere (a GPU, float32, another layout,
no compiled library) transformers' function runs.

The attention modules look the function up in their modeling module at each call, so it is
replaced there: for every model of those architectures in the process, with the same results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorakit import nf4_kernel

ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001
        out = nf4_kernel.rope(x, cos, sin)
        assert out is not None
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        dx = nf4_kernel.rope(dy, cos, sin, backward=True)
        assert dx is not None
        return dx, None, None


def _applies(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    return (
        nf4_kernel.rope_applies(x, cos, sin)
        and not cos.requires_grad
        and not sin.requires_grad
        and nf4_kernel.library() is not None
    )


def _fused(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202
        if unsqueeze_dim == 1 and _applies(q, cos, sin) and _applies(k, cos, sin):
            return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.lorakit_original = original
    return apply_rotary_pos_emb


def fuse_rotary(model: nn.Module) -> int:
    """Have the model's LLaMA-style attention use the compiled rotary embedding where it applies
    (see the module's docstring); returns how many modeling modules were switched."""
    modules = {type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTIONS}
    count = 0
    for name in modules:
        module = sys.modules.get(name)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if original is None:
            continue
        if not hasattr(original, "lorakit_original"):
            module.apply_rotary_pos_emb = _fused(original)
        count += 1
    return count
