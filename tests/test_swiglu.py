"""Training's compiled SwiGLU equals transformers' silu(gate) * up, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import lora_loss_and_grad, tiny_model

from lorakit import nf4_kernel
from lorakit.swiglu import fuse_swiglus

needs_kernel = pytest.mark.skipif(
    nf4_kernel.library() is None, reason="no C compiler or no AVX2 on this machine"
)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and a.dtype == b.dtype


@needs_kernel
@pytest.mark.parametrize("shape", [(5,), (3, 7, 33), (2, 512, 1536)])  # tails; many threads
def test_swiglu_kernel_is_pytorchs_bf16_arithmetic_bit_for_bit(shape):
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(shape, generator=gen) * 4).bfloat16()
    u = torch.randn(shape, generator=gen).bfloat16()
    dh = torch.randn(shape, generator=gen).bfloat16()
    # where e^-g overflows or nearly does, and the infinities
    extremes = torch.tensor([-100.0, -88.5, 88.5, 100.0, float("inf"), -float("inf")])
    g.view(-1)[: min(g.numel(), 6)] = extremes[: g.numel()].bfloat16()
    g1, u1 = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    h = F.silu(g1) * u1
    h.backward(dh)
    assert _same(nf4_kernel.swiglu(g, u), h.detach())
    dg, du = nf4_kernel.swiglu_backward(dh, g, u)
    assert _same(dg, g1.grad)
    assert _same(du, u1.grad)


def test_swiglu_kernel_declines_what_it_does_not_compute():
    g = torch.randn(4, 8)
    assert nf4_kernel.swiglu(g, g) is None  # float32
    assert nf4_kernel.swiglu(g.bfloat16(), g[:, :4].bfloat16()) is None  # shapes differ


def _mlp_grads(fused: bool, dtype: torch.dtype):
    model = tiny_model("llama").to(dtype)
    mlp = model.model.layers[0].mlp
    if fused:
        assert fuse_swiglus(model) == model.config.num_hidden_layers
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x = x.to(dtype).requires_grad_(True)
    y = mlp(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, mlp.gate_proj.weight.grad


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float32: its own forward
def test_a_fused_mlp_equals_the_plain_one_forward_and_backward(dtype):
    plain, fused = _mlp_grads(False, dtype), _mlp_grads(True, dtype)
    for a, b in zip(plain, fused, strict=True):
        assert _same(a, b)  # the projections' weight gradients too (a full fine-tune)


@needs_kernel
def test_a_fused_models_lora_gradients_equal_the_plain_models():
    target = "model.layers.0.mlp.up_proj"  # a LoRA inside the fused MLP
    loss, grad, _ = lora_loss_and_grad("qwen2", target)
    fused_loss, fused_grad, count = lora_loss_and_grad("qwen2", target, fuse_swiglus)
    assert count == tiny_model("qwen2").config.num_hidden_layers
    assert torch.equal(fused_loss, loss)
    assert torch.equal(fused_grad, grad)


def test_mlps_without_a_silu_are_left_alone():
    model = tiny_model("llama", hidden_act="gelu")
    assert fuse_swiglus(model) == 0
    assert fuse_swiglus(tiny_model("gpt2")) == 0
