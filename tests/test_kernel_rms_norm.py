"""kernels.rms_norm: LlamaRMSNorm in one compiled pass, bit for bit (rms_norm_reference and
transformers' own module), its gradient as autograd's over that arithmetic, and what it does
not take it declines."""

import pytest
import torch
from conftest import needs_kernel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.kernels.rms_norm import rms_norm, rms_norm_backward, rms_norm_reference


def _norm_and_input(n: int, rows: int) -> tuple[LlamaRMSNorm, torch.Tensor]:
    g = torch.Generator().manual_seed(n + rows)
    norm = LlamaRMSNorm(n, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, generator=g)
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    return norm, (torch.randn(3, rows, n, generator=g) * 4).bfloat16()


@needs_kernel
@pytest.mark.parametrize("rows", [2, 100])  # 100: the rows split across threads
@pytest.mark.parametrize("n", [576, 100])  # 100: a tail after whole vectors
def test_rms_norm_is_llama_rms_norm_to_the_bit(n, rows):
    norm, x = _norm_and_input(n, rows)
    got = rms_norm(x, norm.weight, 1e-5)
    with torch.no_grad():
        assert torch.equal(got, norm(x))
    assert torch.equal(got, rms_norm_reference(x, norm.weight, 1e-5))


@needs_kernel
@pytest.mark.parametrize("n", [576, 100])
def test_rms_norm_backward_is_autograds_over_the_reference(n):
    norm, x = _norm_and_input(n, 70)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    leaf = x.clone().requires_grad_(True)
    rms_norm_reference(leaf, norm.weight, 1e-5).backward(dy)
    got = rms_norm_backward(dy, x, norm.weight, 1e-5)
    assert got.dtype == torch.bfloat16
    # float32 sums in another order, then bf16: at most a bf16 step apart, most equal
    torch.testing.assert_close(got, leaf.grad, rtol=2**-7, atol=1e-3)
    assert (got == leaf.grad).float().mean() > 0.95


@needs_kernel
def test_what_rms_norm_does_not_take():
    norm, x = _norm_and_input(64, 2)
    assert rms_norm(x.float(), norm.weight, 1e-5) is None  # bf16 only
    assert rms_norm(x, norm.weight.float(), 1e-5) is None
    assert rms_norm(x, norm.weight[:32], 1e-5) is None  # a weight of another size
    assert rms_norm_backward(x[:, :1], x, norm.weight, 1e-5) is None  # dy of another shape
    assert rms_norm_backward(x.float(), x, norm.weight, 1e-5) is None
