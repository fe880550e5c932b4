"""One decoder interface for every way lorakit generates: `generate_ids`, the serving engine and
so the CLI and the Python API all feed tokens through a `Decoder`.

A decoder owns a batch of rows and their KV cache. Called with new token ids (B, t), the
attention mask over the cache and them (B, size + t) and their positions (B, t), it runs the
model over them (a prompt's prefill, or one decoding step) and returns the last position's
logits (B, V). Rows are right-aligned (left padding), so the server can join two decoders'
rows (`extend`), drop finished rows (`select`) and cut the columns every row pads (`trim`).

`new_decoder` picks lorakit's lean pass (`lean.LeanDecoder`) where it knows the architecture,
else `TransformersDecoder`, the model's own forward pass over transformers' cache. Both see the
model's modules as they are, so LoRA adapters (one for all rows or one per row), the 4-bit
kernel and a dequantized weight cache all apply. `output_head_kernel` runs the output head of a
decoding step through the compiled bf16 matmul where it applies.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.inference.kv_cache import cat_rows
from lorakit.inference.lean import LeanDecoder, lean_applies
from lorakit.kernels.bf16_matmul import bf16_matmul, head_supports


class Decoder(Protocol):
    """What generation needs of a model and its KV cache (see the module docstring)."""

    @property
    def size(self) -> int: ...  # columns of the cache filled so far

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor: ...

    def select(self, rows: Tensor) -> None: ...  # keep these rows, in this order

    def trim(self, lead: int) -> None: ...  # drop the first `lead` columns (padding everywhere)

    def extend(self, other: Decoder) -> None: ...  # append other's rows, right-aligned

    def adapters_changed(self) -> None: ...  # adapters or weight caches changed since last call


def left_padded(
    prompts: Sequence[list[int]], pad: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Prompts as one batch (ids, attention mask), each (B, longest): every prompt ends in the
    last column, padding (mask 0) on its left."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: Tensor, t: int) -> Tensor:
    """The positions (B, t) of the last t columns of `mask`: each row counts its own tokens."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]


def new_decoder(model: nn.Module, capacity: int, length: int | None = None) -> Decoder:
    """A decoder for sequences of up to `length` tokens (default: `capacity`), its cache sized
    for `capacity` columns at first: lorakit's lean pass where it applies, else the model's
    own forward pass. The choice depends only on the model and `length`, so decoders made
    with the same `length` can be joined."""
    if lean_applies(model, length or capacity):
        return LeanDecoder(model, capacity)
    return TransformersDecoder(model)


def check_joinable(model: nn.Module, length: int) -> None:
    """Refuse a model whose decoders cannot join and drop rows (the server needs that):
    transformers' caches other than full attention's DynamicCache (sliding windows...)."""
    if lean_applies(model, length):
        return
    try:
        from transformers import DynamicCache

        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    except (ImportError, AttributeError, TypeError):
        raise LorakitError(
            "lorakit serve needs transformers' DynamicCache with per-layer tensors "
            "(transformers >= 4.56); upgrade transformers"
        ) from None
    if kinds - {"DynamicLayer"}:
        raise LorakitError(
            f"lorakit serve supports full-attention caches only; this model uses {sorted(kinds)}"
        )


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument for the KV cache: transformers 5 renamed `past_key_values` to
    `cache`; older releases know only the former."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersDecoder:
    """The model's own forward pass with transformers' DynamicCache, as a `Decoder`."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache, self.cache_name = model, None, cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        # the prompt's pass computes logits for its last position only, not the whole prompt
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.size = 0

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        result = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_name: self.cache},
            **self.keep,
        )
        self.cache = getattr(result, self.cache_name)
        self.size += ids.shape[1]
        return result.logits[:, -1]

    def _layers(self) -> list:
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise LorakitError(
                "batching requests needs transformers' DynamicCache with full-attention layers "
                "(transformers >= 4.56); this model's cache is another kind"
            )
        return layers

    def select(self, rows: Tensor) -> None:
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def trim(self, lead: int) -> None:
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        self.size -= lead

    def extend(self, other: TransformersDecoder) -> None:
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = cat_rows(mine.keys, theirs.keys, dim=2)  # (B, heads, T, head_dim)
            mine.values = cat_rows(mine.values, theirs.values, dim=2)
        self.size = max(self.size, other.size)

    def adapters_changed(self) -> None:
        pass  # every call goes through the modules as they are


# Most rows a decoding step sends through the compiled kernel for a bf16 output head: for
# SmolLM2's head it was 3.7x faster than torch's matmul at one row and 1.3x at eight (the head
# table of bench/generation.py); larger steps, not measured, stay with torch.
HEAD_ROWS = 8


@contextmanager
def output_head_kernel(model: nn.Module) -> Iterator[None]:
    """Within the block, a decoding step's output head (a bf16 `nn.Linear` without bias, no
    grad, at most HEAD_ROWS rows computed in bf16) runs through kernels.bf16_matmul; any
    other call, and every model whose head is not like that, is left as it is."""
    head = model.get_output_embeddings()
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or not head_supports(head.weight, head.weight)
    ):
        yield
        return
    own = head.__dict__.get("forward")  # an instance-level forward (a hook library's) to restore
    original = head.forward

    def forward(x: Tensor) -> Tensor:
        cpu_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == (
            torch.bfloat16
        )
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.numel() > HEAD_ROWS * x.shape[-1]
            or not (cpu_bf16 or x.dtype == torch.bfloat16)
        ):
            return original(x)
        y = bf16_matmul(x, head.weight)
        return y if y is not None else original(x)

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
