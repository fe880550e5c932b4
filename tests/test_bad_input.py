"""Wrong input as users give it, through the command line and the Python API: one error line
that names the problem and the fix, exit 2, no traceback, and nothing already written lost.

The table's cases are refused before any model loads (its --model does not exist, so a check
that came too late would fail with "not found" instead); the rest use the tiny model fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.lora.layer import attach_lora, lora_layers
from lorakit.lora.peft_format import WEIGHTS_NAME, AdapterConfig, save_adapter
from lorakit.lora.targets import resolve_targets
from lorakit.training import data as D

# /proc refuses new files, even to root (chmod does not stop root, so it would not do here).
UNWRITABLE = Path("/proc")
needs_proc = pytest.mark.skipif(
    not (UNWRITABLE / "self").is_dir(), reason="needs Linux's /proc as an unwritable place"
)


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 and one error line without a traceback; return the line."""
    capsys.readouterr()  # drop what fixtures printed
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lorakit {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def place(tmp_path) -> Path:
    """A folder of the files users point lorakit at, good and bad."""
    good = [{"instruction": "What does foo mean?", "output": "A sample name."}] * 4
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in good))
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("  \n\n\t\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_text("earlier output")
    (tmp_path / "rank-x.toml").write_text('rank = "x"\n')
    (tmp_path / "lr-list.yaml").write_text("lr: [1, 2]\n")
    (tmp_path / "broken.yaml").write_text("rank: [1\n  x: 2\n")
    (tmp_path / "fake.gguf").write_text("not a gguf file")
    model = tiny_model("llama")
    modules, targets = resolve_targets(model, "default")
    attach_lora(model, modules, rank=2, alpha=4)
    for name in ("a", "b"):
        save_adapter(model, tmp_path / name, AdapterConfig(rank=2, alpha=4, target_modules=targets))
    return tmp_path


NO_MODEL = "{p}/no-model"
TRAIN = ["train", "--model", NO_MODEL, "--data", "{p}/data.jsonl", "--out", "{p}/run"]
GENERATE = ["generate", "--model", NO_MODEL, "--prompt", "hi"]
MERGE = ["merge", "--model", NO_MODEL, "--adapter", "{p}/a"]
COMBINE = [*MERGE, "--adapter", "{p}/b", "--weights", ".5,.5"]

CASES = [
    # an --out that cannot be written, refused before the model loads
    (["train", "--out", "/proc/lorakit-out"], "cannot create --out /proc/lorakit-out"),
    (["train", "--out", "/proc"], "cannot write into --out /proc"),
    (["train", "--out", "{p}/notes.txt/run"], "--out {p}/notes.txt/run: {p}/notes.txt is a file"),
    (["train", "--out", "{p}/notes.txt"], "--out {p}/notes.txt is a file"),
    # data files
    (["train", "--data", "{p}/empty.jsonl"], "empty.jsonl: the file has no examples"),
    (["train", "--data", "{p}/blank.jsonl"], "blank.jsonl: the file has no examples"),
    (["train", "--data", "{p}/dir"], "is a directory, not a file"),
    (["train", "--data", "{p}/missing.jsonl"], "missing.jsonl: no such file"),
    # config files
    (["train", "--config", "{p}/rank-x.toml"], "--rank must be an integer, got 'x'"),
    (["train", "--config", "{p}/lr-list.yaml"], "--lr must be a number, got [1, 2]"),
    (["train", "--config", "{p}/broken.yaml"], "broken.yaml is not valid: while parsing"),
    (["train", "--config", "{p}/dir"], "config file {p}/dir is a directory"),
    (["train", "--config", "{p}/notes.txt"], "use a .toml, .yaml or .yml file"),
    # numbers: argparse's own refusals are one line too
    (["train", "--rank", "x"], "invalid int value: 'x'; see lorakit train --help"),
    (["train", "--rank", "0"], "--rank must be a positive integer, got 0"),
    (["train", "--rank", "-4"], "--rank must be a positive integer, got -4"),
    (["train", "--alpha", "inf"], "--alpha must be positive, got inf"),
    (["train", "--lr", "0"], "--lr must be positive"),
    (["train", "--lr", "nan"], "--lr must be positive, got nan"),
    (["train", "--steps", "-1"], "--steps must be positive"),
    (["train", "--epochs", "0"], "--epochs must be positive"),
    (["train", "--batch-size", "0"], "--batch-size must be positive"),
    (["train", "--grad-accum", "-2"], "--grad-accum must be positive"),
    (["train", "--micro-batch", "-1"], "--micro-batch must be >= 0"),
    (["train", "--dropout", "1"], "--dropout must be in [0, 1)"),
    (["train", "--warmup", "-1"], "--warmup must be >= 0, got -1.0"),
    (["train", "--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["train", "--save-every", "-5"], "--save-every must be >= 0, got -5"),
    (["train", "--seq-len", "0"], "--seq-len 0 is too small"),
    (["train", "--samples", "-1"], "--samples must be >= 0"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train", "--resume"], "--resume: {p}/run has no checkpoint to resume from"),
    # models that are not models
    (["train", "--model", "{p}/notes.txt"], "notes.txt is not a .gguf file or a model directory"),
    (["train", "--model", "{p}/fake.gguf"], "fake.gguf is not a GGUF file or is corrupt"),
    (["train", "--model", "{p}/dir"], "is not a model directory (no config.json)"),
    (["train", "--model", "{p}/data.jsonl"], "data.jsonl is not a .gguf file"),
    # sampling flags, refused before the model loads
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["generate", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["generate", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate", "--stop", ""], "a stop string is empty"),
    (["generate", "--prompt", "  "], "empty prompt"),
    (["chat", "--model", NO_MODEL, "--max-new-tokens", "-3"], "--max-new-tokens must be positive"),
    # adapters that are not adapters, refused before the model loads
    (["generate", "--adapter", "={p}/a"], "--adapter '={p}/a': give NAME=DIR"),
    (["generate", "--adapter", "x="], "give NAME=DIR (both non-empty) or DIR"),
    (["generate", "--adapter", "{p}/a/adapter_config.json"], "adapter_config.json not found"),
    (["eval", "--model", NO_MODEL, "--adapter", "{p}/nope"], "adapter directory {p}/nope"),
    (["serve", "--model", NO_MODEL, "--adapter", "v1.2={p}/a"], "adapter name 'v1.2'"),
    # eval
    (["eval", "--model", NO_MODEL, "--seq-len", "8"], "--seq-len 8 is too small"),
    (["eval", "--model", NO_MODEL, "--batch-size", "0"], "--batch-size must be positive"),
    (["eval", "--model", NO_MODEL, "--data", "{p}/empty.jsonl"], "the file has no examples"),
    # merge and combine: the output place, checked before anything is read
    ([*MERGE, "--out", "{p}/notes.txt"], "--out {p}/notes.txt is a file"),
    ([*COMBINE, "--out", "{p}/notes.txt"], "--out {p}/notes.txt is a file"),
    ([*MERGE, "--out", "{p}/full"], "--out {p}/full exists and is not empty"),
    ([*COMBINE, "--out", "{p}/a"], "--out {p}/a exists and is not empty"),
    ([*MERGE, "--out", "/proc/merged"], "cannot create --out /proc/merged"),
    ([*COMBINE, "--out", "/proc/combined"], "cannot create --out /proc/combined"),
    ([*COMBINE, "--weights", "1,inf", "--out", "{p}/c"], "must be finite"),
    (["adapters", "{p}/notes.txt"], "notes.txt is not a directory"),
]


def _argv(flags: list[str], p: Path) -> list[str]:
    """The case's flags after its command's usual ones (later flags win in argparse)."""
    base = {"train": TRAIN, "generate": GENERATE}.get(flags[0], [flags[0]])
    return [a.replace("{p}", str(p)) for a in [*base, *flags[1:]]]


def _case(flags: list[str], fragment: str):
    marks = [needs_proc] if any(a.startswith("/proc") for a in flags) else []
    if flags[0] == "serve":
        no_server = importlib.util.find_spec("fastapi") is None
        marks.append(pytest.mark.skipif(no_server, reason="lorakit serve needs FastAPI"))
    return pytest.param(flags, fragment, marks=marks, id=" ".join(flags))


@pytest.mark.parametrize(("flags", "fragment"), [_case(*c) for c in CASES])
def test_wrong_input_is_one_line_and_exit_2(place, capsys, flags, fragment):
    before = {f: f.read_bytes() for f in place.rglob("*") if f.is_file()}
    line = fails(capsys, _argv(flags, place))
    assert fragment.replace("{p}", str(place)) in line
    assert {f: f.read_bytes() for f in place.rglob("*") if f.is_file()} == before  # nothing lost
    assert not (place / "run").exists() and not (place / "c").exists()


def test_a_read_only_out_directory_is_refused_before_the_model_loads(place, capsys, monkeypatch):
    """What a user without root meets in a chmod 555 directory: creating a file there fails
    with EACCES (root is never refused, hence the stand-in)."""
    import tempfile

    read_only = place / "read-only"
    read_only.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == read_only:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    argv = _argv(["train", "--out", str(read_only)], place)
    line = fails(capsys, argv)
    assert f"cannot write into --out {read_only} ({read_only}: Permission denied)" in line
    assert "choose a writable directory" in line
    for command in (MERGE, COMBINE):
        line = fails(capsys, _argv([*command, "--out", str(read_only / "m")], place))
        assert f"cannot create --out {read_only / 'm'} ({read_only}: Permission denied)" in line


def test_resume_with_another_rank_is_refused_before_the_model_loads(place, capsys):
    run = place / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text('{"step": 2}')
    (run / "train_config.json").write_text(json.dumps({"rank": 4, "targets": "default"}))
    line = fails(capsys, _argv(["train", "--resume", "--rank", "8"], place))
    assert "was trained with --rank 4, not 8; resume with --rank 4" in line
    line = fails(capsys, _argv(["train", "--resume", "--rank", "4", "--targets", "q_proj"], place))
    assert "was trained with --targets default, not q_proj" in line


def test_a_config_file_may_list_targets_and_start_with_a_byte_order_mark(tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli.train import train_config

    config = tmp_path / "run.toml"
    config.write_bytes(b'\xef\xbb\xbftargets = ["q_proj", "v_proj"]\nrank = 4\n')
    cfg = train_config(build_parser().parse_args(["train", "--config", str(config)]))
    assert cfg.targets == "q_proj,v_proj" and cfg.rank == 4


def test_a_broken_adapter_config_is_listed_with_a_warning_not_a_traceback(place, capsys):
    (place / "dir" / "adapter_config.json").write_text("[1, 2]")
    assert main(["adapters", str(place)]) == 0
    captured = capsys.readouterr()
    assert "a" in captured.out and "b" in captured.out
    assert "unreadable adapter" in captured.err and "list, not an object" in captured.err


# --- with a tiny model --------------------------------------------------------------------------


@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)
def test_seq_len_beyond_the_context_in_train_and_eval(tiny_model_dir, place, capsys):
    """GPT-2's tiny config has 256 positions."""
    model = ["--model", str(tiny_model_dir)]
    flags = ["train", *model, "--seq-len", "512", "--samples", "0"]
    line = fails(capsys, _argv(flags, place))
    assert "--seq-len 512 exceeds the model's context of 256 tokens; use --seq-len 256" in line
    assert not (place / "run").exists()  # nothing created for a refused run
    line = fails(capsys, ["eval", *model, "--data", str(place / "data.jsonl"), "--seq-len", "512"])
    assert "--seq-len 512 exceeds the model's context of 256 tokens" in line


def test_seq_len_beyond_the_context_through_the_python_api(place, tiny_tokenizer, monkeypatch):
    def no_packing(*args, **kwargs):
        raise AssertionError("data was packed before the settings were checked")

    monkeypatch.setattr(D, "pack_sequences", no_packing)
    model = tiny_model("gpt2", vocab_size=len(tiny_tokenizer))
    cfg = lorakit.TrainConfig(seq_len=512, data=str(place / "data.jsonl"), out=str(place / "run"))
    with pytest.raises(LorakitError, match="--seq-len 512 exceeds the model's context of 256"):
        lorakit.train(cfg, model, tiny_tokenizer)
    assert not (place / "run").exists()
    assert not list(lora_layers(model))


@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)
@pytest.mark.parametrize("late", [["--seq-len", "512"], ["--targets", "nope"]])
def test_overwrite_keeps_the_earlier_run_when_the_new_one_is_refused(
    tiny_model_dir, place, capsys, late
):
    """Refusals that need the model come after it loads: --overwrite must not have deleted the
    earlier run by then."""
    run = place / "run"
    run.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"):
        (run / name).write_text(f"earlier {name}")
    flags = ["train", "--model", str(tiny_model_dir), "--overwrite", "--seq-len", "64", *late]
    fails(capsys, _argv([*flags, "--samples", "0"], place))
    assert (run / "metrics.jsonl").read_text() == "earlier metrics.jsonl"
    assert (run / "adapter_model.safetensors").read_text() == "earlier adapter_model.safetensors"


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_generate_never_prints_the_stop_string(tiny_model_dir, capsys):
    """The stop string is taken from what greedy decoding prints without one, across a token
    boundary; with --stop the printed text is exactly what came before it."""
    prompt = "What is a hacker?"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", prompt]
    argv += ["--max-new-tokens", "12"]
    capsys.readouterr()
    assert main(argv) == 0
    full = capsys.readouterr().out.removesuffix("\n")
    # Where the tokens' texts meet (the API streams a piece per token): the stop string takes
    # the end of one token and the start of the next.
    model, tok, _ = lorakit.load_model(tiny_model_dir)
    pieces: list[str] = []
    assert lorakit.generate(model, tok, prompt, max_new_tokens=12, on_text=pieces.append) == full
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    k = next(e for e in ends if 2 <= e <= len(full) - 2 and full[e - 2 : e + 2].strip())
    stop = full[k - 2 : k + 2]
    assert main([*argv, f"--stop={stop}"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")
    assert printed == full[: full.index(stop)]
    assert stop not in printed


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_broken_adapters_are_one_line_in_generate(tiny_model_dir, tmp_path, capsys):
    model, _, _ = lorakit.load_model(tiny_model_dir, quant="none", dtype=torch.float32)
    modules, targets = resolve_targets(model, "default")
    attach_lora(model, modules, rank=2, alpha=4)
    config = AdapterConfig(rank=2, alpha=4, target_modules=targets)
    good = save_adapter(model, tmp_path / "lora-v0.2", config)
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--adapter", str(good)]) == 0  # a '.' in the folder's name is fine
    nan = shutil.copytree(good, tmp_path / "nan")
    tensors = load_file(good / WEIGHTS_NAME)
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / WEIGHTS_NAME)
    assert f"holds NaN/inf in {key}; the adapter is broken" in fails(
        capsys, [*argv, "--adapter", str(nan)]
    )
    rank = shutil.copytree(good, tmp_path / "rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    line = fails(capsys, [*argv, "--adapter", str(rank)])
    assert "has rank 2 in its tensors but adapter_config.json says r = 8" in line
    half = shutil.copytree(good, tmp_path / "half")
    (half / WEIGHTS_NAME).unlink()
    assert "has no adapter_model.safetensors" in fails(capsys, [*argv, "--adapter", str(half)])


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_chat_goes_on_after_a_turn_that_does_not_fit_the_context(
    tiny_model_dir, monkeypatch, capsys
):
    lines = ["hi", "word " * 300, "hi again"]

    def user(prompt: str = "") -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    monkeypatch.setattr("builtins.input", user)
    argv = ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]
    assert main(argv) == 0  # the input runs out: EOF ends the chat
    captured = capsys.readouterr()
    assert "exceed the model's context of 256" in captured.err and "/reset" in captured.err
    assert captured.out.count("\n") >= 3  # the greeting and both answers


# --- the Python API -----------------------------------------------------------------------------


@pytest.fixture
def llama(tiny_tokenizer):
    return tiny_model("llama", vocab_size=len(tiny_tokenizer)), tiny_tokenizer


@pytest.mark.parametrize(
    ("prompt", "settings", "fragment"),
    [
        (None, {}, "the prompt must be a string or a non-empty list of messages"),
        (5, {}, "the prompt must be a string"),
        ([], {}, "non-empty list of messages"),
        ([{"role": "user"}], {}, 'message 0 of the prompt must be {"role"'),
        ("hi", {"max_tokens": 3}, "unknown setting(s) max_tokens; sampling settings are"),
        ("hi", {"max_new_tokens": "3"}, "--max-new-tokens must be an integer, got '3'"),
        ("hi", {"temperature": float("nan")}, "--temperature must be a finite number"),
        ("hi", {"stop": 5}, "stop must be a string or a list of strings"),
        ("hi", {"adapter": "nope"}, "no adapter named 'nope' is loaded"),
    ],
)
def test_generate_refuses_wrong_arguments(llama, prompt, settings, fragment):
    model, tok = llama
    with pytest.raises(LorakitError) as info:
        lorakit.generate(model, tok, prompt, **settings)
    assert fragment in str(info.value)


def test_generate_ids_refuses_ids_outside_the_vocabulary(llama):
    model, _ = llama
    for ids in ([[5, 99999]], [[-1]]):
        with pytest.raises(LorakitError, match="outside the model's vocabulary of 400"):
            lorakit.generate_ids(model, ids, lorakit.Sampling(max_new_tokens=2))


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"dtype": "bfloat16"}, "dtype must be a floating torch dtype"),
        ({"dtype": torch.int8}, "dtype must be a floating torch dtype"),
        ({"device": "tpu"}, "device 'tpu' is not a device"),
        ({"blocksize": 0}, "blocksize must be a positive even number"),
        ({"quant": "int8"}, "unknown quantization 'int8'"),
    ],
)
def test_load_model_refuses_wrong_arguments_before_reading(tmp_path, settings, fragment):
    with pytest.raises(LorakitError) as info:
        lorakit.load_model(tmp_path / "no-model", **settings)
    assert fragment in str(info.value)


def test_train_refuses_a_model_without_tokenizer_or_already_adapted(place, llama):
    model, tok = llama
    cfg = lorakit.TrainConfig(data=str(place / "data.jsonl"), out=str(place / "run"), seq_len=64)
    with pytest.raises(LorakitError, match="pass the model's tokenizer"):
        lorakit.train(cfg, model, None)
    lorakit.load_adapter(model, place / "a", name="mine")
    with pytest.raises(LorakitError, match="already carries adapter.s. mine .* freshly loaded"):
        lorakit.train(cfg, model, tok)
    assert not (place / "run").exists()
    with pytest.raises(LorakitError, match="--rank must be an integer, got 'x'"):
        lorakit.train(lorakit.TrainConfig(rank="x"), model, tok)


@pytest.mark.parametrize("name", ["v1.2", ""])
def test_load_adapter_refuses_a_name_torch_cannot_hold_and_leaves_the_model(place, name):
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match=f"adapter name {name!r} is not allowed"):
        lorakit.load_adapter(model, place / "a", name=name)
    assert not list(lora_layers(model))
