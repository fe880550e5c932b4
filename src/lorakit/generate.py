"""Text generation with a KV cache: greedy or sampled, batched, streamed, one adapter per row.

Prompts are left-padded into one batch so every row's next token sits in the last column; each
step feeds only the new tokens and reuses the cache. Temperature 0 is greedy (deterministic).
`adapters` gives each row its own adapter (or None for the bare base) in the same forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import nf4_kernel
from lorakit.decode import lean_decoder
from lorakit.errors import LorakitError
from lorakit.lora import folded_adapters, row_adapters
from lorakit.qlinear import (
    decodes_from_codes,
    dequantized_bytes,
    dequantized_weights,
    free_memory,
)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens with this much probability
    top_k: int = 0  # 0 = no top-k cut
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise LorakitError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LorakitError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LorakitError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LorakitError(f"--top-k must be >= 0, got {self.top_k}")


def context_length(model: nn.Module) -> int | None:
    cfg = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument for the KV cache: transformers 5 renamed `past_key_values` to
    `cache`; older releases know only the former."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Most rows a decoding step sends through the compiled kernel for a bf16 output head: for
# SmolLM2's head it was 3.7x faster than torch's matmul at one row and 1.3x at eight (the head
# table of bench/generation.py); larger steps, not measured, stay with torch.
HEAD_ROWS = 8


@contextmanager
def kernel_head(model: nn.Module) -> Iterator[None]:
    """Within the block, a decoding step's output head (a bf16 `nn.Linear` without bias, no
    grad, at most HEAD_ROWS rows computed in bf16) runs through nf4_kernel.bf16_matmul; any
    other call, and every model whose head is not like that, is left as it is."""
    head = model.get_output_embeddings()
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or not nf4_kernel.head_supports(head.weight, head.weight)
    ):
        yield
        return
    own = head.__dict__.get("forward")  # an instance-level forward (a hook library's) to restore
    original = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
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
        return nf4_kernel.bf16_matmul(x, head.weight)

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def next_tokens(
    logits: torch.Tensor, s: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if s.temperature == 0:
        chosen = nf4_kernel.argmax(logits)  # compiled, bf16 logits on CPU: no float32 copy
        # else float32: the same token, and bf16 argmax is 3-4x slower on CPU
        return chosen if chosen is not None else logits.float().argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the token that crosses p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[list[int]],
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    adapters: Sequence[str | None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    cache_weights: bool | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (eos and stop strings cut off).

    `decode` (ids -> text) is needed for stop strings; `on_token(row, token)` streams tokens.
    `cache_weights` dequantizes NF4 weights once for the whole generation (costs the model's
    size in the compute dtype while it runs); False decodes from the 4-bit codes, with the
    compiled kernel of nf4_kernel.py where it runs (as fast or faster, measured) and by
    dequantizing per token where not; None (default) uses the kernel where it runs, else the
    copy when it takes under half the free memory of the device.
    """
    sampling.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LorakitError("empty prompt; give some text to continue")
    limit = context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + sampling.max_new_tokens > limit:
        raise LorakitError(
            f"prompt ({longest} tokens) + max new tokens ({sampling.max_new_tokens}) exceed the "
            f"model's context of {limit}; shorten the prompt or lower --max-new-tokens"
        )
    device = model.get_input_embeddings().weight.device
    batch = len(prompts)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends in the last column
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_ids = ids
    forward = lean_decoder(model, batch, longest + sampling.max_new_tokens)
    forward = forward or TransformersForward(model)
    per_row = row_adapters(model, adapters) if adapters is not None else nullcontext()
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.dtype
    if cache_weights is None:
        cache_weights = not decodes_from_codes(model, device) and (
            dequantized_bytes(model, dtype) < free_memory(device) / 2
        )
    fast = dequantized_weights(model, dtype) if cache_weights else nullcontext()
    # One adapter set for every row: add it into the cached weights once, not per token.
    fold = folded_adapters(model) if cache_weights and adapters is None else nullcontext()
    with per_row, fast, fold, kernel_head(model):
        for _ in range(sampling.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            logits = forward(step_ids, mask, positions)
            tokens = next_tokens(logits, sampling, generator).tolist()
            for i, t in enumerate(tokens):
                if done[i]:
                    continue
                if t in eos:
                    done[i] = True
                    continue
                out[i].append(t)
                if on_token is not None:
                    on_token(i, t)
                done[i] = _hits_stop(out[i], sampling, decode)
            if all(done):
                break
            step_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [_cut_stop(row, sampling, decode) for row in out]


class TransformersForward:
    """The model's own forward pass with transformers' KV cache, called like
    decode.LeanDecoder: (new ids, mask, positions) -> the last position's logits."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache, self.cache_name = model, None, cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        # the prompt's pass computes logits for its last position only, not the whole prompt
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        result = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_name: self.cache},
            **self.keep,
        )
        self.cache = getattr(result, self.cache_name)
        return result.logits[:, -1]


def _hits_stop(row: list[int], s: Sampling, decode) -> bool:
    return bool(s.stop) and decode is not None and any(x in decode(row) for x in s.stop)


def _cut_stop(row: list[int], s: Sampling, decode) -> list[int]:
    """Drop the tokens from the one that completes a stop string on."""
    if not s.stop or decode is None:
        return row
    for n in range(1, len(row) + 1):
        if any(x in decode(row[:n]) for x in s.stop):
            return row[: n - 1]
    return row
