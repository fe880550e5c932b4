"""Text generation: `generate` (text in, text out: what the CLI and the Python API use) over
`generate_ids` (token ids, batched, one adapter per row).

Prompts are left-padded into one batch so every row's next token sits in the last column; the
prompt is fed once (prefill), then one token per step, through one `decoder.Decoder`.
Temperature 0 is greedy (deterministic). Stop strings are cut by `stream.TextStream`, exactly
and never half a UTF-8 character.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.decoder import left_padded, new_decoder, output_head_kernel, positions
from lorakit.inference.sampling import Sampling, next_tokens
from lorakit.inference.stream import TextStream
from lorakit.lora.layer import active_adapters, adapter_names, folded_adapters, row_adapters
from lorakit.models.chat import encode_prompt, pad_id
from lorakit.models.loading import context_length
from lorakit.models.precision import autocast
from lorakit.quant.linear import dequantized_weights, use_weight_cache

# on_token(row, token) -> True to end that row (its token kept), None or False to go on
OnToken = Callable[[int, int], bool | None]


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context."""
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise LorakitError(
            f"prompt ({prompt_tokens} tokens) + max new tokens ({max_new_tokens}) exceed the "
            f"model's context of {limit}; shorten the prompt or lower --max-new-tokens"
        )


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[list[int]],
    sampling: Sampling | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    adapters: Sequence[str | None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: OnToken | None = None,
    cache_weights: bool | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, without the eos and without the token that completes a
    stop string (stop strings need `decode`, ids -> text).

    `adapters` gives each row its own adapter (None: the bare base); without it every row runs
    the model's active adapters. `on_token(row, token)` sees every kept token and may end its
    row by returning True. `cache_weights`: None follows `quant.linear.use_weight_cache`; True
    dequantizes the NF4 weights once for the whole generation; False never.
    """
    sampling = sampling or Sampling()
    sampling.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LorakitError("empty prompt; give some text to continue")
    vocab = model.get_input_embeddings().num_embeddings
    outside = next((t for p in prompts for t in p if not 0 <= t < vocab), None)
    if outside is not None:
        raise LorakitError(
            f"token id {outside} is outside the model's vocabulary of {vocab}; encode prompts "
            "with this model's own tokenizer"
        )
    longest = max(len(p) for p in prompts)
    check_context(model, longest, sampling.max_new_tokens)
    device = model.get_input_embeddings().weight.device
    batch = len(prompts)
    step_ids, mask = left_padded(prompts, pad_id, device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = bool(sampling.stop) and decode is not None
    streams = [TextStream(decode, sampling.stop) if stops else None for _ in range(batch)]
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    decoder = new_decoder(model, longest + sampling.max_new_tokens)
    with ExitStack() as stack:
        _set_up(stack, model, device, adapters, cache_weights)
        for _ in range(sampling.max_new_tokens):
            logits = decoder(step_ids, mask, positions(mask, step_ids.shape[1]))
            tokens = next_tokens(logits, sampling, generator).tolist()
            for i, t in enumerate(tokens):
                if done[i] or t in eos:
                    done[i] = True
                    continue
                stream = streams[i]
                if stream is not None:
                    stream.push(t)
                    if stream.stopped:  # the token completing a stop string is not kept
                        done[i] = True
                        continue
                out[i].append(t)
                done[i] = bool(on_token is not None and on_token(i, t))
            if all(done):
                break
            step_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def _set_up(
    stack: ExitStack,
    model: nn.Module,
    device: torch.device,
    adapters: Sequence[str | None] | None,
    cache_weights: bool | None,
) -> None:
    """Enter what a generation runs under: per-row adapters, the weight cache (with the active
    adapters added into it once, when every row runs them), the output head's kernel."""
    if (
        adapters is not None
        and len(set(adapters)) == 1
        and adapters[0] in {None, *adapter_names(model)}
    ):
        # every row on one adapter: run it as the active one (the kernel adds it in its call)
        stack.enter_context(active_adapters(model, [adapters[0]] if adapters[0] else []))
        adapters = None
    if adapters is not None:
        stack.enter_context(row_adapters(model, adapters))
    autocast_on = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast_on else model.dtype
    if cache_weights is None:
        cache_weights = use_weight_cache(model, dtype, device)
    if cache_weights:
        stack.enter_context(dequantized_weights(model, dtype))
        if adapters is None:  # one adapter set for every row: into the cached weights once
            stack.enter_context(folded_adapters(model))
    stack.enter_context(output_head_kernel(model))


def _sampling(settings: dict[str, Any]) -> Sampling:
    """A `Sampling` from generate's keyword arguments (stop: a string or a list of them)."""
    known = [f.name for f in dataclasses.fields(Sampling)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise LorakitError(
            f"generate: unknown setting(s) {', '.join(unknown)}; sampling settings are "
            + ", ".join(known)
        )
    stop = settings.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise LorakitError(f"stop must be a string or a list of strings, got {stop!r}")
    return Sampling(**{**settings, "stop": tuple(stop)})


def _check_prompt(prompt: Any) -> None:
    """Refuse a prompt that is neither text nor a conversation of {"role", "content"} dicts."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LorakitError("empty prompt; give some text to answer")
        return
    if not isinstance(prompt, list) or not prompt:
        raise LorakitError(
            f"the prompt must be a string or a non-empty list of messages, got {prompt!r:.60}"
        )
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m):
            raise LorakitError(
                f'message {i} of the prompt must be {{"role": ..., "content": "..."}}, '
                f"got {m!r:.60}"
            )


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[dict],
    adapter: str | Sequence[str] | None = None,
    *,
    raw: bool = False,
    on_text: Callable[[str], None] | None = None,
    **sampling: Any,
) -> str:
    """The model's answer to `prompt`: a user message (str) or a conversation (a list of
    {"role", "content"} dicts), in the tokenizer's chat template; with `raw`, `prompt` is text
    to continue, as it is. `adapter`: a loaded adapter's name, or a list of names (their
    updates add up), or [] for the base alone; None (default) runs the model as it is (its
    active adapters: after `lorakit.train`, the one it trained). `on_text` receives the answer
    as it is generated, piece by piece. `sampling`: the fields of `Sampling`
    (max_new_tokens=128, temperature=0 (greedy), top_p, top_k, stop, seed).

        text = lorakit.generate(model, tokenizer, "What is a kludge?", adapter="jargon")
    """
    s = _sampling(sampling)
    _check_prompt(prompt)
    if raw:
        if not isinstance(prompt, str):
            raise LorakitError("raw=True continues a text; give the prompt as a string")
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = encode_prompt(messages, tokenizer)
    names = [adapter] if isinstance(adapter, str) else adapter

    def decode(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=True)

    stream = TextStream(decode, s.stop)

    def on_token(row: int, token: int) -> bool:
        delta = stream.push(token)
        if delta and on_text is not None:
            on_text(delta)
        return stream.stopped

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    device = model.get_input_embeddings().weight.device
    chosen = nullcontext() if names is None else active_adapters(model, names)
    with chosen, autocast(device, model.dtype):
        generate_ids(model, [ids], s, eos, pad_id(tokenizer), on_token=on_token)
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    return stream.text
