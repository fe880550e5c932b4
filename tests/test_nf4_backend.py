"""Tests for lorakit.kernels.nf4_backend: which implementation runs NF4 tensors, and that
NF4Linear gives the PyTorch reference's outputs and gradients through each one.

The fused backends run here on CPU tensors when forced (LORAKIT_NF4_BACKEND): Triton under its
interpreter (TRITON_INTERPRET=1, which conftest.py sets), bitsandbytes through its
CPU kernels. On a CUDA machine the same tests run on the GPU, where `auto` picks them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.kernels import bnb_nf4, nf4_backend
from lorakit.kernels.nf4_backend import ENV, FusedWeight, backend
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
FUSED = [
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
    pytest.param("bnb", marks=pytest.mark.skipif(not bnb_nf4.available(), reason="no bnb")),
]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(nf4_backend, "_dropped", set())
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' CPU fallback compiles
        yield


def randn(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).to(DEVICE)


# ---- the rule --------------------------------------------------------------------------------


def test_auto_leaves_the_cpu_to_pytorch_and_prefers_triton_then_bnb_on_cuda(monkeypatch):
    assert backend(CPU) == "torch"
    monkeypatch.setattr(nf4_backend, "_triton", lambda: object())
    assert backend(CUDA) == "triton"
    monkeypatch.setattr(nf4_backend, "_triton", lambda: None)
    monkeypatch.setattr(bnb_nf4, "available", lambda: True)
    assert backend(CUDA) == "bnb"
    monkeypatch.setattr(bnb_nf4, "available", lambda: False)
    assert backend(CUDA) == "torch"
    monkeypatch.setenv(ENV, "torch")
    assert backend(CUDA) == "torch"


def test_a_bad_or_unavailable_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(LorakitError, match="auto, torch, triton or bnb"):
        backend(CPU)
    monkeypatch.setenv(ENV, "bnb")
    monkeypatch.setattr(bnb_nf4, "available", lambda: False)
    with pytest.raises(LorakitError, match="pip install bitsandbytes"):
        backend(CUDA)
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setattr(nf4_backend, "_triton", lambda: None)
    with pytest.raises(LorakitError, match="pip install triton"):
        backend(CUDA)


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_forced_triton_runs_cpu_tensors_only_in_the_interpreter(monkeypatch):
    module = nf4_backend._triton()
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setattr(module, "_INTERPRETED", False)
    with pytest.raises(LorakitError, match="TRITON_INTERPRET=1"):
        backend(CPU)
    assert backend(CUDA) == "triton"


def test_a_failing_backend_is_dropped_with_one_warning_in_auto_and_raises_when_forced(
    monkeypatch,
):
    def broken():
        raise RuntimeError("no such GPU")

    with pytest.warns(RuntimeWarning, match="triton NF4 kernels failed.*no such GPU"):
        assert nf4_backend._fused("triton", broken, lambda: "reference") == "reference"
    assert "triton" in nf4_backend._dropped
    assert backend(CUDA) != "triton"
    monkeypatch.setenv(ENV, "bnb")
    with pytest.raises(RuntimeError, match="no such GPU"):
        nf4_backend._fused("bnb", broken, lambda: "reference")


def test_bad_weights_are_refused_before_any_backend(monkeypatch):
    monkeypatch.setattr(nf4_backend, "backend", lambda device: pytest.fail("dispatched"))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_backend.quantize(torch.ones(128), blocksize=63)


# ---- through each backend --------------------------------------------------------------------


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_and_quantize_give_the_reference(monkeypatch, name, double_quant):
    monkeypatch.setenv(ENV, name)
    weight = randn((24, 200), torch.bfloat16)
    state = quantize_nf4(weight, double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nf4_backend.dequantize(state, dtype), dequantize_nf4(state, dtype))
    ours = nf4_backend.quantize(weight, double_quant=double_quant)
    assert torch.equal(ours.packed, state.packed)  # bnb's CPU double quant: see test_bnb_nf4
    assert torch.equal(dequantize_nf4(ours, torch.float32), dequantize_nf4(state, torch.float32))


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4linear_training_step_equals_the_reference(monkeypatch, name, dtype):
    """Forward and backward through the forced backend: the same weight bit for bit, so the
    same outputs and input gradients as the PyTorch chain."""
    weight, bias = randn((40, 72), seed=1), randn((40,), seed=2)
    reference = NF4Linear.from_weight(weight, bias)
    monkeypatch.setenv(ENV, name)
    layer = NF4Linear(reference.state, reference.bias)  # the same buffers
    x = randn((3, 5, 72), dtype, seed=3).requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    grad, x.grad = x.grad, None
    monkeypatch.setenv(ENV, "torch")
    y_ref = reference(x)
    y_ref.backward(torch.ones_like(y_ref))
    assert y.dtype == y_ref.dtype == dtype
    assert torch.equal(y, y_ref) and torch.equal(grad, x.grad)


@pytest.mark.parametrize("name", FUSED)
def test_nf4linear_quantizes_and_decodes_through_the_backend(monkeypatch, name):
    weight = randn((40, 128), seed=4)
    reference = NF4Linear.from_weight(weight).eval()
    monkeypatch.setenv(ENV, name)
    layer = NF4Linear.from_weight(weight).eval()
    assert torch.equal(layer.packed, reference.packed)
    assert isinstance(layer._kernel(layer.packed.device), FusedWeight)
    lora = (randn((4, 128), seed=5) / 8, randn((4, 40), seed=6), 2.0)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = randn((2, 128), dtype, seed=7)
            w = dequantize_nf4(reference.state, dtype).float()
            expected = x.float() @ w.T
            rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
            torch.testing.assert_close(layer(x).float(), expected, rtol=rtol, atol=rtol)
            expected += 2.0 * (x.float() @ lora[0].T) @ lora[1]
            y = layer.decode(x, lora)
            assert y is not None and y.dtype == dtype
            torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=rtol)
    monkeypatch.setenv(ENV, "torch")
    assert not isinstance(layer._kernel(layer.packed.device), FusedWeight)
