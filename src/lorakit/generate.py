"""Text generation from a base model with or without adapters.

Prompts are left-padded into one batch and decoded with transformers' `generate` (KV cache);
temperature 0 is greedy and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError


def context_length(model: nn.Module) -> int | None:
    cfg = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), stopping at eos."""
    if max_new_tokens <= 0:
        raise LorakitError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    limit = context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise LorakitError(
            f"prompt ({longest} tokens) + max new tokens ({max_new_tokens}) exceed the model's "
            f"context of {limit}; shorten the prompt or lower --max-new-tokens"
        )
    device = model.get_input_embeddings().weight.device
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[i, longest - len(p) :] = torch.tensor(p)
        attention_mask[i, longest - len(p) :] = 1
    sample = temperature > 0
    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if sample else {}
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **options,
    )
    results = []
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    for row in out[:, longest:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results
