"""LoRA layers: init, QLoRA == LoRA over the dequantized weight, merge, adapters, PEFT parity."""

import pytest
import torch
from conftest import tiny_model
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import (
    LoRALinear,
    attach_lora,
    mark_only_lora_trainable,
    merge_lora,
    row_adapters,
    set_active_adapters,
)
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4


def _randomize_b(layer: LoRALinear, name: str = "default") -> None:
    with torch.no_grad():
        layer.lora_B[name].weight.normal_(0, 0.1)


def _conv1d(fin: int, fout: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(fout, fin)
    nn.init.normal_(conv.weight, std=0.1)
    return conv


def test_new_adapter_changes_nothing():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base)
    layer.add_adapter("default", rank=4, alpha=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_forward_matches_formula_with_rslora():
    base = nn.Linear(16, 8, bias=False)
    layer = LoRALinear(base)
    layer.add_adapter("a", rank=4, alpha=8, use_rslora=True)
    _randomize_b(layer, "a")
    x = torch.randn(5, 16)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ base.weight.T + (8 / 4**0.5) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_qlora_equals_lora_over_dequantized_weight():
    torch.manual_seed(0)
    weight = torch.randn(24, 64) * 0.1
    q = NF4Linear.from_weight(weight)
    dense = nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        dense.weight.copy_(dequantize_nf4(q.state, torch.float32))
    ql, ll = LoRALinear(q), LoRALinear(dense)
    ql.add_adapter("default", 8, 16)
    ll.add_adapter("default", 8, 16)
    _randomize_b(ql)
    ll.lora_B["default"].weight.data.copy_(ql.lora_B["default"].weight)
    ll.lora_A["default"].weight.data.copy_(ql.lora_A["default"].weight)
    x = torch.randn(2, 3, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ql(x), ll(x2))
    ql(x).sum().backward()
    ll(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ql.lora_A["default"].weight.grad, ll.lora_A["default"].weight.grad)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    base = nn.Linear(16, 12) if kind == "linear" else _conv1d(16, 12)
    original = base.weight.detach().clone()
    layer = LoRALinear(base)
    layer.add_adapter("default", 4, 8)
    _randomize_b(layer)
    x = torch.randn(4, 16)
    before = layer(x)
    layer.merge("default")
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge("default")
    torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


def test_merge_into_nf4_is_refused():
    layer = LoRALinear(NF4Linear.from_weight(torch.randn(8, 64)))
    layer.add_adapter("default", 2, 4)
    with pytest.raises(LorakitError, match="4-bit"):
        layer.merge("default")


def test_named_adapters_and_active_set():
    base = nn.Linear(8, 8)
    layer = LoRALinear(base)
    layer.add_adapter("a", 2, 4)
    layer.add_adapter("b", 3, 6)
    _randomize_b(layer, "a")
    _randomize_b(layer, "b")
    x = torch.randn(2, 8)
    da, db = layer._delta(x, "a"), layer._delta(x, "b")
    torch.testing.assert_close(layer(x), base(x) + da + db)
    layer.active_adapters = ["b"]
    torch.testing.assert_close(layer(x), base(x) + db)
    layer.active_adapters = []
    torch.testing.assert_close(layer(x), base(x))
    with pytest.raises(LorakitError, match="already exists"):
        layer.add_adapter("a", 2, 4)
    with pytest.raises(LorakitError, match="positive"):
        layer.add_adapter("c", 0, 4)


@pytest.mark.parametrize("same_targets", [True, False])
def test_mixed_adapter_batch_equals_rows_alone(same_targets):
    model = tiny_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    names_b = names if same_targets else ["model.layers.1.mlp.down_proj"]  # b misses a's layers
    attach_lora(model, names, "a", rank=2, alpha=4)
    attach_lora(model, names_b, "b", rank=4, alpha=4)
    for n in names:
        _randomize_b(model.get_submodule(n), "a")
    for n in names_b:
        _randomize_b(model.get_submodule(n), "b")
    ids = torch.randint(0, 400, (3, 7))
    rows = ["a", None, "b"]
    with torch.no_grad(), row_adapters(model, rows):
        mixed = model(ids).logits
    for i, r in enumerate(rows):
        set_active_adapters(model, [r] if r else [])
        with torch.no_grad():
            alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_an_adapter_added_to_a_model_in_eval_mode_adds_no_dropout():
    model = tiny_model("llama")  # in eval mode
    x = torch.randint(0, 400, (2, 12))
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    attach_lora(model, names, "a", rank=4, alpha=8, dropout=0.5)
    assert not any(m.training for m in model.modules())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits)  # deterministic
        model.train()
        assert (model(x).logits - model(x).logits).abs().max() > 0  # training: dropout on


def test_only_lora_parameters_train():
    model = tiny_model("llama")
    attach_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"])
    names = mark_only_lora_trainable(model)
    assert set(names) == {
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_B.default.weight",
        "model.layers.1.self_attn.o_proj.lora_A.default.weight",
        "model.layers.1.self_attn.o_proj.lora_B.default.weight",
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)


def test_attach_to_non_linear_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="not a linear layer"):
        attach_lora(model, ["model.layers.0.input_layernorm"])


def test_merge_lora_unload_gives_plain_model():
    model = tiny_model("gpt2")
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    attach_lora(model, names)
    for n in names:
        _randomize_b(model.get_submodule(n))
    ids = torch.randint(0, 400, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    merge_lora(model, "default", unload=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_equal_peft_given_the_same_weights(kind, targets, use_rslora):
    peft = pytest.importorskip("peft")
    reference = tiny_model(kind)
    ours = tiny_model(kind)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=use_rslora,
        fan_in_fan_out=kind == "gpt2",
        init_lora_weights=False,  # random A and B
    )
    peft_model = peft.get_peft_model(reference, config).eval()
    from lorakit.lora.targets import resolve_targets

    modules, _ = resolve_targets(ours, targets)
    attach_lora(ours, modules, rank=4, alpha=8, use_rslora=use_rslora)
    peft_sd = peft_model.state_dict()
    for n in modules:
        layer = ours.get_submodule(n)
        prefix = f"base_model.model.{n}"
        layer.lora_A["default"].weight.data.copy_(peft_sd[f"{prefix}.lora_A.default.weight"])
        layer.lora_B["default"].weight.data.copy_(peft_sd[f"{prefix}.lora_B.default.weight"])
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
