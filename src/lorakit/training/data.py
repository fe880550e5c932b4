"""Training data: JSONL/text readers, chat formatting with loss masks, and sequence packing.

Flow: `load_examples` (file -> normalised examples) -> `split_examples` (train / eval) ->
`tokenize_example` (example -> input_ids, labels with -100 on the prompt) -> `pack_sequences`
(several examples per row of `seq_len` tokens) -> `collate` (rows -> a batch of tensors).

An example is one of two small dicts (plus an optional `"split"`: "train" or "eval"):
    {"text": "..."}                                        plain text: loss on every token
    {"messages": [{"role": "user", "content": "..."}, ...]}  chat: loss on assistant turns only

Packed rows and 4D masks in transformers 5 (read in `transformers/masking_utils.py`): a mask that
is already 4D is passed through to the attention function untouched, and both the "sdpa" and
the "eager" implementation *add* a float mask to the attention scores. So `collate` builds a
block-diagonal causal mask (B, 1, T, T) of 0 (attend) and finfo(dtype).min (do not), in the
model's compute dtype; with `position_ids` restarting at 0 for each example, every packed
example gives the same logits as when run alone (tests/test_data.py checks this).
transformers 5 can also build this mask itself: with `attention_mask=None` and such
`position_ids` it finds the examples where the positions restart, but only without a KV cache;
with the default `use_cache=True` it silently falls back to one causal mask over the whole row.
The explicit mask does not depend on either.
"""

from __future__ import annotations

import bisect
import json
import random
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import LorakitError
from lorakit.models import chat
from lorakit.training.distributed import is_main

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding); torch's default
MIN_SEQ_LEN = 16
# Training pads rows to a multiple of this (`collate(pad_multiple=)`): oneDNN builds, slowly, and
# keeps a primitive per matmul shape (up to 1024 of them, for the process), and one shape per
# row length kept evicting and rebuilding them. SmolLM2-135M, 16 sequences of <= 512 tokens a
# step: peak RSS over 4 steps 1596 -> 1276 MB (a throwaway script, one run each).
ROW_MULTIPLE = 64
TEXT_CHUNK_CHARS = 2000  # a .txt file becomes examples of about this many characters
ROLES = ("system", "user", "assistant")
SPLITS = {"train": "train", "eval": "eval", "validation": "eval", "valid": "eval", "test": "eval"}
SHAPES_HELP = (
    'each line must be one JSON object: {"text": ...}, {"instruction": ..., "output": ...} '
    '(or "prompt"/"response", optional "input"), or {"messages": [{"role": ..., "content": ...}]}'
)


class DataError(LorakitError):
    """Unusable training data: the message names the file, the line, the problem and the fix."""


class Examples(list):
    """The examples read from a file; `.skipped` counts the bad lines left out."""

    skipped: int = 0


# ---------------------------------------------------------------------------------------------
# Reading


def load_examples(path: str | Path, skip_bad_lines: bool = False) -> Examples:
    """Read a JSONL file (text, instruction or chat lines) or a plain .txt file.

    A bad line raises DataError("path:line: problem; fix"); with skip_bad_lines it is left out and
    counted in the result's `.skipped`.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        raise DataError(f"{path}: {what}; pass a .jsonl or .txt file of training data")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not data
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if path.suffix.lower() == ".txt":
        examples = Examples({"text": chunk} for chunk in _text_chunks(text))
    else:
        examples = _read_jsonl(path, text, skip_bad_lines)
    if not examples:
        why = "every line is bad" if examples.skipped else "the file has no examples"
        raise DataError(f"{path}: {why}; {SHAPES_HELP}")
    return examples


def _text_chunks(text: str) -> list[str]:
    """Paragraphs grouped into chunks of about TEXT_CHUNK_CHARS (packing cuts them further)."""
    chunks: list[str] = []
    current: list[str] = []
    for para in text.split("\n\n"):
        if para.strip():
            current.append(para.strip())
        if current and sum(len(p) for p in current) >= TEXT_CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _read_jsonl(path: Path, text: str, skip_bad_lines: bool) -> Examples:
    examples = Examples()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
            examples.append(normalize_example(record))
        except ValueError as e:
            if not skip_bad_lines:
                raise DataError(
                    f"{path}:{lineno}: {e}; fix the line or pass --skip-bad-lines"
                ) from None
            examples.skipped += 1
    return examples


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{key}" is empty')
    return value


def normalize_example(record: Any) -> dict:
    """One JSON record -> {"text": ...} or {"messages": [...]} (+ "split"); ValueError if bad."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}; {SHAPES_HELP}")
    if "messages" in record:
        example: dict[str, Any] = {"messages": _messages(record["messages"])}
    elif "text" in record:
        example = {"text": _string(record, "text")}
    elif any(k in record for k in ("instruction", "prompt", "output", "response")):
        prompt_key = "instruction" if "instruction" in record else "prompt"
        answer_key = "output" if "output" in record else "response"
        if prompt_key not in record:
            raise ValueError('missing "instruction" (or "prompt"), the question to answer')
        if answer_key not in record:
            raise ValueError('missing "output" (or "response"), the answer to learn')
        user = _string(record, prompt_key)
        if record.get("input"):
            user += "\n\n" + _string(record, "input")
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": _string(record, answer_key)})
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _string(record, "system")})
        example = {"messages": messages}
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(f"no known fields (found: {keys}); {SHAPES_HELP}")
    if "split" in record:
        if not isinstance(record["split"], str) or record["split"] not in SPLITS:
            raise ValueError(f'"split" must be "train" or "eval", got {record["split"]!r}')
        example["split"] = SPLITS[record["split"]]
    return example


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f'messages[{i}] must be an object with a string "content"')
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] has role {m.get('role')!r}; use one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError('no "assistant" message, so nothing to learn; add the answer')
    return out


def default_dataset_path() -> Path:
    """The packaged default data set: the Jargon File 4.4.7 as instruction examples."""
    return Path(str(resources.files("lorakit") / "datasets" / "jargon.jsonl"))


def split_examples(
    examples: list[dict], eval_fraction: float = 0.05, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, eval). An example's own "split" wins; the others get a fixed seeded split."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval fraction {eval_fraction} is out of range; use 0 <= f < 1")
    unlabelled = [i for i, ex in enumerate(examples) if "split" not in ex]
    n_eval = round(len(unlabelled) * eval_fraction)
    if eval_fraction > 0 and len(unlabelled) >= 2:
        n_eval = max(n_eval, 1)  # a small file still gets an eval example
    # random.Random(int).shuffle is the same on every Python version and platform.
    random.Random(seed).shuffle(unlabelled)
    held_out = set(unlabelled[:n_eval])
    train, evaluation = [], []
    for i, ex in enumerate(examples):
        is_eval = ex.get("split") == "eval" or i in held_out
        (evaluation if is_eval else train).append(ex)
    return train, evaluation


# ---------------------------------------------------------------------------------------------
# Tokenising


def tokenize_example(
    example: dict, tokenizer: Any, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 except on assistant answers (or every token of text).

    Chat examples use the tokenizer's chat template when it has one, a plain
    "### Instruction: / ### Response:" template otherwise (models.chat). labels[0] is always
    -100: no token predicts it, and in a packed row it must not be predicted by the previous
    example.
    """
    if "text" in example:
        ids = chat.bos(tokenizer) + chat.encode(tokenizer, example["text"]) + chat.eos(tokenizer)
        labels = list(ids)
    else:
        try:
            ids, spans = chat.answer_spans(tokenizer, example["messages"], train_on_prompt)
        except LorakitError as e:  # the template cannot show where the answers are
            raise DataError(str(e)) from None
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass(frozen=True)
class PackedSequence:
    """One training row: several examples back to back, at most seq_len tokens.

    position_ids restart at 0 for each example; seq_ids numbers the examples within the row, so
    that attention stays inside each example (see `collate`).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_sequences(
    tokenized: list[tuple[list[int], list[int]]], seq_len: int
) -> list[PackedSequence]:
    """Pack (input_ids, labels) pairs into rows of at most seq_len tokens (best fit, in order).

    An example longer than seq_len is split into chunks if every token carries loss (text), and
    truncated otherwise (chat: an answer is meaningless without its prompt). Examples whose
    prompt alone fills seq_len are dropped with a warning; DataError if that is all of them.
    """
    if seq_len < MIN_SEQ_LEN:
        raise DataError(f"seq_len {seq_len} is too short; use at least {MIN_SEQ_LEN} (e.g. 512)")
    pieces: list[tuple[list[int], list[int]]] = []
    too_long_prompts = []
    for ids, labels in tokenized:
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if not trained:
            continue  # nothing to learn (e.g. an empty text)
        if trained == list(range(1, len(ids))):  # text: cut into chunks
            for s in range(0, len(ids), seq_len):
                chunk_ids, chunk_labels = ids[s : s + seq_len], list(labels[s : s + seq_len])
                chunk_labels[0] = IGNORE_INDEX
                if len(chunk_ids) >= 2:
                    pieces.append((chunk_ids, chunk_labels))
        elif trained[0] < seq_len:
            pieces.append((ids[:seq_len], labels[:seq_len]))
        else:
            too_long_prompts.append(trained[0])
    if not tokenized:
        raise DataError("no examples to pack; give a data file with some examples")
    if not pieces and not too_long_prompts:
        raise DataError("no example has a token to learn; give examples with answers or text")
    if not pieces:
        shortest = min(too_long_prompts)
        raise DataError(
            f"seq_len {seq_len} is shorter than the prompt of every example (the shortest prompt "
            f"has {shortest} tokens); raise --seq-len above {shortest} or shorten the prompts"
        )
    if too_long_prompts:
        warnings.warn(
            f"{len(too_long_prompts)} examples dropped: their prompt fills seq_len {seq_len}",
            stacklevel=2,
        )
    return _best_fit(pieces, seq_len)


def _best_fit(pieces: list[tuple[list[int], list[int]]], seq_len: int) -> list[PackedSequence]:
    """Put each piece in the fullest row that still has room for it (a new row if none has)."""
    rows: list[PackedSequence] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for ids, labels in pieces:
        k = bisect.bisect_left(free, (len(ids), -1))
        if k == len(free):
            rows.append(PackedSequence([], [], [], []))
            space, r = seq_len, len(rows) - 1
        else:
            space, r = free.pop(k)
        row = rows[r]
        doc = row.seq_ids[-1] + 1 if row.seq_ids else 0
        row.input_ids.extend(ids)
        row.labels.extend(labels)
        row.position_ids.extend(range(len(ids)))
        row.seq_ids.extend([doc] * len(ids))
        if space - len(ids) >= 2:
            bisect.insort(free, (space - len(ids), r))
    return rows


def collate(
    rows: list[PackedSequence],
    dtype: torch.dtype = torch.float32,
    pad_id: int = 0,
    pad_to: int | None = None,
    pad_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Rows -> model inputs: input_ids, labels, position_ids, seq_ids (B, T); attention_mask.

    T is `pad_to`, else the longest row rounded up to a multiple of `pad_multiple` (a few
    distinct shapes instead of one per row length: see ROW_MULTIPLE).

    attention_mask (B, 1, T, T) is additive in `dtype` (the model's compute dtype): 0 where
    token i may see token j (same example, j <= i), finfo(dtype).min elsewhere. Padding tokens
    see only themselves, so no row of the mask is fully masked (that gives NaN in some kernels);
    their labels are -100, so they never reach the loss.
    """
    T = pad_to or -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seq_ids = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    for b, row in enumerate(rows):
        n = len(row)
        if n > T:
            raise DataError(f"a row has {n} tokens, more than pad_to={T}; pack with seq_len={T}")
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        position_ids[b, :n] = torch.tensor(row.position_ids)
        seq_ids[b, :n] = torch.tensor(row.seq_ids)
    same_doc = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (same_doc & causal & (seq_ids[:, :, None] >= 0)) | torch.eye(T, dtype=torch.bool)
    mask = torch.zeros(B, 1, T, T, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask,
        "seq_ids": seq_ids,  # example index per token, -1 for padding (models.packed_attention)
    }


def build_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[list, list, list[dict]]:
    """Packed train and eval sequences, and the eval examples (for before/after answers)."""
    examples = load_examples(cfg.data or default_dataset_path(), cfg.skip_bad_lines)
    if examples.skipped and is_main():
        print(f"skipped {examples.skipped} bad line(s) in {cfg.data}")
    if cfg.eval_data:
        train_ex, eval_ex = list(examples), list(load_examples(cfg.eval_data, cfg.skip_bad_lines))
    else:
        train_ex, eval_ex = split_examples(examples, seed=cfg.seed)
    if not train_ex:
        raise DataError(
            f'{cfg.data}: every example is marked "split": "eval", so none is left to train on; '
            'mark some "train" or remove their "split"'
        )

    def pack(items: list[dict]) -> list:
        tokenized = [tokenize_example(e, tokenizer, cfg.train_on_prompt) for e in items]
        return pack_sequences(tokenized, cfg.seq_len)

    # A one-example file has no eval split: the run trains without eval losses.
    return pack(train_ex), pack(eval_ex) if eval_ex else [], eval_ex
