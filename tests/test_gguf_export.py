"""`lorakit export --format gguf`: adapters and merged models for llama.cpp.

The reference for llama.cpp's side is the format itself: a LoRA GGUF is applied as
W + alpha / rank * lora_b @ lora_a on the base GGUF's weights (rank: lora_b's columns), and
transformers' GGUF reader (an independent implementation) undoes the converter's q/k row order.
"""

import json

import numpy as np
import pytest
import torch

from lorakit.cli import main
from lorakit.lora.layer import attach_lora, lora_layers
from lorakit.lora.peft_format import AdapterConfig, save_adapter
from lorakit.models.gguf_export import _copy_settings
from lorakit.models.loading import load_model, resolve_model

gguf = pytest.importorskip("gguf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _adapter(model, path, rank=8, alpha=16.0, use_rslora=False, alpha_pattern=None, seed=0):
    """A random adapter whose B is large enough to change the model's answers."""
    modules = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    attach_lora(model, modules, "x", rank=rank, alpha=alpha, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):  # A drawn as PEFT's init draws it, but from `gen`
        a, b = layer.lora_A["x"].weight, layer.lora_B["x"].weight
        a.data.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) / a.shape[1] ** 0.5)
        b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    config = AdapterConfig(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=TARGETS,
        base_model=resolve_model("smollm2").name,
        alpha_pattern=alpha_pattern or {},
    )
    if alpha_pattern:  # the layers take the pattern's scaling, as load_adapter would give them
        for name, layer in lora_layers(model):
            layer.scaling["x"] = config.alpha_for(name) / (rank**0.5 if use_rslora else rank)
    save_adapter(model, path, config, "x")
    return path


def _llama_cpp_applies(base_gguf, adapter_gguf, out):
    """The base with the adapter added as llama.cpp adds it, written as an F32 GGUF."""
    base, lora = gguf.GGUFReader(str(base_gguf)), gguf.GGUFReader(str(adapter_gguf))
    alpha = float(lora.fields["adapter.lora.alpha"].contents())
    factors = {t.name: np.array(t.data) for t in lora.tensors}
    writer = gguf.GGUFWriter(str(out), base.fields["general.architecture"].contents())
    _copy_settings(base, writer, base_gguf)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in base.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name + ".lora_a" in factors:
            a, b = factors[t.name + ".lora_a"], factors[t.name + ".lora_b"]
            w = w + alpha / b.shape[1] * (b.astype(np.float32) @ a.astype(np.float32))
        writer.add_tensor(t.name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[1, 504, 3458, 314, 253, 2726, 30, 355, 2118, 42, 9863, 28]])


@pytest.fixture(scope="module")
def default_gguf():
    return resolve_model("smollm2").path


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "rslora+alpha_pattern"])
def test_an_exported_adapter_is_what_llama_cpp_adds_to_the_gguf_base(
    tmp_path, default_gguf, variant
):
    model, _, _ = load_model(
        "smollm2", quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
    )
    model.float()
    kw = {} if variant == "plain" else {"use_rslora": True, "alpha_pattern": {"v_proj": 4.0}}
    adapter = _adapter(model, tmp_path / "ad", **kw)
    want = _logits(model, IDS)
    out = tmp_path / "ad.gguf"
    assert main(["export", str(adapter), "--out", str(out)]) == 0
    lora = gguf.GGUFReader(str(out))
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["adapter.type"].contents() == "lora"
    assert lora.fields["general.architecture"].contents() == "llama"
    names = {t.name for t in lora.tensors}
    assert len(names) == 30 * 4 * 2 and "blk.29.attn_output.weight.lora_b" in names
    a = next(t for t in lora.tensors if t.name == "blk.0.attn_q.weight.lora_a")
    assert list(a.shape) == [576, 8]  # GGUF's ne: (in, rank), i.e. A as (rank, in)
    _llama_cpp_applies(default_gguf, out, tmp_path / "applied.gguf")
    applied, _, _ = load_model(
        str(tmp_path / "applied.gguf"),
        quant="none",
        dtype=torch.float32,
        device="cpu",
        with_tokenizer=False,
    )
    got = _logits(applied.float(), IDS)
    base, _, _ = load_model(
        "smollm2", quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
    )
    assert (want - _logits(base.float(), IDS)).abs().max() > 0.5  # the adapter matters
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_a_merged_gguf_loads_with_the_adapters_answers(tmp_path, default_gguf):
    model, _, _ = load_model(
        "smollm2", quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
    )
    bare = _logits(model, IDS)
    adapter = _adapter(model, tmp_path / "ad")
    want = _logits(model, IDS)
    for outtype, tolerance in [("f32", 2e-3), ("q8_0", None)]:
        out = tmp_path / f"merged-{outtype}.gguf"
        args = ["export", str(adapter), "--merged", "--outtype", outtype, "--out", str(out)]
        assert main(args) == 0
        merged = gguf.GGUFReader(str(out))
        assert merged.fields["tokenizer.chat_template"].contents()  # the base's settings kept
        got = _logits(
            load_model(
                str(out), quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
            )[0].float(),
            IDS,
        )
        if tolerance:
            torch.testing.assert_close(got, want, atol=tolerance, rtol=1e-3)
        else:  # 8 bits: within Q8_0's error (0.6% a weight; 0.14 a logit here), adapter kept
            error = (got - want).abs().mean()
            assert error < 0.3 and error < 0.5 * (got - bare).abs().mean()


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_refusals_are_one_line(tmp_path, capsys, tiny_model_dir):
    model, _, _ = load_model(
        "smollm2", quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
    )
    adapter = _adapter(model, tmp_path / "ad")
    out = tmp_path / "ad.gguf"
    out.write_text("keep me")
    capsys.readouterr()

    def refused(args, message):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused(["export", str(adapter), "--out", str(out)], "exists; add --overwrite")
    assert out.read_text() == "keep me"
    refused(["export", str(adapter), "--out", str(tmp_path)], "is a directory")
    # an adapter of another LLaMA: its sizes are not the default model's
    tiny = load_model(str(tiny_model_dir), quant="none", device="cpu", with_tokenizer=False)[0]
    small = _adapter(tiny, tmp_path / "small")
    args = [
        "export",
        str(small),
        "--model",
        "smollm2",
        "--merged",
        "--out",
        str(tmp_path / "s.gguf"),
    ]
    refused(args, "the adapter is for another base")
    refused(
        [
            "export",
            str(adapter),
            "--out",
            str(tmp_path / "m.gguf"),
            "--merged",
            "--model",
            str(tiny_model_dir),
        ],
        "lorakit merge",
    )
    # the tied output head: llama.cpp's SmolLM2 has no weight of its own for it
    config = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 576)
    weights["base_model.model.lm_head.lora_B.weight"] = torch.zeros(49152, 8)
    save_file(weights, adapter / "adapter_model.safetensors")
    config["target_modules"] = [*TARGETS, "lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(["export", str(adapter), "--out", str(tmp_path / "t.gguf")], "lm_head")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "t.gguf").exists()


@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)
def test_a_base_llama_cpp_converts_otherwise_is_refused_naming_it(tmp_path, capsys, tiny_model_dir):
    model = load_model(
        str(tiny_model_dir), quant="none", dtype=torch.float32, device="cpu", with_tokenizer=False
    )[0]
    attach_lora(model, ["transformer.h.0.attn.c_attn"], "x", rank=2, alpha=4)
    config = AdapterConfig(
        rank=2,
        alpha=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        base_model=str(tiny_model_dir),
    )
    save_adapter(model, tmp_path / "ad", config, "x")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformer.h.0.attn.c_attn" in err[0] and "gpt2" in err[0], err
