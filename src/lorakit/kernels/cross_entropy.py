"""Softmax cross-entropy over bf16 logits and its gradient in one compiled pass per row, for
the training loss (training.loss), instead of a float32 copy of the chunk and five passes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels._build import bf16_cpu, function, i32, i64, ptr, threads


def cross_entropy(
    logits: Tensor, labels: Tensor, with_grad: bool, in_place: bool = False
) -> tuple[Tensor, Tensor | None] | None:
    """(n, V) bf16 logits, (n,) labels -> (each row's cross-entropy in float32, and where
    `with_grad` softmax - onehot in bf16: the summed loss's gradient with respect to the
    logits), the float32 arithmetic of PyTorch's path over a float32 copy. `in_place` writes
    that gradient over the (contiguous) logits. None where it does not apply (other dtypes, no
    library, a label out of range: PyTorch's path reports it), the logits then untouched."""
    # logits, rows, n, labels (int64), loss per row (float32), gradient (bf16) or None, threads
    fn = function("lk_cross_entropy_bf16", ptr, i64, i64, ptr, ptr, ptr, i32)
    if fn is None or not bf16_cpu(logits) or logits.dim() != 2 or labels.shape != logits.shape[:1]:
        return None
    if in_place and not logits.is_contiguous():
        return None
    logits, labels = logits.contiguous(), labels.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    grad = (logits if in_place else torch.empty_like(logits)) if with_grad else None
    status = fn(
        logits.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        labels.data_ptr(),
        loss.data_ptr(),
        grad.data_ptr() if grad is not None else None,
        threads(),
    )
    return (loss, grad) if status == 0 else None


def cross_entropy_reference(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's float32 path: each row's loss and softmax - onehot in bf16."""
    x = logits.float()
    loss = F.cross_entropy(x, labels, reduction="none")
    grad = x.softmax(-1)
    grad[torch.arange(len(labels)), labels] -= 1
    return loss, grad.to(logits.dtype)
