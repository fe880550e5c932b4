"""Target selection and the anatomy report."""

import pytest
from conftest import tiny_model
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.anatomy import anatomy, format_anatomy, module_tree
from lorakit.lora.targets import resolve_targets


def _leafs(names):
    return {".".join(n.split(".")[-2:]) for n in names}


def test_llama_default_is_attention_projections():
    model = tiny_model("llama")
    names, peft_targets = resolve_targets(model, None)
    assert len(names) == 2 * 4
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert peft_targets == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_gpt2_default_is_attention_only_not_mlp_c_proj():
    model = tiny_model("gpt2")
    names, _ = resolve_targets(model, "default")
    assert _leafs(names) == {"attn.c_attn", "attn.c_proj"}
    assert len(names) == 4


def test_all_linear_never_includes_the_head():
    for kind in ("llama", "qwen2", "gpt2"):
        model = tiny_model(kind)
        names, _ = resolve_targets(model, "all-linear")
        expected = {
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or "Conv1D" in type(m).__name__
        } - {"lm_head"}
        assert set(names) == expected


def test_names_and_regex():
    model = tiny_model("llama")
    names, _ = resolve_targets(model, "q_proj, down_proj")
    assert _leafs(names) == {"self_attn.q_proj", "mlp.down_proj"}
    names, peft_targets = resolve_targets(model, r"re:.*layers\.1\..*_proj")
    assert all(".layers.1." in n for n in names) and len(names) == 7
    assert peft_targets == r".*layers\.1\..*_proj"


def test_unknown_name_lists_candidates():
    model = tiny_model("llama")
    with pytest.raises(LorakitError, match="'qproj' matches no linear layer; candidates: .*q_proj"):
        resolve_targets(model, "qproj")
    with pytest.raises(LorakitError, match="matches no linear layer"):
        resolve_targets(model, "re:nothing.*")
    with pytest.raises(LorakitError, match="invalid"):
        resolve_targets(model, "re:(")


class _Mystery(nn.Module):
    """An architecture the table does not know."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "mystery"})()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"attention": nn.ModuleDict({"wq": nn.Linear(4, 4)}), "ff": nn.Linear(4, 4)}
            )
            for _ in range(3)
        )
        self.head = nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.head


def test_unknown_architecture_falls_back_to_attention_linears():
    model = _Mystery()
    names, _ = resolve_targets(model, None)
    assert names == [f"blocks.{i}.attention.wq" for i in range(3)]
    assert "lm_head" not in resolve_targets(model, "all-linear")[0]
    assert "head" not in resolve_targets(model, "all-linear")[0]


def test_module_tree_folds_repeated_blocks():
    model = tiny_model("llama")
    tree = "\n".join(module_tree(model))
    assert "(0-1): 2 x LlamaDecoderLayer" in tree
    assert tree.count("q_proj") == 1


def test_anatomy_counts():
    model = tiny_model("llama")
    report = anatomy(model, rank=8, spec="q_proj,v_proj")
    total = sum(p.numel() for p in model.parameters())
    assert report["parameters"] == total
    # q: 32->32, v: 32->16 (2 kv heads of 8), two layers
    expected = 2 * 8 * ((32 + 32) + (32 + 16))
    assert report["adapter"]["parameters"] == expected
    assert report["adapter"]["size_mb"] == pytest.approx(expected * 4 / 1e6)
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["q_proj"]["default"] and not by_name["gate_proj"]["default"]
    assert by_name["k_proj"]["out_features"] == 16 and by_name["k_proj"]["count"] == 2
    assert report["memory_mb"]["nf4"] < report["memory_mb"]["bf16"] < report["memory_mb"]["fp32"]
    text = format_anatomy(report, "tiny")
    assert "Default targets: q_proj, k_proj, v_proj, o_proj" in text
    with pytest.raises(LorakitError, match="rank"):
        anatomy(model, rank=0)


def test_candidates_see_gpt2_c_proj_twice():
    report = anatomy(tiny_model("gpt2"))
    names = {c["name"] for c in report["candidates"]}
    assert {"attn.c_proj", "mlp.c_proj", "c_attn", "c_fc"} <= names


def test_targets_resolve_the_same_after_lora_is_attached():
    from lorakit.lora.layer import attach_lora

    model = tiny_model("llama")
    before, _ = resolve_targets(model, "default")
    attach_lora(model, before, "first")
    after, _ = resolve_targets(model, "default")
    assert after == before
    assert (
        resolve_targets(model, "all-linear")[0]
        == resolve_targets(tiny_model("llama"), "all-linear")[0]
    )
    attach_lora(model, after, "second")  # a second adapter on the same layers
    assert set(model.get_submodule(before[0]).lora_A) == {"first", "second"}
