"""kernels.cross_entropy: the training loss's softmax cross-entropy over bf16 logits and its
gradient equal PyTorch's float32 path (cross_entropy_reference), in place too; what it does
not take it declines, the logits untouched."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel

from lorakit.kernels.cross_entropy import cross_entropy, cross_entropy_reference


def _logits(vocab: int, rows: int = 37):  # noqa: ANN202
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).bfloat16()
    return logits, torch.randint(0, vocab, (rows,), generator=g)


@needs_kernel
@pytest.mark.parametrize("vocab", [1000, 4096, 4103])  # 1000, 4103: a tail after whole vectors
def test_compiled_cross_entropy_equals_pytorchs(vocab):
    logits, labels = _logits(vocab)
    losses, grad = cross_entropy(logits, labels, with_grad=True)
    ref_losses, ref_grad = cross_entropy_reference(logits, labels)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses, F.cross_entropy(logits.float(), labels, reduction="none"))
    assert grad.dtype == torch.bfloat16
    exact = torch.softmax(logits.float(), dim=-1) - F.one_hot(labels, vocab).float()
    torch.testing.assert_close(grad.float(), exact, rtol=2**-7, atol=1e-7)  # bf16 rounding
    torch.testing.assert_close(grad, ref_grad, rtol=2**-7, atol=1e-7)
    assert cross_entropy(logits, labels, with_grad=False)[1] is None
    # In place: the same bits, written over the logits.
    losses2, grad2 = cross_entropy(logits, labels, True, in_place=True)
    assert grad2.data_ptr() == logits.data_ptr()
    assert torch.equal(losses2, losses) and torch.equal(grad2, grad)


@needs_kernel
def test_what_cross_entropy_does_not_take():
    logits, labels = _logits(1000)
    kept = logits.clone()
    assert cross_entropy(logits.float(), labels, True) is None  # bf16 only
    assert cross_entropy(logits, labels[:5], True) is None  # a label per row
    assert cross_entropy(logits[:, ::2], labels, True, in_place=True) is None  # not contiguous
    # A label out of range: a nonzero status before anything is written (PyTorch's path then
    # reports it), in place too.
    assert cross_entropy(logits, torch.full_like(labels, 1000), True) is None
    assert cross_entropy(logits, torch.full_like(labels, -1), True, in_place=True) is None
    assert torch.equal(logits, kept)
