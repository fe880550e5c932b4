"""Tests for lorakit.quant.linear.NF4Linear: same numbers as a plain linear layer over the
dequantized weight, no gradient and no trainable parameter for the weight, autocast,
activation checkpointing, that backward keeps only the packed weight alive, and decoding steps
through the compiled kernel (with PyTorch's result where it refuses)."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.kernels.nf4_matmul import KernelWeight
from lorakit.lora.layer import LoRALinear
from lorakit.quant import linear as qlinear
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

IN, OUT = 256, 192


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_layer(bias: bool = True, double_quant: bool = True) -> NF4Linear:
    b = randn(OUT, seed=2) if bias else None
    return NF4Linear.from_weight(randn(OUT, IN, seed=1), b, double_quant=double_quant)


def reference(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute: a plain linear layer over the dequantized weight."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantized_weight(x.dtype), bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_input_grad_equal_reference(bias, double_quant):
    layer = make_layer(bias, double_quant)
    x = randn(2, 5, IN).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), reference(layer, x_ref)
    assert y.shape == (2, 5, OUT)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    grad = randn(2, 5, OUT, seed=3)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def test_weight_is_frozen_buffers_not_parameters():
    layer = make_layer(bias=False)
    assert list(layer.parameters()) == []
    assert {name for name, _ in layer.named_buffers()} == {
        "packed",
        "absmax",
        "absmax_scale",
        "absmax_code",
    }
    with_bias = make_layer(bias=True)
    assert [name for name, _ in with_bias.named_parameters()] == ["bias"]
    assert not with_bias.bias.requires_grad
    x = randn(3, IN).requires_grad_()
    with_bias(x).sum().backward()
    assert x.grad is not None
    assert with_bias.bias.grad is None
    assert all(buf.grad is None for buf in with_bias.buffers())


def test_trainable_bias_gets_its_gradient():
    layer = make_layer(bias=True)
    layer.bias.requires_grad_(True)
    layer(randn(4, IN)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((OUT,), 4.0))


def test_from_linear_approximates_the_linear():
    linear = nn.Linear(IN, OUT)
    layer = NF4Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert torch.equal(layer.bias, linear.bias) and layer.bias is not linear.bias
    x = randn(8, IN)
    expected = linear(x)
    err = (layer(x) - expected).norm() / expected.norm()
    assert err < 0.1  # NF4 keeps ~1 significant digit per weight; outputs stay close


def test_autocast_bf16():
    layer = make_layer()
    x = randn(4, IN).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.detach().bfloat16(), layer.dequantized_weight(torch.bfloat16))
    expected = expected + layer.bias.bfloat16()
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    ones = torch.ones(4, OUT, dtype=torch.bfloat16)
    expected_grad = (ones @ layer.dequantized_weight(torch.bfloat16)).float()
    torch.testing.assert_close(x.grad, expected_grad)


def test_bf16_input_without_autocast():
    layer = make_layer()
    x = randn(4, IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # The bias is added after the bf16 matmul (not fused into it), so compare with exactly that.
    weight = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(y, F.linear(x, weight) + layer.bias.bfloat16())
    torch.testing.assert_close(y, reference(layer, x), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    layer = make_layer()
    x = randn(3, IN).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = checkpoint(layer, x, use_reentrant=use_reentrant)
    y_ref = layer(x_ref)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_weight_gives_the_same_forward_and_grad_without_dequantizing(dtype, monkeypatch):
    import lorakit.quant.linear as Q

    layer = make_layer()
    x = randn(2, 5, IN, dtype=dtype).requires_grad_()
    y = layer(x)
    y.backward(randn(2, 5, OUT, dtype=dtype, seed=3))
    expected_y, expected_grad = y.detach(), x.grad
    x.grad = None
    with Q.dequantized_weights(layer, dtype):
        calls = []
        monkeypatch.setattr(Q, "dequantize_nf4", lambda *a: calls.append(a))  # must not run
        y = layer(x)
        y.backward(randn(2, 5, OUT, dtype=dtype, seed=3))
        with torch.no_grad():
            y_nograd = layer(x)
    assert not calls
    torch.testing.assert_close(y.detach(), expected_y, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, expected_grad, atol=0, rtol=0)
    torch.testing.assert_close(y_nograd, expected_y, atol=0, rtol=0)
    assert "_cached_weight" not in layer.__dict__  # released on leaving the block


def test_backward_saves_only_the_packed_weight():
    layer = make_layer()
    x = randn(16, IN).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    state = layer.state
    state_bytes = sum(
        t.numel() * t.element_size()
        for t in (state.packed, state.absmax, state.absmax_scale, state.absmax_code)
    )
    assert saved_bytes == state_bytes  # ~OUT*IN/2 bytes; no activation is needed either
    assert saved_bytes < OUT * IN * 2 / 3  # a bf16 copy of the weight alone would be OUT*IN*2
    assert all(t.numel() < OUT * IN for t in saved)
    y.sum().backward()  # and backward works from what was saved
    assert x.grad.shape == x.shape


def test_inplace_change_of_the_weight_before_backward_is_caught():
    layer = make_layer()
    x = randn(2, IN).requires_grad_()
    y = layer(x)
    layer.packed.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_module_to_dtype_keeps_the_quantized_weight():
    layer = make_layer()
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(), before)  # scales were not rounded to bf16
    layer.half()
    assert torch.equal(layer.dequantized_weight(), before)


def test_state_matches_a_fresh_quantization():
    weight = randn(OUT, IN, seed=1)
    layer = NF4Linear.from_weight(weight)
    assert torch.equal(layer.dequantized_weight(), dequantize_nf4(layer.state))
    assert layer.dequantized_weight().shape == (OUT, IN)
    assert layer.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16
    assert layer.state.bits_per_parameter < 4.2


def test_no_grad_inference():
    layer = make_layer()
    with torch.no_grad():
        y = layer(randn(3, IN))
    assert not y.requires_grad


def test_repr_and_state_dict():
    layer = make_layer()
    text = repr(layer)
    assert f"in_features={IN}" in text and f"out_features={OUT}" in text and "nf4" in text
    assert set(layer.state_dict()) == {"packed", "absmax", "absmax_scale", "absmax_code", "bias"}


def test_rejects_non_2d_weight():
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_weight(torch.randn(4, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    layer = make_layer().cuda()
    assert layer.packed.is_cuda
    x = randn(4, IN).cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.is_cuda
    y.float().sum().backward()
    assert x.grad.is_cuda and x.grad.dtype == torch.float32


def test_free_memory_counts_the_page_cache_the_system_can_drop():
    import os

    from lorakit.quant.linear import free_memory

    page = os.sysconf("SC_PAGE_SIZE")
    free_pages = os.sysconf("SC_AVPHYS_PAGES") * page
    total = os.sysconf("SC_PHYS_PAGES") * page
    available = free_memory(torch.device("cpu"))
    assert free_pages - (64 << 20) <= available <= total  # 64 MB: the two reads are not atomic


# --- decoding through the compiled kernel (kernels.nf4_matmul) ---------------------------------


@needs_kernel
def test_a_decoding_layer_uses_the_kernel_and_training_does_not(monkeypatch):
    layer = NF4Linear.from_weight(torch.randn(64, 128) * 0.05).eval()
    calls = []
    call = KernelWeight.__call__
    monkeypatch.setattr(KernelWeight, "__call__", lambda *a: calls.append(1) or call(*a))
    x = torch.randn(1, 2, 128)
    expected = x @ layer.dequantized_weight(torch.float32).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        layer(torch.randn(1, qlinear.KERNEL_ROWS + 1, 128))  # a prompt: dequantized instead
        assert len(calls) == 1
        layer.train()
        layer(x)  # no-grad training passes (reentrant checkpointing) keep the autograd path
    layer(x)
    assert len(calls) == 1
    copy = copy_module.deepcopy(layer).eval()  # prepares its own call, on its own buffers
    with torch.no_grad():
        torch.testing.assert_close(copy(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("lora", [False, True])
def test_a_kernel_call_that_is_refused_gives_pytorchs_result(lora, monkeypatch):
    """A nonzero status (no memory for the kernel's buffers): the same product in PyTorch."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(NF4Linear.from_weight(torch.randn(96, 128, generator=g) * 0.05))
    if lora:
        layer.add_adapter("a", rank=8, alpha=16)
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.1, generator=g)
    layer.eval()
    x = torch.randn(1, 3, 128, generator=g)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(KernelWeight, "__call__", lambda *args: None)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5])
def test_a_decoding_step_adds_the_adapter_in_the_kernel_call(rows):
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(NF4Linear.from_weight(torch.randn(90, 128, generator=g) * 0.05))
    layer.add_adapter("a", rank=8, alpha=16)
    torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.1, generator=g)
    layer.eval()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(1, rows, 128, generator=g)
    w = layer.base_layer.dequantized_weight(torch.float64)
    exact = x.double() @ w.T + 2.0 * (x.double() @ a.double().T) @ b.double().T
    with torch.no_grad():
        assert layer.decode_call() is not None  # the fused path is the one taken
        torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-5)


def test_dequantized_weight_is_dequantize_nf4s_bits():
    """From the compiled dequantization where it runs (the weight cache and prompts use it)."""
    state = quantize_nf4(randn(96, 640, seed=4) * 0.05)
    layer = NF4Linear(state)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layer.dequantized_weight(dtype), dequantize_nf4(state, dtype))
