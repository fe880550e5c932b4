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


# Most adapters on a layer that are laid side by side all together (kept until one is loaded or
# unloaded), instead of only a batch's (laid out again whenever its set of adapters changes):
# under a server's churn the batch's set changes at nearly every step.
POOL = 64


@dataclass
class _Stack:
    """Adapters of one layer side by side, kept while they and their weights stay the same."""

    names: tuple[str, ...]
    weights: list[Tensor]  # their A and B, whose versions tell an in-place update
    versions: list[int]
    a_all: Tensor  # (sum of ranks, in)
    b_all: Tensor  # (out, sum of ranks)
    columns: dict[str, tuple[int, int]]  # each adapter's columns: first, end
    bt: Tensor | None = None  # b_all transposed, contiguous: the kernel's layout

    def fresh(self) -> bool:
        return all(w._version == v for w, v in zip(self.weights, self.versions, strict=True))


@dataclass
class _Plan:
    """How one batch's rows run on one layer, kept while the batch keeps its rows."""

    rows: tuple[str | None, ...]
    stack: _Stack | None  # None: no row has an adapter on this layer
    side_by_side: bool = False  # else grouped by adapter (PyTorch's path)
    mask: Tensor | None = None  # (rows, sum of ranks): 1 on the row's adapter's columns
    scale: Tensor | None = None  # (rows,): the row's adapter's scaling
    scaled: Tensor | None = None  # mask * scale, for float32 inputs (one product fewer)
    spans: Tensor | None = None  # (rows, 2) int64: the row's adapter's columns, first and end

    @property
    def names(self) -> list[str]:
        return (
            []
            if self.stack is None
            else [n for n in dict.fromkeys(self.rows) if n in self.stack.columns]
        )


def forget(layer: LoRALinear) -> None:
    """Drop what the layer keeps for mixed batches (its adapters changed)."""
    layer.__dict__.pop("_side_by_side", None)
    layer.__dict__.pop("_stack", None)


def row_delta(layer: LoRALinear, x: Tensor, rows: Sequence[str | None]) -> Tensor:
    """The LoRA term of every row of `x` (rows[i]: row i's adapter, None or an adapter this
    layer lacks: none), in the adapters' dtype or autocast's; shaped like the layer's output."""
    plan = _current(layer, rows)
    if plan.stack is None:
        return x.new_zeros((*x.shape[:-1], layer.out_features))
    if layer.training or not plan.side_by_side:  # (training: each adapter's dropout applies)
        return _grouped(layer, x, rows, plan.names)
    stack = plan.stack
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(stack.a_all.dtype)
    ones = [1] * (x.dim() - 2)
    if x.dtype == torch.float32:
        return ((x @ stack.a_all.T) * plan.scaled.view(len(rows), *ones, -1)) @ stack.b_all.T
    mask, scale = plan.mask.view(len(rows), *ones, -1), plan.scale.view(-1, *ones, 1)
    # the scaling last, as `LoRALinear._delta` applies it: the same roundings in 16 bits
    return (((x @ stack.a_all.T) * mask.to(x.dtype)) @ stack.b_all.T) * scale


def kernel_lora(layer: LoRALinear, rows: Sequence[str | None]) -> tuple | None:
    """The batch's adapters as the compiled 4-bit kernel takes a mixed batch's (SGMV: each row
    multiplies only its own adapter's A and B, inside the layer's own call;
    kernels.nf4_matmul.LoRA); None where no row has an adapter on this layer or the adapters
    are not float32."""
    plan = _current(layer, rows)
    stack = plan.stack
    if stack is None or stack.a_all.dtype != torch.float32:
        return None
    if stack.bt is None:
        stack.bt = stack.b_all.T.contiguous()
    return (stack.a_all, stack.bt, 1.0, plan.spans, plan.scale)


def _current(layer: LoRALinear, rows: Sequence[str | None]) -> _Plan:
    """The layer's plan for these rows: the one kept, or a new one (on the stack kept, or a
    new one)."""
    key = tuple(rows)
    plan = layer.__dict__.get("_side_by_side")
    if plan is not None and plan.rows == key and (plan.stack is None or plan.stack.fresh()):
        return plan
    plan = layer.__dict__["_side_by_side"] = _plan(layer, key, _stack(layer, key))
    return plan


def _stack(layer: LoRALinear, rows: tuple[str | None, ...]) -> _Stack | None:
    wanted = [n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A]
    if not wanted:
        return None
    names = tuple(layer.lora_A) if len(layer.lora_A) <= POOL else tuple(wanted)
    kept = layer.__dict__.get("_stack")
    if kept is not None and kept.names == names and kept.fresh():
        return kept
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    weights = [w for pair in pairs for w in pair]
    columns, first = {}, 0
    for n, (a, _) in zip(names, pairs, strict=True):
        columns[n] = (first, first + a.shape[0])
        first += a.shape[0]
    a_all = torch.cat([a for a, _ in pairs]).detach().contiguous()
    b_all = torch.cat([b for _, b in pairs], dim=1).detach()
    stack = _Stack(names, weights, [w._version for w in weights], a_all, b_all, columns)
    layer.__dict__["_stack"] = stack
    return stack


def _plan(layer: LoRALinear, rows: tuple[str | None, ...], stack: _Stack | None) -> _Plan:
    if stack is None:
        return _Plan(rows, None)
    total = stack.a_all.shape[0]
    cheap = total * (layer.in_features + layer.out_features) <= (
        layer.in_features * layer.out_features
    )
    spans = [stack.columns.get(n, (0, 0)) for n in rows]
    scales = [layer.scaling[n] if n in stack.columns else 0.0 for n in rows]
    like = {"dtype": stack.a_all.dtype, "device": stack.a_all.device}
    plan = _Plan(rows, stack, cheap)
    plan.spans = torch.tensor(spans, dtype=torch.int64)
    plan.scale = torch.tensor(scales, **like)
    cols = torch.arange(total, device=stack.a_all.device)
    ends = plan.spans.to(stack.a_all.device)
    plan.mask = ((cols >= ends[:, :1]) & (cols < ends[:, 1:])).to(stack.a_all.dtype)
    plan.scaled = plan.mask * plan.scale[:, None]
    return plan


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
