"""How the next token is chosen: greedy (temperature 0) or sampled with top-k / top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError
from lorakit.kernels.argmax import argmax


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, and when to stop."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens with this much probability
    top_k: int = 0  # 0 = no top-k cut
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    seed: int | None = None

    def validate(self) -> None:
        for key, kinds in (("max_new_tokens", int), ("top_k", int), ("seed", (int, type(None)))):
            value = getattr(self, key)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise LorakitError(f"--{key.replace('_', '-')} must be an integer, got {value!r}")
        for key in ("temperature", "top_p"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                flag = f"--{key.replace('_', '-')}"
                raise LorakitError(f"{flag} must be a finite number, got {value!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise LorakitError(f"stop strings must be strings, got {self.stop!r}")
        if self.max_new_tokens <= 0:
            raise LorakitError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LorakitError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LorakitError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LorakitError(f"--top-k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise LorakitError("a stop string is empty; give --stop TEXT with some text")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) index of each row's largest logit (the first of equals)."""
    chosen = argmax(logits)  # compiled, bf16 logits on CPU: no float32 copy
    # else float32: the same token, and bf16 argmax is 3-4x slower on CPU
    return chosen if chosen is not None else logits.float().argmax(-1)


def next_tokens(
    logits: torch.Tensor, s: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if s.temperature == 0:
        return greedy(logits)
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
