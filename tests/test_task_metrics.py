"""`lorakit eval --generate`: greedy answers scored by exact match, label accuracy and a
confusion table (inference/task_metrics.py)."""

from __future__ import annotations

import json

import pytest
from test_quantize import one_line_error

from lorakit.cli import main
from lorakit.inference.task_metrics import OTHER, as_label, label_set, normalize, questions, score


def test_normalisation_is_squads():
    # The examples of SQuAD v1.1's evaluation script: case, punctuation, articles, spaces.
    assert normalize("The Cat!") == "cat"
    assert normalize("  an   apple, a pear. ") == "apple pear"
    assert normalize("Theory") == "theory"  # "the" only as a whole word


def test_labels_accuracy_and_the_confusion_table():
    refs = ["positive", "Negative.", "positive", "negative", "positive", "negative"]
    answers = ["Positive. A fine film", "positive", "negative", "Negative!", "positive", "meh"]
    s = score(answers, refs)
    assert s.answered == 6
    assert s.exact_match == pytest.approx(2 / 6)  # "Negative!" and the 5th
    assert s.accuracy == pytest.approx(3 / 6)  # and "Positive. A fine film"
    assert s.confusion == {
        "negative": {"negative": 1, "positive": 1, OTHER: 1},
        "positive": {"negative": 1, "positive": 2, OTHER: 0},
    }
    assert as_label("positively", ["positive"]) == OTHER  # a label is a whole word
    assert as_label("not sure", ["no", "not sure"]) == "not sure"


def test_free_text_references_have_no_labels():
    refs = [f"answer number {i}" for i in range(8)]
    assert label_set(refs) is None
    assert score(refs, refs).accuracy is None and score(refs, refs).exact_match == 1.0
    assert label_set(["yes", "no", "maybe"]) is None  # three labels, once each: not labels
    sentences = ["the answer is in the manual", "ask again later please"] * 4
    assert label_set(sentences) is None  # repeated, but sentences rather than labels


def test_only_questions_are_asked():
    chat = {
        "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]
    }
    assert questions([chat, {"text": "plain text"}]) == [(chat["messages"][:1], "Hi.")]


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_eval_generate_scores_base_and_adapter(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [
        {"instruction": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(24)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data)]
    argv += ["--out", str(run), "--steps", "40", "--lr", "1e-2", "--seq-len", "64"]
    assert main([*argv, "--rank", "8", "--samples", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    argv = ["eval", "--model", str(tiny_model_dir), "--adapter", f"even={run}", "--data", str(data)]
    assert main([*argv, "--generate", "--json", "--device", "cpu"]) == 0
    base, tuned = json.loads(capsys.readouterr().out)
    refs = [r["output"] for r in rows]
    for result in (base, tuned):
        answers = result["answers"]
        assert result["answered"] == len(refs) == len(answers)
        hits = sum(normalize(a) == r for a, r in zip(answers, refs, strict=True))
        assert result["exact_match"] == pytest.approx(hits / len(refs))
        table = result["confusion"]
        assert sum(sum(row.values()) for row in table.values()) == len(refs)
        assert table["yes"]["yes"] + table["no"]["no"] == pytest.approx(result["accuracy"] * 24)
    assert tuned["model"] == "even" and tuned["accuracy"] >= 0.6 > base["accuracy"]
    # The table: one row per model, and a confusion table per model.
    assert main([*argv, "--generate", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "exact match" in text and "accuracy" in text and text.count("reference label") == 2


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_eval_generate_on_plain_text_says_what_is_missing(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "notes.txt"
    data.write_text("Some plain text to compute a loss on, and nothing to answer.\n" * 4)
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--generate"]
    err = one_line_error([*argv, "--device", "cpu"], capsys)
    assert "--generate" in err and "plain text" in err
    err = one_line_error([*argv, "--max-new-tokens", "0"], capsys)
    assert "--max-new-tokens must be positive" in err
