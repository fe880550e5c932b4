"""The Python API as a user meets it: the public names, `lorakit.generate`, and the README's
example run verbatim."""

import importlib
import json
import pkgutil
import re
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import lorakit
from lorakit.errors import LorakitError
from lorakit.inference.generate import generate_ids
from lorakit.inference.sampling import Sampling
from lorakit.lora.layer import attach_lora, lora_layers
from lorakit.models.chat import encode_prompt

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_names_stay_what_they_are_after_every_module_is_imported():
    # A submodule named like a public function would replace it on the package once imported
    # (`import lorakit.train` used to make `lorakit.train(cfg)` a TypeError).
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        if info.name != "lorakit.__main__":  # that one runs the command line
            importlib.import_module(info.name)
    for name in lorakit.__all__:
        value = getattr(lorakit, name)
        assert not isinstance(value, types.ModuleType), f"lorakit.{name} is a module"
        assert value.__module__.startswith("lorakit."), name
    assert callable(lorakit.train) and callable(lorakit.generate)
    assert lorakit.train.__module__ == "lorakit.training.trainer"


def test_public_functions_have_return_types():
    for name in lorakit.__all__:
        value = getattr(lorakit, name)
        if isinstance(value, types.FunctionType):
            assert "return" in value.__annotations__, f"lorakit.{name} has no return type"
    assert (Path(lorakit.__file__).parent / "py.typed").is_file()


def _model_with_adapter(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    attach_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"], "a")
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["a"].weight, std=1.0)
    return model.eval()


def _ids(model, tok, prompt: list[int], adapters) -> list[int]:
    eos = [tok.eos_token_id]
    return generate_ids(model, [prompt], Sampling(max_new_tokens=12), eos, adapters=adapters)[0]


def test_generate_answers_with_the_adapter_asked_for(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model_with_adapter(tok)
    prompt = encode_prompt([{"role": "user", "content": "What is a kludge?"}], tok)
    with_a, bare = _ids(model, tok, prompt, ["a"]), _ids(model, tok, prompt, [None])
    assert with_a != bare  # the adapter changes the answer

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    kw = {"max_new_tokens": 12}
    assert lorakit.generate(model, tok, "What is a kludge?", "a", **kw) == text(with_a)
    assert lorakit.generate(model, tok, "What is a kludge?", [], **kw) == text(bare)
    # None: the model as it is (a freshly attached adapter is active)
    assert lorakit.generate(model, tok, "What is a kludge?", **kw) == text(with_a)
    # the adapters active before a call are active after it
    assert all(layer.active_adapters == ["a"] for _, layer in lora_layers(model))
    messages = [{"role": "user", "content": "What is a kludge?"}]
    assert lorakit.generate(model, tok, messages, "a", **kw) == text(with_a)
    raw = lorakit.generate(model, tok, "A kludge is", "a", raw=True, **kw)
    assert raw == text(_ids(model, tok, tok.encode("A kludge is"), ["a"]))


def test_generate_streams_pieces_that_add_up_and_cuts_at_a_stop_string(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model_with_adapter(tok)
    pieces: list[str] = []
    ask = "Who is a hacker?"
    full = lorakit.generate(model, tok, ask, max_new_tokens=16, on_text=pieces.append)
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # two characters from the middle
    assert stop.strip()
    pieces.clear()
    cut = lorakit.generate(
        model, tok, "Who is a hacker?", max_new_tokens=16, stop=stop, on_text=pieces.append
    )
    assert cut == full[: full.index(stop)]
    assert "".join(pieces) == cut


def test_generate_refuses_what_it_cannot_do(tiny_tokenizer):
    model = _model_with_adapter(tiny_tokenizer)
    with pytest.raises(LorakitError, match="no adapter named 'b'"):
        lorakit.generate(model, tiny_tokenizer, "hi", adapter="b")
    with pytest.raises(LorakitError, match="empty prompt"):
        lorakit.generate(model, tiny_tokenizer, "  ")
    with pytest.raises(LorakitError, match="temperature"):
        lorakit.generate(model, tiny_tokenizer, "hi", temperature=-1)
    with pytest.raises(LorakitError, match="unknown setting.*max_tokens.*max_new_tokens"):
        lorakit.generate(model, tiny_tokenizer, "hi", max_tokens=3)  # OpenAI's name, not ours


@pytest.mark.slow
def test_the_readme_python_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Python API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    facts = [
        ("What does kludge mean?", "A clever programming trick for one nasty case."),
        ("What does foo mean?", "A sample name for absolutely anything."),
        ("Who is a hacker?", "A person who enjoys exploring the details of systems."),
    ]
    lines = [json.dumps({"instruction": q, "output": a}) for q, a in facts * 2]
    (tmp_path / "my.jsonl").write_text("\n".join(lines) + "\n")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 4 and " -> " in printed[0]
    before, after = map(float, printed[0].split(" -> "))
    assert after < before  # it learned something in 10 steps
    config = json.loads((tmp_path / "my-run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
