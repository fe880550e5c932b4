"""The fused chunked loss equals the plain cross-entropy, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel, tiny_model

import lorakit.training.loss as L
from lorakit.training.loss import LinearCrossEntropy, _Scratch, causal_lm_loss, reused_logits


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("chunk", [7, 64])
def test_linear_cross_entropy_equals_reference(softcap, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(30, 16, dtype=torch.float32)
    labels = torch.randint(0, 30, (50,))
    ours = LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    logits = F.linear(h2, weight)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, labels, reduction="sum")
    (grad_ref,) = torch.autograd.grad(ref * 3.0, h2)
    # The logits are computed in fp32 whatever the input dtype, so compare at fp32 precision.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_equals_transformers_loss_and_gradients():
    model = tiny_model("llama")
    from lorakit.lora.layer import attach_lora, mark_only_lora_trainable

    attach_lora(model, ["model.layers.0.self_attn.q_proj"], rank=2, alpha=4)
    mark_only_lora_trainable(model)
    torch.nn.init.normal_(
        model.get_submodule("model.layers.0.self_attn.q_proj").lora_B["default"].weight
    )
    ids = torch.randint(0, 400, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    total, n = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk=5)
    a = model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight
    (grad_ours,) = torch.autograd.grad(total / n, a)
    ref = model(input_ids=ids, labels=labels).loss  # transformers' mean over labelled tokens
    (grad_ref,) = torch.autograd.grad(ref, a)
    assert n == 2 * (12 - 4)
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-6)


@needs_kernel
def test_bf16_chunked_loss_through_the_compiled_kernel_equals_pytorchs_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(70, 64, generator=g)).bfloat16().requires_grad_(True)
    weight = (torch.randn(512, 64, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, 512, (70,), generator=g)
    ours = LinearCrossEntropy.apply(hidden, weight, labels, 32, 0.0)
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    monkeypatch.setattr(L, "cross_entropy", lambda *args: None)
    ref = LinearCrossEntropy.apply(hidden, weight, labels, 32, 0.0)
    (grad_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours.float(), grad_ref.float(), rtol=2e-2, atol=1e-3)


@needs_kernel
def test_chunks_sharing_one_logits_buffer_give_the_same_bits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(70, 64, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(512, 64, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, 512, (70,), generator=g)
    plain = LinearCrossEntropy.apply(hidden, weight, labels, 32, 0.0)  # 32 + 32 + 6 rows
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    with reused_logits():
        shared = LinearCrossEntropy.apply(hidden, weight, labels, 32, 0.0)
        (grad_shared,) = torch.autograd.grad(shared, hidden)
        assert _Scratch.buffer is not None and _Scratch.buffer.numel() == 32 * 512
    assert _Scratch.buffer is None  # freed on leaving
    assert torch.equal(shared, plain) and torch.equal(grad_shared, grad_plain)
