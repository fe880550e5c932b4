"""Training's compiled RMSNorm equals transformers' LlamaRMSNorm, forward and backward."""

import pytest
import torch
from conftest import tiny_model
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
    from lorakit.lora import attach_lora, mark_only_lora_trainable
    from lorakit.loss import causal_lm_loss

    grads = []
    for fused in (False, True):
        model = tiny_model("llama").bfloat16()
        attach_lora(model, ["model.layers.0.self_attn.q_proj"], rank=2, alpha=4)
        mark_only_lora_trainable(model)
        lora = model.get_submodule("model.layers.0.self_attn.q_proj")
        torch.nn.init.normal_(
            lora.lora_B["default"].weight, generator=torch.Generator().manual_seed(1)
        )
        if fused:
            assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
        ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(2))
        total, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        (grad,) = torch.autograd.grad(total / n, lora.lora_A["default"].weight)
        grads.append((total / n, grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0.05, atol=1e-3)
