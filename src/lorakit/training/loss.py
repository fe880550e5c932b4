"""The causal-LM loss without full fp32 logits, and evaluation over batches.

Only positions that carry a label are projected to the vocabulary, a chunk at a time. For a
frozen output head (always, with LoRA) `LinearCrossEntropy` computes each chunk's loss and its
gradient with respect to the hidden states in the same pass and keeps only that gradient
(n x hidden), never logits: for SmolLM2's 49k vocabulary and 2k tokens the fp32 logits alone
would be 400 MB, and a checkpointed loss would compute them twice. On CPU with bf16 logits a
chunk's softmax cross-entropy and its gradient run in one compiled pass
(`kernels.cross_entropy`) instead of PyTorch's float32 copy and five passes over it, and
writes the gradient over the logits. Within `reused_logits()` (each training step) all chunks
share one logits buffer: a fresh 25 MB chunk is a fresh mapping from glibc whose every page
faults on first touch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.cross_entropy import cross_entropy
from lorakit.models.packed_attention import attends_by_example, segments_of
from lorakit.quant.linear import release_kernels
from lorakit.training.distributed import ALONE, World, my_passes, sum_floats

# Labelled tokens per chunk: each chunk's fp32 logits (and their bf16 copy) are the loss's whole
# footprint, ~75 MB for a 49k vocabulary, and the head's matmuls run as fast as with 1024.
CHUNK = 256


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on `device`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class _Scratch:
    """The logits buffer shared within `reused_logits()`; None outside it."""

    buffer: torch.Tensor | None = None
    active = False


@contextmanager
def reused_logits() -> Iterator[None]:
    """Within: the loss's chunks of logits (n, V) reuse one buffer, freed on leaving."""
    outer = _Scratch.active
    _Scratch.active = True
    try:
        yield
    finally:
        _Scratch.active = outer
        if not outer:
            _Scratch.buffer = None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight.T, into the shared buffer where one is active (and grown if too small)."""
    if not _Scratch.active or h.dtype != weight.dtype:
        return F.linear(h, weight)
    n, vocab = h.shape[0], weight.shape[0]
    buf = _Scratch.buffer
    if buf is None or buf.dtype != h.dtype or buf.device != h.device or buf.numel() < n * vocab:
        buf = _Scratch.buffer = h.new_empty(n * vocab)
    with torch.autocast(h.device.type, enabled=False):  # both already in the compute dtype
        return torch.mm(h, weight.t(), out=buf[: n * vocab].view(n, vocab))


ROWS = 16  # a chunk's rows are padded to a multiple of this on the compiled path


def _padded_rows(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's hidden rows and labels with zero rows (label 0) up to a multiple of ROWS: the
    last chunk's size varies with every batch, and each new matmul shape costs oneDNN a new
    primitive, kept for the process (see data.ROW_MULTIPLE). Their losses are dropped."""
    extra = -len(y) % ROWS
    if not extra:
        return h, y
    return torch.cat([h, h.new_zeros(extra, h.shape[1])]), torch.cat([y, y.new_zeros(extra)])


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, labels_i) for a frozen weight, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, softcap: float):  # noqa: ANN001
        needs_grad = hidden.requires_grad
        grad = torch.empty_like(hidden) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, labels.numel(), chunk):
            h, y = hidden[i : i + chunk], labels[i : i + chunk]
            n = len(y)
            if not softcap and h.dtype == torch.bfloat16 and h.device.type == "cpu":
                h, y = _padded_rows(h, y)  # for the compiled pass: few matmul shapes
            logits = _chunk_logits(h, weight)  # (n, V): one chunk at a time
            fused = None if softcap else cross_entropy(logits, y, needs_grad, True)
            if fused is not None:  # bf16 logits on CPU: one compiled pass, no float32 copy
                losses, probs = fused  # probs: the logits' buffer, overwritten
                total += losses[:n].sum()
                if probs is not None and len(y) == n:
                    torch.mm(probs, weight.to(h.dtype), out=grad[i : i + n])
                elif probs is not None:  # all the padded rows: an n-row matmul is a new shape
                    grad[i : i + n] = (probs @ weight.to(h.dtype))[:n]
                continue
            logits, y = logits[:n].float(), y[:n]
            if softcap:
                tanh = torch.tanh(logits / softcap)
                logits = softcap * tanh
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if needs_grad:
                # d loss / d logits = softmax - onehot (through the softcap's tanh if any)
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(y), device=y.device), y] -= 1
                if softcap:
                    probs.mul_(1 - tanh.square_())
                grad[i : i + chunk] = probs.to(h.dtype) @ weight.to(h.dtype)
        ctx.save_for_backward(grad if needs_grad else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def _plain_chunk_loss(hidden, weight, labels, chunk: int, softcap: float) -> torch.Tensor:
    """The same sum for a head that trains too (autograd keeps each chunk's logits)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, labels.numel(), chunk):
        logits = F.linear(hidden[i : i + chunk], weight).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + F.cross_entropy(logits, labels[i : i + chunk], reduction="sum")
    return total


def last_hidden_state(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's output (B, T, C) for a collated batch (packed or one example a row)."""
    extra = {}
    if "seq_ids" in batch and attends_by_example(model, batch["seq_ids"].device):
        extra["segments"] = segments_of(batch["seq_ids"])  # attend example by example
    out = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CHUNK):
    """(sum of token losses, number of labelled tokens) without full fp32 logits."""
    hidden = last_hidden_state(model, batch)[:, :-1]  # (B, T-1, C): t predicts token t+1
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden, labels = hidden[keep], labels[keep]  # (n, C), (n,) only tokens that carry loss
    weight = model.get_output_embeddings().weight
    softcap = float(getattr(model.config, "final_logit_softcapping", 0) or 0)
    if weight.requires_grad:
        return _plain_chunk_loss(hidden, weight, labels, chunk, softcap), labels.numel()
    if torch.is_autocast_enabled(hidden.device.type):
        # autograd.Function bodies see autocast too, but be explicit about the matmul dtype.
        compute = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(compute), weight.to(compute)
    return LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap), labels.numel()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[dict],
    device,
    dtype,
    chunk: int,
    world: World = ALONE,
    even: bool = False,
) -> float | None:
    """Mean loss per labelled token over the eval batches; under torchrun each rank takes its
    share (`distributed.my_passes`: `even` for a sharded base) and the sums are combined."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with reused_logits():
        for batch, weight in my_passes(batches, world, even):
            with autocast(device, dtype):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss_sum, n = causal_lm_loss(model, batch, chunk)
            total, count = total + loss_sum.item() * weight, count + n * weight
    total, count = sum_floats([total, count], world)
    model.train(was_training)
    release_kernels(model)  # their scales would sit idle through the training steps that follow
    return total / max(count, 1)
