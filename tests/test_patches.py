"""Training's faster forwards (models.patches): the same results as transformers' own modules,
forward and backward, and every patch undone when the context ends."""

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from conftest import lora_loss_and_grad, needs_kernel, tiny_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.models.packed_attention import PACKED
from lorakit.models.patches import _fused_rotary, training_patches

ORIGINAL = llama.apply_rotary_pos_emb


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and a.dtype == b.dtype


# --- RMSNorm -------------------------------------------------------------------------------------


def _norm(n: int, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(n, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 1)
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    return norm


@needs_kernel
@pytest.mark.parametrize("rows", [3, 200])  # 200: the rows split across threads
@pytest.mark.parametrize("n", [64, 100])
def test_patched_rms_norm_equals_llamas_forward_and_backward(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(2, rows, n, generator=g) * 3).bfloat16()
    dy = torch.randn(2, rows, n, generator=g).bfloat16()
    plain, fused = _norm(n, n), _norm(n, n)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = plain(x1)
    with training_patches(fused) as report:
        assert report["norms"] == 1
        y2 = fused(x2)
    assert torch.equal(y1, y2)  # lk_rms_norm is LlamaRMSNorm bit for bit
    y1.backward(dy)
    y2.backward(dy)
    assert x2.grad.dtype == torch.bfloat16
    # float32 sums in another order, then bf16: at most a bf16 step apart, most equal
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2**-7, atol=1e-3)
    assert (x2.grad == x1.grad).float().mean() > 0.95


@needs_kernel
def test_a_trainable_weight_or_float32_keeps_the_norms_own_forward():
    norm = _norm(64, 0)
    with training_patches(norm):
        norm.weight.requires_grad_(True)
        x = torch.randn(4, 64).bfloat16()
        norm(x).sum().backward()
        assert norm.weight.grad is not None  # autograd's path: the weight gets its gradient
        norm.weight.requires_grad_(False)
        assert norm.float()(x.float()).dtype == torch.float32


# --- SwiGLU --------------------------------------------------------------------------------------


def _mlp_grads(patched: bool, dtype: torch.dtype):
    model = tiny_model("llama").to(dtype)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x = x.to(dtype).requires_grad_(True)
    with training_patches(model, packed_attention=False) if patched else _nothing():
        y = mlp(x)
        y.backward(torch.ones_like(y))
    return y.detach(), x.grad, mlp.gate_proj.weight.grad


class _nothing:
    def __enter__(self):  # noqa: ANN204
        return None

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        return False


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float32: its own forward
def test_a_patched_mlp_equals_the_plain_one_forward_and_backward(dtype):
    plain, fused = _mlp_grads(False, dtype), _mlp_grads(True, dtype)
    for a, b in zip(plain, fused, strict=True):
        assert _same(a, b)  # the projections' weight gradients too (a full fine-tune)


def test_mlps_without_a_silu_are_left_alone():
    with training_patches(tiny_model("llama", hidden_act="gelu")) as report:
        assert report["mlps"] == 0
    with training_patches(tiny_model("gpt2")) as report:
        assert (report["norms"], report["mlps"], report["rotary"]) == (0, 0, 0)


# --- rotary --------------------------------------------------------------------------------------


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
def test_patched_rotary_is_transformers_bit_for_bit_both_ways(b, t, heads, kv_heads, d, cos_batch):
    q, k, cos, sin = _inputs(b, t, heads, kv_heads, d, cos_batch, seed=t + d)
    results = []
    for apply in (ORIGINAL, _fused_rotary(ORIGINAL)):
        q1, k1 = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        qe, ke = apply(q1, k1, cos, sin)
        gen = torch.Generator().manual_seed(1)
        dq = torch.randn(qe.shape, generator=gen).bfloat16()
        torch.autograd.backward([qe, ke], [dq, torch.randn(ke.shape, generator=gen).bfloat16()])
        results.append((qe.detach(), ke.detach(), q1.grad, k1.grad))
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)


@needs_kernel
def test_what_the_rotary_kernel_does_not_cover_runs_transformers_function():
    q, k, cos, sin = _inputs(1, 6, 2, 1, 8, 1, seed=0)
    fused = _fused_rotary(ORIGINAL)
    for args in [  # float32; batch-first layout (unsqueeze_dim=2)
        (q.float(), k.float(), cos.float(), sin.float(), 1),
        (q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2),
    ]:
        for got, want in zip(fused(*args), ORIGINAL(*args), strict=True):
            assert torch.equal(got, want)


# --- a whole model -------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize(
    "kind, target",
    [
        ("llama", "model.layers.0.self_attn.q_proj"),  # norms, rotary, MLPs around it
        ("qwen2", "model.layers.0.mlp.up_proj"),  # a LoRA inside a patched MLP
    ],
)
def test_a_patched_models_lora_gradients_equal_the_plain_models(kind, target):
    loss, grad, _ = lora_loss_and_grad(kind, target)
    patched_loss, patched_grad, report = lora_loss_and_grad(kind, target, patched=True)
    layers = tiny_model(kind).config.num_hidden_layers
    assert report["norms"] == 2 * layers + 1 and report["mlps"] == layers
    assert report["rotary"] == 1
    torch.testing.assert_close(patched_loss, loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(patched_grad, grad, rtol=0.05, atol=1e-3)


def test_leaving_the_context_puts_everything_back():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    norm = model.model.norm
    with training_patches(model) as report:
        assert report["attention"] and model.config._attn_implementation == PACKED
        assert "forward" in norm.__dict__ and llama.apply_rotary_pos_emb is not ORIGINAL
        with training_patches(model):  # nested: the rotary function is wrapped once
            assert llama.apply_rotary_pos_emb.lorakit_original is ORIGINAL
        assert llama.apply_rotary_pos_emb is not ORIGINAL  # the outer context still holds
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in norm.__dict__
    assert llama.apply_rotary_pos_emb is ORIGINAL
    assert all("forward" not in m.__dict__ for m in model.modules())
