"""Packed rows where the model keeps examples apart; one example per row where it does not.

Training packs several examples into each row and keeps them apart with a block-diagonal 4-D
mask and positions that restart per example (training/data.py). Most transformers models take
that mask as it is, but not all: BLOOM builds its ALiBi biases from a 2-D (batch, tokens) mask
and fails on a 4-D one, and a model could also take the mask but mix the examples anyway.
So before a run, `keeps_examples_apart` checks what the model does: two short random examples
packed in one row must give the same hidden states as each in its own row. Where they do not
(or the packed forward fails), the run falls back to `unpacked` batches: each example alone in
a row, padded on the right, with the 2-D padding mask every causal LM takes. It costs the
padding, not correctness, and the run says so once.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.models.chat import pad_id
from lorakit.models.precision import autocast
from lorakit.training import data as D
from lorakit.training.loss import last_hidden_state


def unpack(rows: list[D.PackedSequence]) -> list[D.PackedSequence]:
    """Each example of each packed row in a row of its own, in order."""
    out = []
    for row in rows:
        start = 0
        for end in range(1, len(row) + 1):
            if end == len(row) or row.seq_ids[end] != row.seq_ids[start]:
                part = slice(start, end)
                n = end - start
                out.append(
                    D.PackedSequence(row.input_ids[part], row.labels[part], list(range(n)), [0] * n)
                )
                start = end
    return out


def unpacked(rows: list[D.PackedSequence], dtype: torch.dtype, **kwargs) -> dict:
    """`D.collate` of the rows' examples one per row, with a 2-D mask (1 = token, 0 = padding)
    in place of the block-diagonal one."""
    batch = D.collate(unpack(rows), dtype, **kwargs)
    batch["attention_mask"] = (batch.pop("seq_ids") >= 0).long()
    return batch


def keeps_examples_apart(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `model`, as it will train, gives packed examples the hidden states they have
    alone (within the compute dtype's rounding). LorakitError if even one example a row fails."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(vocab, (n,), generator=gen).tolist() for n in (7, 5))
    row = D.PackedSequence(a + b, a + b, [*range(7), *range(5)], [0] * 7 + [1] * 5)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            alone = _hidden(model, unpacked([row], dtype), device)
            try:
                packed = _hidden(model, D.collate([row], dtype), device)
            except Exception:  # noqa: BLE001 - any failure of the packed path means: do not pack
                return False
    except Exception as e:  # noqa: BLE001 - the model cannot run a plain padded batch
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        kind = model.config.model_type
        msg = f"the {kind} model fails a forward pass on a padded batch: {first}"
        raise LorakitError(msg) from None
    finally:
        model.train(was_training)
    reference = torch.cat([alone[0, :7], alone[1, :5]]).float()
    error = (packed[0].float() - reference).abs().max()
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    return bool(error <= tolerance * reference.abs().max().clamp_min(1e-6))


def dataset_batches(
    examples: list[dict], tokenizer, seq_len: int, batch_size: int, dtype, packed: bool = True
) -> list:
    """Examples -> collated batches as training makes them: packed rows, or (`packed=False`)
    the same rows one example a row."""
    rows = D.pack_sequences([D.tokenize_example(e, tokenizer) for e in examples], seq_len)
    how = D.collate if packed else unpacked
    return [
        how(rows[i : i + batch_size], dtype, pad_id=pad_id(tokenizer), pad_multiple=D.ROW_MULTIPLE)
        for i in range(0, len(rows), batch_size)
    ]


def _hidden(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    return last_hidden_state(model, {k: v.to(device) for k, v in batch.items()})
