"""The compiled NF4 matmul: the same products as dequantizing first, where it runs at all."""

import copy as copy_module

import pytest
import torch

from lorakit import kernels
from lorakit.quant import linear as qlinear
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

needs_kernel = pytest.mark.skipif(
    kernels._build.library() is None, reason="no C compiler or no AVX2 on this machine"
)


@needs_kernel
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: one group of 8 rows, then 3
@pytest.mark.parametrize("n_in", [256, 1280])  # 1280: x of many rows is cut into input tiles
def test_kernel_equals_dequantize_then_matmul(double_quant, blocksize, rows, n_in):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, n_in, generator=g) * 0.05
    state = quantize_nf4(weight, blocksize, double_quant)
    assert kernels.nf4_matmul.supports(state, torch.device("cpu"))
    x = torch.randn(2, rows, n_in, generator=g)
    exact = x.double() @ dequantize_nf4(state, torch.float64).T
    got = kernels.nf4_matmul.nf4_matmul(x, state, torch.float32)
    assert got.shape == (2, rows, 96)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    in_bf16 = kernels.nf4_matmul.nf4_matmul(x, state, torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(in_bf16, got.bfloat16())
    # bf16 activations: the products may run in bf16 (AVX512-BF16), float32 sums.
    xb = x.bfloat16()
    exact_b = xb.double() @ dequantize_nf4(state, torch.float64).T
    low = kernels.nf4_matmul.nf4_matmul(xb, state, torch.bfloat16).double()
    assert (low - exact_b).abs().max() < 1e-2 * exact_b.abs().max()


@needs_kernel
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("rows", [1, 2, 8, 11])  # 1 and 2 outputs at a time; 8 rows, then 3
@pytest.mark.parametrize("n_out", [80, 81])  # 81: a tile ends in a single output
def test_bf16_products_are_exact_products_of_the_bf16_dequantized_weight(blocksize, rows, n_out):
    """With bf16 activations the products run in bf16 where the CPU has AVX512-BF16: each weight
    is its bf16 dequantized value (code * scale in float32, rounded once: dequantize_nf4's bits),
    times x, summed in float32 (float32 products elsewhere). Only the float32 sums and the bf16
    result may differ from that; a lane paired with the wrong element of x, a scale of the
    wrong block or output, or a code rounded before its scale would be off by more."""
    g = torch.Generator().manual_seed(blocksize + rows + n_out)
    state = quantize_nf4(torch.randn(n_out, 1280, generator=g) * 0.05, blocksize, True)
    weight = dequantize_nf4(
        state, torch.bfloat16 if kernels.nf4_matmul.bf16_products() else torch.float64
    )
    x = torch.randn(rows, 1280, generator=g).bfloat16()
    exact = x.double() @ weight.double().T
    got = kernels.nf4_matmul.nf4_matmul(x, state, torch.bfloat16)
    torch.testing.assert_close(got.double(), exact.bfloat16().double(), rtol=1e-2, atol=1e-4)
    assert (got.double() - exact).abs().max() < 5e-3 * exact.abs().max()  # bf16 rounding


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 10])
def test_bf16_head_kernel_equals_a_bf16_linear(rows):
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(1000, 192, generator=g) * 0.05).bfloat16()
    x = torch.randn(2, rows, 192, generator=g).bfloat16()
    assert kernels.bf16_matmul.head_supports(weight, x)
    exact = x.double() @ weight.double().T
    got = kernels.bf16_matmul.bf16_matmul(x, weight)
    assert got.shape == (2, rows, 1000) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact.bfloat16().double(), rtol=1e-2, atol=1e-3)
    assert not kernels.bf16_matmul.head_supports(weight.float(), x)
    assert not kernels.bf16_matmul.head_supports(weight[:, :100], x)


@needs_kernel
def test_rms_norm_is_llama_rms_norm_to_the_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, generator=g)
    x = (torch.randn(3, 2, 576, generator=g) * 4).bfloat16()
    with torch.no_grad():
        assert torch.equal(kernels.rms_norm.rms_norm(x, norm.weight, 1e-5), norm(x))
    assert kernels.rms_norm.rms_norm(x.float(), norm.weight, 1e-5) is None  # bf16 only


@needs_kernel
@pytest.mark.parametrize("batch", [1, 8])  # 8: enough work for the threads
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_equals_sdpa(batch, head_dim):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, length, t = 9, 3, 300, 257
    q = torch.randn(batch, heads, 1, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g).bfloat16() for _ in "kv")
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[0, :40] = False  # a left-padded row
    got = kernels.attention.decode_attention(q, k, v, t, mask, 0.1)
    full = [x[:, :, :t].double().repeat_interleave(3, dim=1) for x in (k, v)]
    exact = F.scaled_dot_product_attention(
        q.double(), *full, attn_mask=mask[:, None, None, :], scale=0.1
    ).transpose(1, 2)
    assert got.shape == (batch, 1, heads, head_dim) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)
    assert torch.equal(
        kernels.attention.decode_attention(q, k, v, t, None, 0.1),
        kernels.attention.decode_attention(q, k, v, t, torch.ones_like(mask), 0.1),
    )
    assert kernels.attention.decode_attention(q.float(), k, v, t, mask, 0.1) is None


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 30])
def test_rope_cache_is_transformers_rotary_to_the_bit(head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(head_dim)
    b, heads, kv_heads, length, pos = 3, 9, 3, 20, 7
    q = torch.randn(b, 1, heads, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(b, 1, kv_heads, head_dim, generator=g).bfloat16() for _ in "kv")
    angles = torch.rand(b, 1, head_dim // 2, generator=g) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    keys, values = (torch.zeros(b, kv_heads, length, head_dim, dtype=torch.bfloat16) for _ in "kv")
    half = head_dim // 2
    folded = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    rotated = q.clone()
    assert kernels.rotary.rope_cache(rotated, k, v, cos, folded, keys, values, pos)
    assert torch.equal(rotated.transpose(1, 2), ref_q)
    assert torch.equal(keys[:, :, pos : pos + 1], ref_k)
    assert torch.equal(values[:, :, pos : pos + 1], v.transpose(1, 2))
    assert not keys[:, :, :pos].any() and not keys[:, :, pos + 1 :].any()  # nothing else
    assert not kernels.rotary.rope_cache(q.float(), k, v, cos, folded, keys, values, pos)


@needs_kernel
def test_argmax_is_torchs():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 49152, generator=g) * 3).bfloat16()
    logits[3, 100] = logits[3, 7000] = 50  # ties: the first
    logits[5] = -torch.rand(49152, generator=g).bfloat16() - 1  # all negative
    assert torch.equal(kernels.argmax.argmax(logits), logits.float().argmax(-1))
    assert kernels.argmax.argmax(logits.float()) is None


@needs_kernel
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_kernel_dequantizes_to_the_same_bits(double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    state = quantize_nf4(torch.randn(96, 640, generator=g) * 0.05, blocksize, double_quant)
    kernel = kernels.nf4_matmul.KernelWeight(state)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(kernel.dequantize(dtype), dequantize_nf4(state, dtype))
    assert kernel.dequantize(torch.float16) is None  # PyTorch's path does that one
    layer = NF4Linear(state)  # the weight cache and prompts use it
    assert torch.equal(
        layer.dequantized_weight(torch.bfloat16), dequantize_nf4(state, torch.bfloat16)
    )


def test_shapes_the_kernel_does_not_take():
    cpu = torch.device("cpu")
    rows_split = quantize_nf4(torch.randn(4, 96), 64)  # a block would span two rows
    assert not kernels.nf4_matmul.supports(rows_split, cpu)
    assert not kernels.nf4_matmul.supports(quantize_nf4(torch.randn(2, 3, 64), 64), cpu)  # 3-D


@needs_kernel
def test_a_decoding_layer_uses_the_kernel_and_training_does_not(monkeypatch):
    layer = NF4Linear.from_weight(torch.randn(64, 128) * 0.05).eval()
    calls = []
    call = kernels.nf4_matmul.KernelWeight.__call__
    monkeypatch.setattr(
        kernels.nf4_matmul.KernelWeight, "__call__", lambda *a: calls.append(1) or call(*a)
    )
    x = torch.randn(1, 2, 128)
    reference = x @ layer.dequantized_weight(torch.float32).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        layer(torch.randn(1, qlinear.KERNEL_ROWS + 1, 128))  # a prompt: dequantized instead
        assert len(calls) == 1
        layer.train()
        layer(x)  # no-grad training passes (reentrant checkpointing) keep the autograd path
    layer(x)
    assert len(calls) == 1
    copy = copy_module.deepcopy(layer).eval()  # prepares its own call, on its own buffers
    with torch.no_grad():
        torch.testing.assert_close(copy(x), reference, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n_out", [96, 90])  # 90: outputs left over after whole vectors
def test_an_adapter_added_in_the_kernel_call_equals_the_lora_formula(rows, n_out):
    from lorakit.lora.layer import LoRALinear

    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(NF4Linear.from_weight(torch.randn(n_out, 128, generator=g) * 0.05))
    layer.add_adapter("a", rank=8, alpha=16)
    torch.nn.init.normal_(layer.lora_B["a"].weight, std=0.1)
    layer.eval()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(1, rows, 128, generator=g)
    w = layer.base_layer.dequantized_weight(torch.float64)
    exact = x.double() @ w.T + 2.0 * (x.double() @ a.double().T) @ b.double().T
    state = layer.base_layer.state
    torch.testing.assert_close(
        kernels.nf4_matmul.nf4_matmul(
            x, state, torch.float32, (a, b.t().contiguous(), 2.0)
        ).double(),
        exact,
        rtol=1e-5,
        atol=1e-5,
    )
    with torch.no_grad():
        assert layer.base_layer.decode(x) is not None  # the fused path is the one taken
        torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_call_equals_each_weights_call(dtype):
    g = torch.Generator().manual_seed(1)
    weights = [
        kernels.nf4_matmul.KernelWeight(quantize_nf4(torch.randn(n_out, 256, generator=g) * 0.05))
        for n_out in (96, 32, 64)
    ]
    lora = (torch.randn(4, 256, generator=g), torch.randn(4, 32, generator=g), 0.5)  # A, B.T
    loras = [None, lora, None]
    x = torch.randn(3, 1, 256, generator=g).to(dtype)
    group = kernels.nf4_matmul.KernelGroup(list(zip(weights, loras, strict=True)))
    got = group(x, dtype)
    for y, k, lo in zip(got, weights, loras, strict=True):
        assert y.dtype == dtype and y.shape == (3, 1, k.shape[0])
        assert torch.equal(y, k(x, dtype, lo))
