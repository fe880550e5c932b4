"""The KV cache of lorakit's lean decoder, and the row operations continuous batching needs.

Rows are right-aligned: each row's tokens fill the last columns of the cache and padding sits
on the left (attention mask 0), as generation lays prompts out. So rows of different lengths
can be joined (`extend`: the shorter side is left-padded), dropped (`select`) and the columns
that are padding in every row cut off (`trim`), and a row's keys and values never move relative
to its own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cat_rows(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Rows of a, then rows of b; the shorter one left-padded with zeros along `dim`."""
    length = max(a.shape[dim], b.shape[dim])

    def pad(x: Tensor) -> Tensor:
        return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [length - x.shape[dim], 0])

    return torch.cat([pad(a), pad(b)])


class KVCache:
    """Per layer, keys and values (B, kv heads, capacity, head dim), allocated at the first
    token; columns [0, size) hold what was fed so far. Decoding writes in place (no
    concatenation per token); the capacity doubles when a run outgrows it."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size = capacity, 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @property
    def batch(self) -> int | None:
        return self.keys[0].shape[0] if self.keys else None

    def layer(self, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Layer i's whole key and value buffers; allocated like `like` (B, t, kv heads, head
        dim) on first use."""
        if len(self.keys) <= i:
            b, _, heads, dim = like.shape
            shape = (b, heads, self.capacity, dim)
            self.keys.append(like.new_empty(shape))
            self.values.append(like.new_empty(shape))
        return self.keys[i], self.values[i]

    def reserve(self, end: int) -> None:
        """Room for `end` columns, growing every buffer (to at least twice its size) if needed."""
        if end <= self.capacity:
            return
        capacity = max(end, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.size] = old[:, :, : self.size]
                buffers[i] = new
        self.capacity = capacity

    def select(self, rows: Tensor) -> None:
        """Keep these rows (indices, in this order)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def trim(self, lead: int) -> None:
        """Drop the first `lead` columns (padding in every row)."""
        if lead <= 0:
            return
        self.keys = [k[:, :, lead:].contiguous() for k in self.keys]
        self.values = [v[:, :, lead:].contiguous() for v in self.values]
        self.size, self.capacity = self.size - lead, self.capacity - lead

    def extend(self, other: KVCache) -> None:
        """Append other's rows after ours, both right-aligned at the longer one's size."""
        size = max(self.size, other.size)
        room = max(self.capacity - self.size, other.capacity - other.size)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                joined = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], size + room, a.shape[3])
                joined[: a.shape[0], :, size - self.size : size] = a[:, :, : self.size]
                joined[a.shape[0] :, :, size - other.size : size] = b[:, :, : other.size]
                mine[i] = joined
        self.size, self.capacity = size, size + room
