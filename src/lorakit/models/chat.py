"""Conversations as token ids: the tokenizer's chat template (or a plain one), where the answers
lie, and the tokenizer conventions every other module shares (BOS, EOS, the pad id).

Training (`training.data`) and generation (`inference`, the server) both go through here, so a
prompt at inference is formatted exactly as the prompts the adapter was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.errors import LorakitError


def pad_id(tokenizer: Any) -> int:
    """The id padding positions hold: the tokenizer's pad token, else its EOS, else 0. Padding
    is always masked out, so any id works; this one rule keeps every batch the same."""
    for token_id in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if token_id is not None:
            return int(token_id)
    return 0


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos(tokenizer: Any) -> list[int]:
    """The BOS the tokenizer itself would add (LLaMA: [bos]; GPT-2, SmolLM2: [])."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return ids if bos_id is not None and ids == [bos_id] else []


def eos(tokenizer: Any) -> list[int]:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    return [eos_id] if eos_id is not None else []


def encode_prompt(messages: list[dict], tokenizer: Any) -> list[int]:
    """Token ids that ask the model for the next assistant turn (same format as training)."""
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, messages, add_generation_prompt=True)
    ids, _ = plain_spans(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    return ids[: len(ids) - len(eos(tokenizer))]


def answer_spans(
    tokenizer: Any, messages: list[dict], whole: bool = False
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the conversation and the [start, end) span of every assistant answer, in
    the tokenizer's chat template or, without one, the plain template; with `whole` only the ids
    (the spans are not needed when every token is learned)."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_spans(tokenizer, messages)
    if whole:
        return chat_ids(tokenizer, messages), []
    return template_spans(tokenizer, messages)


def chat_ids(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False
) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def template_spans(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[tuple]]:
    """Token ids of the conversation and the [start, end) span of every assistant answer.

    An answer starts where "the conversation so far + generation prompt" ends and stops where
    "the conversation including it" ends; both must be token prefixes of the whole, which
    holds for ordinary templates. The span is cut after the end-of-turn (eos) token, so the
    newline some templates put after it is not learned.
    """
    full = chat_ids(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = chat_ids(tokenizer, messages[: i + 1])
        if full[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise LorakitError(
                f"the tokenizer's chat template renders turn {i} differently inside the whole "
                "conversation, so the answer tokens cannot be found; use --train-on-prompt "
                "or a tokenizer whose template renders earlier turns unchanged"
            )
        spans.append(_cut_after_eos(tokenizer, full, len(prefix), len(upto)))
    return full, spans


def _cut_after_eos(tokenizer: Any, ids: list[int], start: int, end: int) -> tuple[int, int]:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    for j in range(end - 1, start - 1, -1):
        if ids[j] == eos_id:
            return start, j + 1
    return start, end


def plain_spans(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[tuple]]:
    """The template for tokenizers without one: "### Instruction:" ... "### Response:" ..."""
    ids = bos(tokenizer)
    n_bos = len(ids)
    spans = []
    for message in messages:
        role, content = message["role"], message["content"]
        sep = "\n\n" if len(ids) > n_bos else ""
        if role == "assistant":
            answer = encode(tokenizer, content) + eos(tokenizer)
            spans.append((len(ids), len(ids) + len(answer)))
            ids += answer
        elif role == "user":
            ids += encode(tokenizer, f"{sep}### Instruction:\n{content}\n\n### Response:\n")
        else:
            ids += encode(tokenizer, f"{sep}{content}")
    return ids, spans
