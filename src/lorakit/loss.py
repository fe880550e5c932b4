"""The causal-LM loss without full fp32 logits, and evaluation over batches.

Only positions that carry a label are projected to the vocabulary, in chunks whose logits are
recomputed in backward (activation checkpointing), so the (tokens x vocabulary) fp32 logits
never exist at once: for SmolLM2's 49k vocabulary and 2k tokens that is 400 MB saved per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on `device`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float):
    logits = F.linear(hidden, weight).float()  # (n, V), one chunk at a time
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024):
    """(sum of token losses, number of labelled tokens) without full fp32 logits."""
    out = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, C): position t predicts token t+1
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden, labels = hidden[keep], labels[keep]  # (n, C), (n,) only tokens that carry loss
    weight = model.get_output_embeddings().weight
    softcap = float(getattr(model.config, "final_logit_softcapping", 0) or 0)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, labels.numel(), chunk):
        h, y = hidden[i : i + chunk], labels[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, y, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y, softcap)
    return total, labels.numel()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device, dtype, chunk: int) -> float | None:
    """Mean loss per labelled token over the eval batches."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast(device, dtype):
            loss_sum, n = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}, chunk)
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def dataset_batches(examples: list[dict], tokenizer, seq_len: int, batch_size: int, dtype) -> list:
    """Examples -> packed, collated batches (the same packing as training)."""
    from lorakit import data as D

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = D.pack_sequences([D.tokenize_example(e, tokenizer) for e in examples], seq_len)
    return [
        D.collate(rows[i : i + batch_size], dtype, pad_id=pad or 0)
        for i in range(0, len(rows), batch_size)
    ]
