"""A batch mixing adapters (lora.rows): every row gets its own adapter's term, whether the
batch's adapters run side by side (two matmuls) or grouped by adapter, and on a 4-bit base the
decoding steps keep the compiled kernel's grouped calls, the rows' terms added after."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lorakit import kernels
from lorakit.inference.generate import generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.lora.layer import (
    LoRALinear,
    attach_lora,
    lora_layers,
    row_adapters,
    set_active_adapters,
)
from lorakit.lora.rows import row_delta


def _layer(ranks: dict[str, int], features=(48, 40)) -> LoRALinear:
    torch.manual_seed(0)  # the base layer's and the A matrices' init
    layer = LoRALinear(torch.nn.Linear(*features))
    gen = torch.Generator().manual_seed(0)
    for name, rank in ranks.items():
        layer.add_adapter(name, rank, alpha=2 * rank + 1)
        layer.lora_B[name].weight.data = torch.randn(features[1], rank, generator=gen)
    return layer.eval()


@pytest.mark.parametrize("shape", [(5, 48), (5, 3, 48)])  # decoding rows; prompts of 3 tokens
def test_each_row_gets_its_own_adapter_side_by_side_or_grouped(shape):
    layer = _layer({"a": 2, "b": 4, "c": 3})
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rows = ["a", None, "b", "a", "nope"]  # none, and a name this layer lacks: no term
    want = torch.zeros(*shape[:-1], 40)
    for i, r in enumerate(rows):
        if r in layer.lora_A:
            want[i] = layer._delta(x[i : i + 1], r)[0]
    side_by_side = row_delta(layer, x, rows)
    assert layer.__dict__["_side_by_side"].side_by_side  # a, b: 6 ranks, less than the layer's
    torch.testing.assert_close(side_by_side, want, rtol=1e-5, atol=1e-5)
    layer.train()  # training (each adapter's dropout) groups the rows instead
    torch.testing.assert_close(row_delta(layer, x, rows), want, rtol=1e-5, atol=1e-5)
    layer.eval()
    # the same rows later reuse the laid-out adapters; changed weights are seen
    assert row_delta(layer, x, rows) is not None
    with torch.no_grad():
        layer.lora_B["b"].weight.mul_(2)
    want[2] *= 2
    torch.testing.assert_close(row_delta(layer, x, rows), want, rtol=1e-5, atol=1e-5)


def test_many_adapters_in_one_batch_are_grouped_with_the_same_terms():
    ranks = {f"r{i}": 8 for i in range(6)}  # 48 ranks x (48 + 40) > 48 x 40: grouped
    layer = _layer(ranks)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(2))
    rows = list(ranks)
    got = row_delta(layer, x, rows)
    assert not layer.__dict__["_side_by_side"].side_by_side
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i], layer._delta(x[i : i + 1], r)[0])


NO_KERNEL = pytest.mark.skipif(
    kernels._build.library() is None, reason="no C compiler or no AVX2 on this machine"
)


@NO_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_takes_each_rows_adapter_columns_like_one_adapter_calls(dtype):
    """SGMV in the compiled kernel: A and B of the batch's adapters side by side, row i on its
    span of them at its scale, equals each row's call with its adapter alone."""
    from lorakit.kernels.nf4_matmul import KernelWeight, nf4_matmul_reference
    from lorakit.quant.nf4 import quantize_nf4

    gen = torch.Generator().manual_seed(0)
    state = quantize_nf4(torch.randn(96, 128, generator=gen))
    kernel = KernelWeight(state)
    ranks, scales = (4, 8), (2.0, 0.5)
    a = [torch.randn(r, 128, generator=gen) for r in ranks]
    bt = [torch.randn(r, 96, generator=gen) for r in ranks]
    x = torch.randn(5, 128, generator=gen).to(dtype)
    row_of = [0, None, 1, 1, 0]  # which adapter each row takes (None: no adapter)
    spans = torch.tensor([[0, 4] if r == 0 else [4, 12] if r == 1 else [0, 0] for r in row_of])
    row_scales = torch.tensor([scales[r] if r is not None else 0.0 for r in row_of])
    lora = (torch.cat(a), torch.cat(bt), 1.0, spans, row_scales)
    got = kernel(x, torch.float32, lora)
    for i, r in enumerate(row_of):
        one = None if r is None else (a[r], bt[r], scales[r])
        torch.testing.assert_close(got[i : i + 1], kernel(x[i : i + 1], torch.float32, one))
    torch.testing.assert_close(got, nf4_matmul_reference(x, state, torch.float32, lora))
    assert kernel(x[:3], torch.float32, lora) is None  # spans for 5 rows, not 3: refused


@NO_KERNEL
def test_a_mixed_batch_on_a_4bit_base_decodes_through_the_kernel_like_rows_alone(tmp_path):
    from lorakit.models.loading import load_model

    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    model, _, _ = load_model(tmp_path, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    for i, adapter in enumerate(("a", "b")):
        attach_lora(model, names, adapter, rank=2 + 2 * i, alpha=8)
        for _, layer in lora_layers(model):
            g = torch.Generator().manual_seed(i)
            torch.nn.init.normal_(layer.lora_B[adapter].weight, std=0.5, generator=g)
    model.eval()
    rows = ["a", None, "b", "b"]
    prompts = [[1, 5, 9], [7, 7], [3, 4, 5, 6], [2]]
    with row_adapters(model, rows):
        layer = model.get_submodule(names[0])
        call = layer.decode_call()
        assert call is not None and len(call.lora) == 5  # each row's adapter in the kernel's call
    with torch.no_grad():
        mixed = generate_ids(model, prompts, Sampling(max_new_tokens=8), adapters=rows)
    for prompt, adapter, got in zip(prompts, rows, mixed, strict=True):
        set_active_adapters(model, [adapter] if adapter else [])
        with torch.no_grad():
            assert got == generate_ids(model, [prompt], Sampling(max_new_tokens=8))[0]
    assert len({tuple(m) for m in mixed[:3]}) == 3  # the adapters change the answers
