"""A lean forward pass for generating with LLaMA-style decoders, beside transformers' own.

At batch 1 a decoding step multiplies a few rows by every weight, and transformers' forward
pass spends longer than the matmuls around them: about 3,500 small tensor operations a token
for SmolLM2 (mask building, a cache that concatenates, rotary halves cut and glued, casts).
`LeanDecoder` runs the same layers with a preallocated KV cache, one mask and one rotary table
per step, and the rotation as a roll: the same modules (so LoRA, adapters per row, the 4-bit
kernel and the weight cache all apply), the same arithmetic, a fraction of the operations.

It takes the architectures whose layers it knows (`ARCHITECTURES`: LLaMA, Mistral, Qwen2,
Qwen3) and only models that have every module it calls; `lean_applies` says False for anything
else, and generation keeps transformers' forward pass (`decoder.TransformersDecoder`).
`LORAKIT_LEAN_DECODE=0` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.inference.kv_cache import KVCache
from lorakit.kernels.attention import decode_attention
from lorakit.kernels.nf4_matmul import KernelGroup, KernelWeight
from lorakit.kernels.rms_norm import rms_norm
from lorakit.kernels.rotary import rope_cache
from lorakit.quant.linear import KERNEL_ROWS, KernelCall

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def lean_applies(model: nn.Module, length: int) -> bool:
    """Whether `LeanDecoder` runs this model for sequences of up to `length` tokens: an
    architecture it knows, with every module it calls (else transformers' forward pass does)."""
    config = model.config
    base = getattr(model, "model", None)
    if os.environ.get("LORAKIT_LEAN_DECODE", "1") == "0":
        return False
    if config.model_type not in ARCHITECTURES or base is None:
        return False
    if not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if types - {"full_attention", "sliding_attention"}:
        return False
    if window is not None and types != {"full_attention"} and length > window:
        return False  # a sliding window would cut into this generation: not handled here
    if config._attn_implementation not in ("sdpa", "eager", "lorakit_packed"):
        return False
    layers = list(base.layers[: config.num_hidden_layers])
    return all(
        all(hasattr(layer.self_attn, n) for n in _ATTENTION)
        and all(hasattr(layer.mlp, n) for n in _MLP)
        for layer in layers
    )


Projections = Callable[[Tensor], list[Tensor]]  # x -> each projection's output


def _together(modules: list[nn.Module], decoding: bool) -> Projections:
    """Projections of one input (q/k/v, gate/up; or one alone). For decoding steps, where
    each goes straight to the 4-bit kernel (NF4Linear/LoRALinear.decode_call), one kernel call
    for all of them; else each module as it is. Resolved once per generation: the adapters and
    weight caches stay as they are while it runs."""
    calls = [
        (m.decode_call() if decoding and hasattr(m, "decode_call") else None) or m for m in modules
    ]
    if len(calls) == 1 or not all(
        isinstance(c, KernelCall) and isinstance(c.kernel, KernelWeight) for c in calls
    ):  # one call for several weights: the compiled CPU kernel's; the GPU's go one by one
        return lambda x: [c(x) for c in calls]
    group = KernelGroup([(c.kernel, c.lora) for c in calls])
    layer = calls[0].layer

    def run(x: Tensor) -> list[Tensor]:
        dtype = layer._compute_dtype(x)
        ys = group(x, dtype)  # (no extra terms here: a mixed batch's adapters are in `group`)
        if ys is None:  # the kernel refused: each projection's call, with its PyTorch fallback
            return [c(x) for c in calls]
        return [c.finish(x, y, dtype) for c, y in zip(calls, ys, strict=True)]

    return run


def _layer_calls(layer: nn.Module, decoding: bool) -> list[Projections]:
    """(q, k, v), (o), (gate, up), (down) of one layer."""
    a, m = layer.self_attn, layer.mlp
    groups = [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
    return [_together(g, decoding) for g in groups]


def _rms_norm(norm: nn.Module, h: Tensor) -> Tensor:
    """LlamaRMSNorm's arithmetic (in float32, back to h's dtype, times the weight): one
    compiled call in bf16, else 3 operations instead of its 8."""
    if (out := rms_norm(h, norm.weight, norm.variance_epsilon)) is not None:
        return out
    x = F.rms_norm(h.float(), h.shape[-1:], eps=norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


class LeanDecoder:
    """A `decoder.Decoder` over the model's own layers with lorakit's KV cache (see the module
    docstring): call it with the new ids (B, t), the attention mask over the cache and them
    (B, size + t), and their positions (B, t); it returns the last position's logits (B, V)."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        self.model, self.base = model, model.model
        config = model.config
        self.layers = list(self.base.layers[: config.num_hidden_layers])
        attention = self.layers[0].self_attn
        self.head_dim = getattr(attention, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.scale = getattr(attention, "scaling", None) or self.head_dim**-0.5
        self.kv_heads = config.num_key_value_heads
        self.groups = config.num_attention_heads // self.kv_heads
        self.cache = KVCache(capacity)
        # each layer's projections: as modules (prompts), and straight to the kernel (decoding
        # steps, resolved at the first and again after `adapters_changed`)
        self.plain = [_layer_calls(layer, decoding=False) for layer in self.layers]
        self.calls: list[list[Projections]] | None = None

    @property
    def size(self) -> int:
        return self.cache.size

    def adapters_changed(self) -> None:
        """The adapters or weight caches changed: resolve the kernel calls again."""
        self.calls = None

    def select(self, rows: Tensor) -> None:
        self.cache.select(rows)

    def trim(self, lead: int) -> None:
        self.cache.trim(lead)

    def extend(self, other: LeanDecoder) -> None:
        self.cache.extend(other.cache)

    @torch.no_grad()
    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        b, t = ids.shape
        start, end = self.size, self.size + t
        if self.cache.batch not in (None, b):
            raise ValueError(f"{b} rows fed to a cache of {self.cache.batch}")
        self.cache.reserve(end)
        h = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(h, position_ids=positions)  # (B, t, D) in h's dtype
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin[:half], sin[half:]]
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        rows_cos, rows_sin, cos, sin = cos, sin, cos[:, None], sin[:, None]
        attend = self._mask(mask[:, :end].bool(), t, start)
        decoding = t == 1 and b <= KERNEL_ROWS
        if decoding and self.calls is None:  # the kernel calls, resolved once
            self.calls = [_layer_calls(layer, decoding=True) for layer in self.layers]
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            qkv, o_proj, gate_up, down = self.calls[i] if decoding else self.plain[i]
            x = _rms_norm(layer.input_layernorm, h)
            q, k, v = (y.view(b, t, -1, self.head_dim) for y in qkv(x))
            if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over each head
                q, k = attention.q_norm(q), attention.k_norm(k)
            keys, values = self.cache.layer(i, k)
            # One new position: rotation and cache writes in one compiled call where it runs
            fused = t == 1 and rope_cache(q, k, v, rows_cos, rows_sin, keys, values, start)
            q = q.transpose(1, 2)
            if not fused:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
            o = self._attend(q, keys, values, end, attend)
            h = h + o_proj(o.reshape(b, t, -1))[0]
            x = _rms_norm(layer.post_attention_layernorm, h)
            g, u = gate_up(x)
            h = h + down(layer.mlp.act_fn(g) * u)[0]
        self.cache.size = end
        h = _rms_norm(self.base.norm, h[:, -1:])
        return self.model.get_output_embeddings()(h)[:, -1]

    def _mask(self, keys: Tensor, t: int, start: int) -> Tensor | None:
        """(B, 1, t, T) which keys each new position sees: its row's real tokens up to itself.
        A padding position sees itself too, so that no row of the softmax is empty (its output
        is never used, but a NaN in its keys and values would reach every later position)."""
        if t == 1:
            return None if bool(keys.all()) else keys[:, None, None, :]
        end = start + t
        query = torch.arange(start, end, device=keys.device)[:, None]
        key = torch.arange(end, device=keys.device)[None, :]
        return (keys[:, None, None, :] & (key <= query)) | (key == query)

    def _attend(
        self, q: Tensor, keys: Tensor, values: Tensor, end: int, mask: Tensor | None
    ) -> Tensor:
        """q (B, H, t, D) over a layer's cached keys and values up to `end` -> (B, t, H, D)."""
        b, heads, t, d = q.shape
        scale = self.scale
        k, v = keys[:, :, :end], values[:, :, :end]
        if t == 1:
            rows = None if mask is None else mask[:, 0, 0]
            o = decode_attention(q, keys, values, end, rows, scale)
            if o is not None:
                return o
            # one query per head: a group of heads sharing keys is a set of queries
            grouped = q.reshape(b, self.kv_heads, self.groups, d)
            o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
            return o.reshape(b, 1, heads, d)
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.transpose(1, 2)
