"""A batch whose rows use different adapters (`layer.row_adapters`): each row's LoRA term.

Grouping the rows by adapter costs a gather, two small matmuls and a scatter per adapter per
layer, whose fixed costs add up at decoding sizes (a batch of 8 over 4 adapters ran at 0.49x of
the same batch on one adapter). Instead, where it is cheap, the batch's adapters are laid side
by side: A_all (sum of ranks, in) and B_all (out, sum of ranks), built once while the batch keeps
its adapters, a mask (rows, sum of ranks) is 1 on each row's own adapter's columns and 0
elsewhere, and `scale` holds each row's adapter's scaling. Then

    delta = (((x @ A_all.T) * mask) @ B_all.T) * scale

is two matmuls for the whole batch, of any ranks (no padding). Each row's value is its own
adapter's `scaling * B (A x)`: the other adapters' terms are multiplied by an exact zero.
It computes every adapter's A x for every row, so it is used while the adapters' ranks add up
to no more work than the base layer's own matmul; past that (dozens of adapters in one batch),
the rows are grouped by adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lorakit.lora.layer import LoRALinear


@dataclass
class _Plan:
    """How one batch's rows run on one layer, kept on the layer (`_side_by_side`) while the
    batch keeps its rows and the adapters' weights stay as they are (a decoding run)."""

    rows: tuple[str | None, ...]
    names: list[str]  # the adapters among the rows that this layer has
    weights: list[Tensor]  # their A and B, whose versions tell an in-place update
    versions: list[int]
    side_by_side: bool  # else grouped by adapter
    a_all: Tensor | None = None  # (sum of ranks, in)
    b_all: Tensor | None = None  # (out, sum of ranks)
    mask: Tensor | None = None  # (rows, sum of ranks): 1 on the row's adapter's columns
    scale: Tensor | None = None  # (rows,): the row's adapter's scaling
    scaled: Tensor | None = None  # mask * scale, for float32 inputs (one product fewer)
    spans: Tensor | None = None  # (rows, 2) int64: the row's adapter's columns, first and end

    def fresh(self) -> bool:
        return all(w._version == v for w, v in zip(self.weights, self.versions, strict=True))


def row_delta(layer: LoRALinear, x: Tensor, rows: Sequence[str | None]) -> Tensor:
    """The LoRA term of every row of `x` (rows[i]: row i's adapter, None or an adapter this
    layer lacks: none), in the adapters' dtype or autocast's; shaped like the layer's output."""
    plan = _current(layer, rows)
    if not plan.names:
        return x.new_zeros((*x.shape[:-1], layer.out_features))
    if layer.training or not plan.side_by_side:  # (training: each adapter's dropout applies)
        return _grouped(layer, x, rows, plan.names)
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(plan.a_all.dtype)
    ones = [1] * (x.dim() - 2)
    if x.dtype == torch.float32:
        return ((x @ plan.a_all.T) * plan.scaled.view(len(rows), *ones, -1)) @ plan.b_all.T
    mask, scale = plan.mask.view(len(rows), *ones, -1), plan.scale.view(-1, *ones, 1)
    # the scaling last, as `LoRALinear._delta` applies it: the same roundings in 16 bits
    return (((x @ plan.a_all.T) * mask.to(x.dtype)) @ plan.b_all.T) * scale


def _current(layer: LoRALinear, rows: Sequence[str | None]) -> _Plan:
    """The layer's plan for these rows: the one kept, or a new one."""
    key = tuple(rows)
    plan = layer.__dict__.get("_side_by_side")
    if plan is None or plan.rows != key or not plan.fresh():
        plan = layer.__dict__["_side_by_side"] = _plan(layer, key)
    return plan


def _plan(layer: LoRALinear, rows: tuple[str | None, ...]) -> _Plan:
    names = [n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A]
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    weights = [w for pair in pairs for w in pair]
    total = sum(a.shape[0] for a, _ in pairs)
    cheap = total * (layer.in_features + layer.out_features) <= (
        layer.in_features * layer.out_features
    )
    plan = _Plan(rows, names, weights, [w._version for w in weights], cheap)
    if not names:
        return plan
    plan.a_all = torch.cat([a for a, _ in pairs]).detach()
    plan.b_all = torch.cat([b for _, b in pairs], dim=1).detach()
    like = {"dtype": plan.a_all.dtype, "device": plan.a_all.device}
    plan.mask = torch.zeros(len(rows), total, **like)
    plan.scale = torch.zeros(len(rows), **like)
    plan.spans = torch.zeros(len(rows), 2, dtype=torch.int64)
    columns, first = {}, 0
    for n, (a, _) in zip(names, pairs, strict=True):
        columns[n] = slice(first, first + a.shape[0])
        first += a.shape[0]
    for i, n in enumerate(rows):
        if n in columns:
            plan.mask[i, columns[n]], plan.scale[i] = 1.0, layer.scaling[n]
            plan.spans[i] = torch.tensor([columns[n].start, columns[n].stop])
    plan.scaled = plan.mask * plan.scale[:, None]
    return plan


def kernel_lora(layer: LoRALinear, rows: Sequence[str | None]) -> tuple | None:
    """The batch's adapters as the compiled 4-bit kernel takes a mixed batch's (SGMV: each row
    multiplies only its own adapter's A and B, inside the layer's own call;
    kernels.nf4_matmul.LoRA); None where no row has an adapter on this layer or the adapters
    are not float32."""
    plan = _current(layer, rows)
    if not plan.names or plan.a_all.dtype != torch.float32:
        return None
    if "bt" not in plan.__dict__:
        plan.__dict__["bt"] = plan.b_all.T.contiguous()
    return (plan.a_all.contiguous(), plan.__dict__["bt"], 1.0, plan.spans, plan.scale)


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
