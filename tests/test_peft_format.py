"""Adapters in PEFT's format: keys, config, round trip, PEFT both ways, refusals, atomic saves."""

from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.lora.combine import combine_adapters
from lorakit.lora.layer import LoRALinear, attach_lora, lora_layers
from lorakit.lora.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from lorakit.lora.targets import resolve_targets

IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _adapted(kind: str, rank: int = 4, alpha: float = 8.0, use_rslora: bool = False, seed=0):
    """(base, a copy with a lorakit adapter on the default targets and random B, its config)."""
    base = tiny_model(kind)
    model = copy.deepcopy(base)
    modules, peft_targets = resolve_targets(model, "default")
    attach_lora(model, modules, rank=rank, alpha=alpha, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    config = AdapterConfig(
        rank=rank, alpha=alpha, use_rslora=use_rslora, target_modules=peft_targets, base_model=kind
    )
    return base, model, config


def _assert_adapter_matters(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """Guard against vacuous equality: the adapter must move the logits visibly."""
    assert (adapted - base).abs().max() > 1e-2


# --- the saved files ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_files_keys_shapes_and_config(kind, tmp_path):
    base, model, config = _adapted(kind, rank=4, alpha=8)
    save_adapter(model, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    modules, _ = resolve_targets(base, "default")
    expected = {f"base_model.model.{m}.lora_{ab}.weight" for m in modules for ab in ("A", "B")}
    assert set(tensors) == expected
    for m in modules:
        layer = model.get_submodule(m)
        a = tensors[f"base_model.model.{m}.lora_A.weight"]
        b = tensors[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(b, layer.lora_B["default"].weight, rtol=0, atol=0)

    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["fan_in_fan_out"] is (kind == "gpt2")  # GPT-2's Conv1D stores W as (in, out)
    targets = {"llama": ["k_proj", "o_proj", "q_proj", "v_proj"]}
    assert saved["target_modules"] == targets.get(kind, ["attn.c_attn", "attn.c_proj"])
    assert saved["use_dora"] is False and saved["modules_to_save"] is None
    assert saved["base_model_name_or_path"] == kind


def test_gpt2_conv1d_shapes_are_out_in(tmp_path):
    """c_attn maps 32 -> 96: A must be (r, 32) and B (96, r) even though Conv1D stores (32, 96)."""
    _, model, config = _adapted("gpt2", rank=4)
    save_adapter(model, tmp_path, config)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)


def test_saved_weights_are_fp32_even_from_a_bf16_model(tmp_path):
    _, model, config = _adapted("llama")
    model.to(torch.bfloat16)
    save_adapter(model, tmp_path, config)
    assert {t.dtype for t in load_file(tmp_path / WEIGHTS_NAME).values()} == {torch.float32}


def test_save_without_that_adapter_is_an_error(tmp_path):
    _, model, config = _adapted("llama")
    with pytest.raises(LorakitError, match="no adapter named 'other'"):
        save_adapter(model, tmp_path, config, name="other")
    assert not list(tmp_path.iterdir())


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_gives_identical_logits(kind, use_rslora, tmp_path):
    base, model, config = _adapted(kind, rank=4, alpha=8, use_rslora=use_rslora)
    save_adapter(model, tmp_path, config)
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.use_rslora is use_rslora and loaded.rank == 4 and loaded.alpha == 8
    expected = _logits(model)
    _assert_adapter_matters(expected, _logits(base))
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)
    assert {n for n, _ in lora_layers(fresh)} == {n for n, _ in lora_layers(model)}
    # A loaded adapter is for use, not training: nothing in the model requires grad after it.
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" in n)


def test_second_named_adapter_loads_beside_the_first(tmp_path):
    base, model, config = _adapted("llama")
    save_adapter(model, tmp_path, config)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path, name="a")
    load_adapter(fresh, tmp_path, name="b")
    layer = fresh.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoRALinear) and layer.active_adapters == ["a", "b"]
    sd = lora_state_dict(fresh, "b")
    torch.testing.assert_close(sd, lora_state_dict(model, "default"), rtol=0, atol=0)


# --- PEFT as the oracle -------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lorakit_adapter_loads_in_peft_with_same_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base, model, config = _adapted(kind, rank=4, alpha=8)
    save_adapter(model, tmp_path, config)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    # PEFT wrapped exactly our targets, with our ranks, and loaded every tensor we saved.
    ours = {n for n, _ in lora_layers(model)}
    theirs = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert theirs == ours
    expected = _logits(model)
    _assert_adapter_matters(expected, _logits(base))
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)


def _peft_adapter(kind: str, path: Path, **lora_kwargs):
    """Make an adapter with PEFT (random A and B) in `path`; returns (base, PEFT model)."""
    peft = pytest.importorskip("peft")
    base = tiny_model(kind)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)  # B != 0
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(path)
    return base, peft_model


PEFT_CASES = {
    "llama-q-v": ("llama", dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])),
    "gpt2-c_attn": (
        "gpt2",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
        ),
    ),
    "rslora": (
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "o_proj"],
            use_rslora=True,
        ),
    ),
    "rank-3-all-linear": ("qwen2", dict(r=3, lora_alpha=5, target_modules="all-linear")),
    "layers-to-transform": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[1],
        ),
    ),
    "rank-alpha-pattern": (
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2, "model.layers.1.mlp.up_proj": 12},
            alpha_pattern={"model.layers.0.self_attn.q_proj": 64, "up_proj": 3},
        ),
    ),
    "regex-targets": (
        "llama",
        dict(
            r=4,
            lora_alpha=4,
            target_modules=r".*\.1\.self_attn\.(k|o)_proj",
        ),
    ),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_lorakit_with_same_logits(case, tmp_path):
    kind, kwargs = PEFT_CASES[case]
    base, peft_model = _peft_adapter(kind, tmp_path, **kwargs)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    expected = _logits(peft_model)
    _assert_adapter_matters(expected, _logits(base))
    torch.testing.assert_close(_logits(fresh), expected, rtol=1e-5, atol=1e-5)
    # The same modules carry LoRA, with the same rank and scaling, as in PEFT.
    peft = pytest.importorskip("peft")
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    ours = dict(lora_layers(fresh))
    assert set(ours) == set(peft_layers)
    for n, layer in ours.items():
        assert layer.lora_A["default"].out_features == peft_layers[n].r["default"], n
        assert layer.scaling["default"] == pytest.approx(peft_layers[n].scaling["default"]), n


def test_layer_subset_touches_only_those_layers(tmp_path):
    """An adapter for layer 1 only (PEFT's layers_to_transform) leaves layer 0 unwrapped."""
    _, model, config = _adapted("llama")
    save_adapter(model, tmp_path, config)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if ".layers.1." in k}, tmp_path / WEIGHTS_NAME)
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path)
    assert {n for n, _ in lora_layers(fresh)} == {
        f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


# --- refusals: one clear LorakitError each ------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    """A valid llama adapter saved by lorakit in tmp_path/adapter."""
    _, model, config = _adapted("llama")
    return save_adapter(model, tmp_path / "adapter", config)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(peft_type="IA3"), "'IA3' is not supported"),
        (dict(bias="lora_only"), "bias"),
        (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
        (dict(alora_invocation_tokens=[1, 2]), "aLoRA"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(arrow_config={"top_k": 2}), "Arrow"),
        (dict(use_bdlora={"lora_a_is_blockdiagonal": True}), "BD-LoRA"),
        (dict(kasa_config={}), "KaSA"),
        (dict(monteclora_config={"n_experts": 4}), "MonteCLoRA"),
    ],
)
def test_unsupported_peft_features_are_refused(saved, changes, message):
    _edit_config(saved, **changes)
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match=message):
        load_adapter(model, saved)
    assert not list(lora_layers(model))  # refused before touching the model


@pytest.mark.oracle
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.LoraConfig(target_modules=["q_proj"], use_dora=True), "DoRA"),
        (
            lambda p: p.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "modules_to_save",
        ),
        (
            lambda p: p.IA3Config(
                target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
            ),
            "IA3",
        ),
    ],
)
def test_real_peft_adapters_with_unsupported_features_are_refused(make, message, tmp_path):
    peft = pytest.importorskip("peft")
    peft.get_peft_model(tiny_model("llama"), make(peft)).save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match=message):
        load_adapter(tiny_model("llama"), tmp_path)


class _Trap:
    """Unpickling this writes a file: proof that something unpickled the adapter."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_bin_adapter_is_refused_and_never_unpickled(saved, tmp_path, monkeypatch):
    (saved / WEIGHTS_NAME).unlink()
    sentinel = tmp_path / "unpickled"
    (saved / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("lorakit tried to unpickle an adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(LorakitError, match="never loads") as info:
        load_adapter(tiny_model("llama"), saved)
    message = str(info.value)
    assert "adapter_model.bin" in message and "safe_serialization=True" in message  # how to fix
    assert not sentinel.exists()


def test_missing_weights_file(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(LorakitError, match=f"no {WEIGHTS_NAME}"):
        load_adapter(tiny_model("llama"), saved)


def test_missing_config_file(saved):
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(LorakitError, match=f"no {CONFIG_NAME}"):
        load_adapter(tiny_model("llama"), saved)


def test_missing_directory(tmp_path):
    with pytest.raises(LorakitError, match="not found"):
        load_adapter(tiny_model("llama"), tmp_path / "nope")


@pytest.mark.parametrize(
    "garbage",
    [b"\x00garbage bytes, not safetensors" * 3, b"", b"\xff" * 8 + b"{not json}"],
    ids=["garbage", "empty", "bad-header"],
)
def test_corrupt_safetensors(saved, garbage):
    (saved / WEIGHTS_NAME).write_bytes(garbage)
    with pytest.raises(LorakitError, match="corrupt or unreadable"):
        load_adapter(tiny_model("llama"), saved)


def test_truncated_safetensors(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    with pytest.raises(LorakitError, match="corrupt or unreadable"):
        load_adapter(tiny_model("llama"), saved)


def test_corrupt_config(saved):
    (saved / CONFIG_NAME).write_text("{ this is not json")
    with pytest.raises(LorakitError, match="not a valid adapter config"):
        load_adapter(tiny_model("llama"), saved)


def test_adapter_for_another_hidden_size(tmp_path):
    bigger = tiny_model("llama", hidden_size=48)
    modules, targets = resolve_targets(bigger, "default")
    attach_lora(bigger, modules, rank=4, alpha=8)
    save_adapter(bigger, tmp_path, AdapterConfig(rank=4, alpha=8, target_modules=targets))
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="another size") as info:
        load_adapter(model, tmp_path)
    assert "(4, 32)" in str(info.value) and "(4, 48)" in str(info.value)
    assert not list(lora_layers(model))  # nothing half-attached


def test_adapter_for_another_architecture(tmp_path):
    _, gpt2, config = _adapted("gpt2")
    save_adapter(gpt2, tmp_path, config)
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="which this model lacks") as info:
        load_adapter(model, tmp_path)
    assert "transformer.h.0.attn.c_attn" in str(info.value)
    assert not list(lora_layers(model))


def test_unexpected_and_unpaired_tensors(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    save_file(
        {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, saved / WEIGHTS_NAME
    )
    with pytest.raises(LorakitError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        load_adapter(tiny_model("llama"), saved)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(LorakitError, match="q_proj has lora_A or lora_B but not both"):
        load_adapter(tiny_model("llama"), saved)


def test_a_config_rank_that_is_not_the_tensors_rank_is_refused(saved):
    """r: 8 in the config over rank-4 tensors: PEFT cannot load it, and lorakit would have used
    the wrong scaling (alpha / 4 instead of alpha / 8) without a word."""
    _edit_config(saved, r=8)
    model = tiny_model("llama")
    with pytest.raises(LorakitError) as info:
        load_adapter(model, saved)
    message = str(info.value)
    assert re.search(r"model\.layers\.0\.self_attn\.[qkvo]_proj has rank 4 in its tensors", message)
    assert "says r = 8" in message and "\n" not in message
    assert not list(lora_layers(model))


def test_rank_pattern_gives_per_module_ranks_as_peft_matches_them(tmp_path):
    """rank_pattern keys match the end of a module name (whole dotted parts), first match wins."""
    model = tiny_model("llama")
    v_proj = [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    q_proj = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    attach_lora(model, q_proj, rank=4, alpha=8)
    attach_lora(model, v_proj[:1], rank=2, alpha=8)
    attach_lora(model, v_proj[1:], rank=6, alpha=8)
    # "layers.1.self_attn.v_proj" first: it wins over "v_proj" for layer 1; "_proj" alone
    # matches no whole name part, so q_proj keeps r.
    pattern = {"_proj": 9, "layers.1.self_attn.v_proj": 6, "v_proj": 2}
    config = AdapterConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LorakitError, match="has rank 2 on model.layers.0.self_attn.v_proj"):
        save_adapter(model, tmp_path, config)  # the config must describe the weights
    config.rank_pattern = pattern
    save_adapter(model, tmp_path, config)
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path)
    ranks = {n: layer.lora_A["default"].out_features for n, layer in lora_layers(fresh)}
    assert ranks == {q_proj[0]: 4, q_proj[1]: 4, v_proj[0]: 2, v_proj[1]: 6}
    _edit_config(tmp_path, rank_pattern={"v_proj": 2, "layers.1.self_attn.v_proj": 6})
    with pytest.raises(LorakitError, match="v_proj has rank 6 in its tensors .* rank_pattern = 2"):
        load_adapter(tiny_model("llama"), tmp_path)  # "v_proj" now comes first: it wins
    _edit_config(tmp_path, rank_pattern={"v_proj(": 2})
    with pytest.raises(LorakitError, match="not a regular expression"):
        load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_adapter_holding_nan_or_inf_is_refused(saved, tmp_path, bad):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors[key][3, 1] = bad
    save_file(tensors, saved / WEIGHTS_NAME)
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match=f"holds NaN/inf in {key}; the adapter is broken"):
        load_adapter(model, saved)
    assert not list(lora_layers(model))
    with pytest.raises(LorakitError, match="holds NaN/inf"):
        combine_adapters([saved, saved], [0.5, 0.5], tmp_path / "combined")
    assert not (tmp_path / "combined").exists()


def test_integer_or_mismatched_lora_tensors_are_refused(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key: tensors[key].to(torch.int8)}, saved / WEIGHTS_NAME)
    with pytest.raises(LorakitError, match="torch.int8, not floating-point"):
        load_adapter(tiny_model("llama"), saved)
    save_file({**tensors, key: tensors[key][:3]}, saved / WEIGHTS_NAME)  # A (3, in), B (out, 4)
    with pytest.raises(LorakitError, match=r"lora_A \(3, 32\) and lora_B \(32, 4\)"):
        load_adapter(tiny_model("llama"), saved)


def test_saving_into_a_file_is_refused(tmp_path):
    _, model, config = _adapted("llama")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(LorakitError, match="is a file; choose a directory"):
        save_adapter(model, tmp_path / "file", config)
    assert (tmp_path / "file").read_text() == "keep"


def test_loading_the_same_name_twice_is_an_error(saved):
    model = tiny_model("llama")
    load_adapter(model, saved)
    with pytest.raises(LorakitError, match="already exists"):
        load_adapter(model, saved)


# --- atomic writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(28, "No space left on device")])
def test_failed_save_keeps_the_previous_adapter_and_leaves_no_temp_files(saved, error, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    _, other, config = _adapted("llama", rank=2, seed=7)

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise error

    monkeypatch.setattr("safetensors.torch.save_file", half_write)
    expected = LorakitError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected):
        save_adapter(other, saved, config)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temp file either
    load_adapter(tiny_model("llama"), saved)  # and it still loads


def test_a_bad_module_late_in_the_file_leaves_the_model_untouched(saved):
    """Validation happens before any layer is wrapped: no half-attached adapter after an error."""
    tensors = load_file(saved / WEIGHTS_NAME)
    for ab, shape in (("A", (4, 32)), ("B", (32, 4))):
        tensors[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = torch.zeros(
            shape
        )
    save_file(tensors, saved / WEIGHTS_NAME)
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="model.layers.7.self_attn.q_proj"):
        load_adapter(model, saved)
    assert not list(lora_layers(model))


def test_same_name_on_some_of_the_modules_is_refused_before_attaching(saved, tmp_path):
    """The model has 'default' on layer 1 only; loading 'default' on layers 0 and 1 is refused."""
    tensors = load_file(saved / WEIGHTS_NAME)
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text())
    save_file({k: v for k, v in tensors.items() if ".layers.1." in k}, subset / WEIGHTS_NAME)
    model = tiny_model("llama")
    load_adapter(model, subset)
    wrapped = {n for n, _ in lora_layers(model)}
    with pytest.raises(LorakitError, match="'default' already exists"):
        load_adapter(model, saved)
    assert {n for n, _ in lora_layers(model)} == wrapped


def test_config_that_cannot_be_written_replaces_nothing(saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    _, other, config = _adapted("llama", rank=2, seed=7)
    config.alpha_pattern = {"q_proj": torch.tensor(3.0)}  # not JSON
    with pytest.raises(TypeError):
        save_adapter(other, saved, config)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


@pytest.mark.oracle
@pytest.mark.parametrize("tiny_model_dir", ["llama", "gpt2"], indirect=True)
def test_qlora_adapter_loads_in_peft_over_the_dequantized_base(tiny_model_dir, tmp_path):
    """An adapter trained on the NF4 base is an ordinary PEFT adapter (fan_in_fan_out for GPT-2)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_model
    from lorakit.quant.linear import NF4Linear

    model, _, _ = load_model(tiny_model_dir, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    modules, targets = resolve_targets(model, "default")
    attach_lora(model, modules, rank=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    save_adapter(model, tmp_path, AdapterConfig(rank=4, alpha=8, target_modules=targets))
    gpt2 = model.config.model_type == "gpt2"
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is gpt2

    # PEFT's base: the fp32 model with each quantized weight replaced by its NF4 value.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                weight = base.get_submodule(name.removesuffix(".base_layer")).weight
                approx = module.dequantized_weight(torch.float32)
                weight.copy_(approx.T if gpt2 else approx)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=1e-5, atol=1e-5)
