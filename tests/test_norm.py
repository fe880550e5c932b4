"""Training's compiled RMSNorm equals transformers' LlamaRMSNorm, forward and backward."""

import pytest
import torch
from conftest import lora_loss_and_grad, tiny_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit import nf4_kernel
from lorakit.norm import fuse_rms_norms

needs_kernel = pytest.mark.skipif(
    nf4_kernel.library() is None, reason="no C compiler or no AVX2 on this machine"
)


def _norm(n: int, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(n, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 1)
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    return norm


@needs_kernel
@pytest.mark.parametrize("rows", [3, 200])  # 200: the rows split across threads
@pytest.mark.parametrize("n", [64, 100])
def test_fused_rms_norm_equals_llamas_forward_and_backward(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(2, rows, n, generator=g) * 3).bfloat16()
    dy = torch.randn(2, rows, n, generator=g).bfloat16()
    plain, fused = _norm(n, n), _norm(n, n)
    assert fuse_rms_norms(fused) == 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = plain(x1), fused(x2)
    assert torch.equal(y1, y2)  # lk_rms_norm is LlamaRMSNorm bit for bit
    y1.backward(dy)
    y2.backward(dy)
    assert x2.grad.dtype == torch.bfloat16
    # float32 sums in another order, then bf16: at most a bf16 step apart, most equal
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2**-7, atol=1e-3)
    assert (x2.grad == x1.grad).float().mean() > 0.95


@needs_kernel
def test_a_trainable_weight_or_float32_keeps_the_modules_own_forward():
    norm = _norm(64, 0)
    fuse_rms_norms(norm)
    norm.weight.requires_grad_(True)
    x = torch.randn(4, 64).bfloat16()
    norm(x).sum().backward()
    assert norm.weight.grad is not None  # autograd's path: the weight gets its gradient
    norm.weight.requires_grad_(False)
    assert norm.float()(x.float()).dtype == torch.float32


@needs_kernel
def test_a_fused_models_lora_gradients_equal_the_plain_models():
    target = "model.layers.0.self_attn.q_proj"
    loss, grad, _ = lora_loss_and_grad("llama", target)
    fused_loss, fused_grad, count = lora_loss_and_grad("llama", target, fuse_rms_norms)
    assert count == 2 * tiny_model("llama").config.num_hidden_layers + 1
    torch.testing.assert_close(fused_loss, loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused_grad, grad, rtol=0.05, atol=1e-3)
