"""A batch whose rows use different adapters (`layer.row_adapters`): each row's LoRA term.

Grouping the rows by adapter costs a gather, two small matmuls and a scatter per adapter per
layer, whose fixed costs add up at decoding sizes (a batch of 8 over 4 adapters ran at 0.49x of
the same batch on one adapter). Instead, where it is cheap, the batch's adapters are laid side
by side: A_all (sum of ranks, in) and B_all (out, sum of ranks), built once while the batch keeps
its adapters, and a mask (rows, sum of ranks) holds each row's scaling on its own adapter's
columns and zero elsewhere. Then

    delta = ((x @ A_all.T) * mask) @ B_all.T

is two matmuls for the whole batch, of any ranks (no padding). Each row's value is its own
adapter's `scaling * B (A x)`: the other adapters' terms are multiplied by an exact zero.
It computes every adapter's A x for every row, so it is used while the adapters' ranks add up
to no more work than the base layer's own matmul; past that (dozens of adapters in one batch),
the rows are grouped by adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lorakit.lora.layer import LoRALinear


def row_delta(layer: LoRALinear, x: Tensor, rows: Sequence[str | None]) -> Tensor:
    """The LoRA term of every row of `x` (rows[i]: row i's adapter, None or an adapter this
    layer lacks: none), in the adapters' dtype or autocast's; shaped like the layer's output."""
    names = [n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A]
    out_shape = (*x.shape[:-1], layer.out_features)
    if not names:
        return x.new_zeros(out_shape)
    total = sum(layer.lora_A[n].weight.shape[0] for n in names)
    base_work = layer.in_features * layer.out_features
    if layer.training or total * (layer.in_features + layer.out_features) > base_work:
        return _grouped(layer, x, rows, names)  # (training: each adapter's dropout applies)
    a_all, b_all, mask = _side_by_side(layer, rows, names)
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(a_all.dtype)
    mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    return ((x @ a_all.T) * mask.to(x.dtype)) @ b_all.T


def _side_by_side(
    layer: LoRALinear, rows: Sequence[str | None], names: list[str]
) -> tuple[Tensor, Tensor, Tensor]:
    """(A_all, B_all, mask) for these rows, kept on the layer while its adapters and the
    batch's rows stay the same (a decoding run: every step)."""
    weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    key = (tuple(rows), tuple((id(a), a._version, id(b), b._version) for a, b in weights))
    cached = layer.__dict__.get("_side_by_side")
    if cached is not None and cached[0] == key:
        return cached[1]
    a_all = torch.cat([a for a, _ in weights]).detach()
    b_all = torch.cat([b for _, b in weights], dim=1).detach()
    mask = torch.zeros(len(rows), a_all.shape[0], dtype=a_all.dtype, device=a_all.device)
    columns, first = {}, 0
    for n, (a, _) in zip(names, weights, strict=True):
        columns[n] = slice(first, first + a.shape[0])
        first += a.shape[0]
    for i, n in enumerate(rows):
        if n in columns:
            mask[i, columns[n]] = layer.scaling[n]
    layer.__dict__["_side_by_side"] = (key, (a_all, b_all, mask))
    return a_all, b_all, mask


def _grouped(layer: LoRALinear, x: Tensor, rows: Sequence[str | None], names: list[str]) -> Tensor:
    """The same by groups of rows, one adapter at a time (many adapters in one batch)."""
    out = None
    for n in names:
        idx = torch.tensor([i for i, r in enumerate(rows) if r == n], device=x.device)
        delta = layer._delta(x[idx], n)
        if out is None:
            out = delta.new_zeros((*x.shape[:-1], layer.out_features))
        out[idx] = delta
    return out
