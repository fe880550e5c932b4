"""Task metrics for `lorakit eval --generate`: each held-out instruction answered greedily, the
answer compared with the reference.

- exact match: the answer equals the reference after SQuAD's normalisation (lower case, no
  punctuation, no articles, single spaces);
- where the references are a few labels (at most MAX_LABELS distinct ones of up to three
  words, each used at least twice on average: "positive" / "negative", "A" / "B" / "C" /
  "D"): accuracy, and the confusion table of reference label x answered label. An answer
  counts as a label when, normalised, it is that label or begins with it ("Positive. The
  review ..." is "positive"); else it is OTHER.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lorakit.inference.generate import generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.models.chat import encode_prompt, pad_id
from lorakit.models.precision import autocast

MAX_LABELS = 10
OTHER = "(other)"
BATCH = 8  # answers generated together (left-padded rows)
PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no a/an/the, single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def questions(examples: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for each chat / instruction example whose last turn
    is the assistant's; plain-text examples have no question and are left out."""
    items = []
    for ex in examples:
        messages = ex.get("messages")
        if messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
            items.append((messages[:-1], messages[-1]["content"]))
    return items


def label_set(references: list[str]) -> list[str] | None:
    """The normalised labels if the references are a few labels (see the module docstring)."""
    labels = sorted({normalize(r) for r in references})
    few = 2 <= len(labels) <= MAX_LABELS and len(references) >= 2 * len(labels)
    if few and all(0 < len(label.split()) <= 3 for label in labels):  # labels, not sentences
        return labels
    return None


def as_label(answer: str, labels: list[str]) -> str:
    """The label an answer gives: the longest label it equals or begins with, else OTHER."""
    text = normalize(answer)
    hits = [lab for lab in labels if text == lab or text.startswith(lab + " ")]
    return max(hits, key=len) if hits else OTHER


@dataclass
class TaskScores:
    answered: int
    exact_match: float
    accuracy: float | None = None  # only when the references are labels
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # reference -> answer
    answers: list[str] = field(default_factory=list)


def score(answers: list[str], references: list[str]) -> TaskScores:
    """Exact match of the answers against the references; accuracy and the confusion table
    too where the references are labels."""
    both = list(zip(answers, references, strict=True))
    exact = sum(normalize(a) == normalize(r) for a, r in both)
    result = TaskScores(len(answers), exact / max(len(answers), 1), answers=answers)
    labels = label_set(references)
    if labels is not None:
        pairs = [(normalize(r), as_label(a, labels)) for a, r in both]
        result.accuracy = sum(r == a for r, a in pairs) / len(pairs)
        counts = Counter(pairs)
        result.confusion = {r: {a: counts[(r, a)] for a in [*labels, OTHER]} for r in labels}
    return result


def answer_all(
    model: nn.Module,
    tokenizer: Any,
    items: list[tuple[list[dict], str]],
    adapter: str | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to each item's prompt, with `adapter` (None: the bare base)."""
    prompts = [encode_prompt(messages, tokenizer) for messages, _ in items]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = []
    label, device = adapter or "base", model.get_input_embeddings().weight.device
    for i in tqdm(range(0, len(prompts), BATCH), desc=f"answers ({label})", unit="batch"):
        chunk = prompts[i : i + BATCH]
        with autocast(device, model.dtype):  # as `lorakit generate` runs it
            ids = generate_ids(
                model, chunk, sampling, eos, pad_id(tokenizer), adapters=[adapter] * len(chunk)
            )
        answers += [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    return answers


def answer_length(tokenizer: Any, references: list[str], cap: int = 256) -> int:
    """New tokens enough for the longest reference, and a little more."""
    longest = max(
        (len(tokenizer.encode(r, add_special_tokens=False)) for r in references), default=0
    )
    return min(cap, longest + 16)
