"""Training's compiled rotary embedding equals transformers' apply_rotary_pos_emb."""

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from conftest import lora_loss_and_grad, tiny_model

from lorakit import nf4_kernel
from lorakit.rotary import _fused, fuse_rotary

needs_kernel = pytest.mark.skipif(
    nf4_kernel.library() is None, reason="no C compiler or no AVX2 on this machine"
)
ORIGINAL = getattr(llama.apply_rotary_pos_emb, "lorakit_original", llama.apply_rotary_pos_emb)


def _inputs(b, t, heads, kv_heads, d, cos_batch, seed):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(seed)

    def projected(h):  # noqa: ANN001, ANN202  # (b, h, t, d) viewed from (b, t, h * d)
        return torch.randn(b, t, h * d, generator=gen).bfloat16().view(b, t, h, d).transpose(1, 2)

    cos = torch.randn(cos_batch, t, d, generator=gen).bfloat16()
    sin = torch.randn(cos_batch, t, d, generator=gen).bfloat16()
    return projected(heads), projected(kv_heads), cos, sin


@needs_kernel
@pytest.mark.parametrize(
    "b, t, heads, kv_heads, d, cos_batch",
    [(1, 512, 9, 3, 64, 1), (2, 7, 4, 2, 128, 2), (2, 7, 4, 2, 64, 1), (1, 5, 2, 1, 6, 1)],
)  # the model's shape; batches with and without their own positions; a head too small to vector
def test_fused_rotary_is_transformers_bit_for_bit_both_ways(b, t, heads, kv_heads, d, cos_batch):
    q, k, cos, sin = _inputs(b, t, heads, kv_heads, d, cos_batch, seed=t + d)
    results = []
    for apply in (ORIGINAL, _fused(ORIGINAL)):
        q1, k1 = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        qe, ke = apply(q1, k1, cos, sin)
        gen = torch.Generator().manual_seed(1)
        dq = torch.randn(qe.shape, generator=gen).bfloat16()
        torch.autograd.backward([qe, ke], [dq, torch.randn(ke.shape, generator=gen).bfloat16()])
        results.append((qe.detach(), ke.detach(), q1.grad, k1.grad))
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)


@needs_kernel
def test_what_the_kernel_does_not_cover_runs_transformers_function():
    q, k, cos, sin = _inputs(1, 6, 2, 1, 8, 1, seed=0)
    fused = _fused(ORIGINAL)
    for args in [  # float32; batch-first layout (unsqueeze_dim=2)
        (q.float(), k.float(), cos.float(), sin.float(), 1),
        (q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2),
    ]:
        for got, want in zip(fused(*args), ORIGINAL(*args), strict=True):
            assert torch.equal(got, want)


@needs_kernel
def test_a_fused_models_lora_gradients_equal_the_plain_models(monkeypatch):
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", ORIGINAL)  # unfused, whatever ran before
    target = "model.layers.0.self_attn.q_proj"
    loss, grad, _ = lora_loss_and_grad("llama", target)
    fused_loss, fused_grad, count = lora_loss_and_grad("llama", target, fuse_rotary)
    assert count == 1 and llama.apply_rotary_pos_emb is not ORIGINAL
    assert torch.equal(fused_loss, loss)
    assert torch.equal(fused_grad, grad)


def test_fusing_twice_wraps_once_and_other_architectures_are_left_alone():
    model = tiny_model("llama")
    fuse_rotary(model)
    fuse_rotary(model)
    assert llama.apply_rotary_pos_emb.lorakit_original is ORIGINAL
    assert fuse_rotary(tiny_model("gpt2")) == 0
