"""Loading: MODEL resolution and its errors, fp32 and NF4 loads against transformers, tokenizer,
dtypes, incomplete checkpoints; slow: the embedded SmolLM2 GGUF against transformers' reader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.lora.layer import is_conv1d
from lorakit.lora.targets import linear_modules
from lorakit.models.loading import load_model, resolve_model
from lorakit.models.precision import default_dtype
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

IDS = torch.randint(0, 400, (3, 11), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _reference(path: Path):
    """transformers' own fp32 load of the directory: the oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _nf4_roundtrip_(model: torch.nn.Module) -> None:
    """In place: every linear weight but the head becomes dequantize_nf4(quantize_nf4(W))."""
    with torch.no_grad():
        for module in linear_modules(model).values():
            weight = module.weight.T if is_conv1d(module) else module.weight  # (out, in)
            approx = dequantize_nf4(quantize_nf4(weight.contiguous()), torch.float32)
            module.weight.copy_(approx.T if is_conv1d(module) else approx)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _rewrite(path: Path, edit) -> None:
    """Apply `edit` to the state dict of the single-file checkpoint in `path`."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of `tiny_model_dir` with random biases, that tests may edit."""
    import shutil

    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    gen = torch.Generator().manual_seed(3)

    def randomize_biases(tensors):
        for key, t in tensors.items():
            if key.endswith(".bias") and t.dim() == 1:
                tensors[key] = torch.randn(t.shape, generator=gen) * 0.2

    _rewrite(path, randomize_biases)
    return path


class _Trap:
    """Unpickling this creates a file: proof that something unpickled the weights."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


# --- resolving MODEL ----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(LorakitError, match="not found.*model directory, a .gguf file"):
        resolve_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LorakitError, match="no config.json"):
        resolve_model(tmp_path)


def test_pickle_only_directory_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "pickled"
    tiny_model("llama").config.save_pretrained(path)
    sentinel = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("lorakit tried to unpickle model weights")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    for call in (resolve_model, load_model):
        with pytest.raises(LorakitError, match="never loads") as info:
            call(path)
        assert "safetensors" in str(info.value) and "safe_serialization=True" in str(info.value)
    assert not sentinel.exists()


def test_config_without_weights(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="no .safetensors weights"):
        resolve_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(LorakitError, match="not a .gguf file"):
        resolve_model(file)


def test_corrupt_gguf(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"not a gguf file" * 10)
    assert resolve_model(file).kind == "gguf"
    with pytest.raises(LorakitError, match="not a GGUF file"):
        load_model(file)


def test_corrupt_or_truncated_safetensors(model_dir, tmp_path):
    import shutil

    for damage, message in [
        (lambda b: b[: len(b) - 100], "truncated or corrupt"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not a valid safetensors file"),
        (lambda b: (len(b) * 2).to_bytes(8, "little") + b[8:], "not a valid safetensors file"),
    ]:
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(model_dir, broken)
        (file,) = broken.glob("*.safetensors")
        file.write_bytes(damage(file.read_bytes()))
        with pytest.raises(LorakitError, match=message):
            load_model(broken, with_tokenizer=False)


def test_directory_with_one_gguf_resolves_to_it(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    source = resolve_model(tmp_path)
    assert (source.kind, source.path) == ("gguf", tmp_path / "m.gguf")


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_unknown_quantization(tiny_model_dir):
    with pytest.raises(LorakitError, match="unknown quantization 'int3'"):
        load_model(tiny_model_dir, quant="int3")


# --- fp32 and NF4 loads against transformers ----------------------------------------------------


def test_fp32_load_equals_transformers(model_dir):
    model, _, source = load_model(model_dir, quant="none", dtype=torch.float32)
    assert source.kind == "hf" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    reference = _reference(model_dir)
    assert {n: p.dtype for n, p in model.named_parameters()} == {
        n: torch.float32 for n, _ in reference.named_parameters()
    }
    ref_sd = reference.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref_sd[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)
    if reference.config.tie_word_embeddings:  # tied: one tensor, not two copies
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_gpt2_checkpoint_without_the_transformer_prefix(tmp_path, _tiny_tokenizer_base):
    """openai-community/gpt2's files say `h.0.attn.c_attn.weight`, not `transformer.h.0...`."""
    path = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(path)
    _rewrite(path, lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    assert all(not k.startswith("transformer.") for k in load_file(path / "model.safetensors"))
    reference = _reference(path)  # transformers maps the keys itself
    model, _, _ = load_model(path, quant="none", dtype=torch.float32, with_tokenizer=False)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_nf4_load_equals_reference_with_dequantized_weights(model_dir):
    model, _, _ = load_model(model_dir, quant="nf4", dtype=torch.float32)
    assert not any(m.training for m in model.modules())  # the NF4 layers put in too
    reference = _reference(model_dir)
    head = model.get_output_embeddings()
    linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, NF4Linear))}
    linear |= {n for n, m in model.named_modules() if is_conv1d(m)}
    nf4 = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert nf4 == set(linear_modules(reference))  # every linear layer...
    assert linear - nf4 == {"lm_head"} and not isinstance(head, NF4Linear)  # ...but the head
    assert not any(p.requires_grad for p in model.parameters())
    # Biases (random in model_dir) came along into the NF4 layers.
    ref_modules = dict(reference.named_modules())
    for n in nf4:
        bias = ref_modules[n].bias
        assert (model.get_submodule(n).bias is None) is (bias is None), n
        if bias is not None:
            torch.testing.assert_close(model.get_submodule(n).bias, bias, rtol=0, atol=0)

    _nf4_roundtrip_(reference)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_nf4_logits_are_statistically_close_to_fp32(model_dir):
    """How far NF4 moves the logits, judged against noise of the same size.

    NF4's error on Gaussian weights is ~9.2% of their RMS (measured on 2^20 N(0, 1) samples;
    the tiny models' weights are N(0, 0.2)). Quantization error should act like unbiased noise:
    replacing it by Gaussian noise of the same RMS, per layer, moved the logits of these tiny
    random models by the same amount (NF4 / noise between 0.85 and 1.2 over 12 model/seed
    pairs), so 1.5x the noise effect is the bound. These 2-layer random models amplify weight
    error ~3-4x (relative logit error 0.25-0.37 measured), so an absolute bound of 0.5 holds
    too; a wrong scale or code table would give errors of order 1.
    """
    from transformers import AutoModelForCausalLM

    model, _, _ = load_model(model_dir, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    reference = _reference(model_dir)
    fp32, nf4 = _logits(reference), _logits(model)
    error = _rel(nf4, fp32)

    layers = linear_modules(reference)
    nf4_layers = dict(model.named_modules())
    noise_errors = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        noisy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, module in linear_modules(noisy).items():
                exact = layers[name].weight
                approx = nf4_layers[name].dequantized_weight(torch.float32)
                approx = approx.T if is_conv1d(module) else approx
                weight_error = _rel(approx, exact)
                assert 0.08 < weight_error < 0.11, (name, weight_error)  # really 4 bits, not more
                rms = (approx - exact).pow(2).mean().sqrt()
                module.weight.add_(torch.randn(exact.shape, generator=gen) * rms)
        noise_errors.append(_rel(_logits(noisy), fp32))
    noise = sum(noise_errors) / len(noise_errors)
    assert 0.05 < error < 0.5
    assert error < 1.5 * noise, (error, noise_errors)


def test_weights_before_biases_across_shards(model_dir):
    """A sharded checkpoint may hold a layer's weight in one file and its bias in the next."""
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if "bias" not in k},
        "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if "bias" in k},
    }
    weight_map = {}
    for file, part in shards.items():
        save_file(part, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    reference = _reference(model_dir)
    _nf4_roundtrip_(reference)
    model, _, _ = load_model(model_dir, quant="nf4", dtype=torch.float32, with_tokenizer=False)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


# --- tokenizer and dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_tokenizer_encodes_and_decodes(model_dir, _tiny_tokenizer_base):
    _, tokenizer, _ = load_model(model_dir, quant="none", dtype=torch.float32)
    text = "What does kludge mean in hacker jargon? ÿ émoji 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids == _tiny_tokenizer_base(text)["input_ids"] and len(ids) > 5
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_default_dtype_for_what_is_not_quantized(model_dir, monkeypatch):
    model, _, _ = load_model(model_dir, with_tokenizer=False)  # quant="nf4", dtype default
    expected = default_dtype()
    assert {p.dtype for p in model.parameters()} == {expected}
    assert all(b.dtype != torch.float32 or b.numel() < 1000 for b in model.buffers())
    # Force bf16 so the check means something on machines whose default is fp32.
    monkeypatch.setattr("lorakit.models.loading.default_dtype", lambda device="cpu": torch.bfloat16)
    model, _, _ = load_model(model_dir, quant="none", with_tokenizer=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bf16 = _logits(model)
    reference = _logits(_reference(model_dir))
    assert torch.isfinite(bf16).all() and _rel(bf16, reference) < 0.1  # bf16 has 8 bits


# --- incomplete checkpoints ---------------------------------------------------------------------


def _drop_key(path: Path, ending: str) -> str:
    tensors = load_file(path / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(ending))
    del tensors[key]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("what", ["linear weight", "layer norm", "quantized bias"])
def test_checkpoint_missing_a_tensor(model_dir, quant, what):
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    gpt2 = model_type == "gpt2"
    ending = {
        "linear weight": "h.1.mlp.c_fc.weight" if gpt2 else "1.mlp.down_proj.weight",
        "layer norm": "h.1.ln_2.weight" if gpt2 else "1.post_attention_layernorm.weight",
        "quantized bias": {"gpt2": "h.0.attn.c_attn.bias", "qwen2": "0.self_attn.k_proj.bias"}.get(
            model_type
        ),
    }[what]
    if ending is None:
        pytest.skip(f"{model_type} has no bias in its linear layers")
    key = _drop_key(model_dir, ending)
    with pytest.raises(LorakitError, match="lacks 1 weight") as info:
        load_model(model_dir, quant=quant, dtype=torch.float32, with_tokenizer=False)
    assert key.removeprefix("transformer.") in str(info.value)
    assert "complete checkpoint" in str(info.value)


# --- slow: the embedded default model -----------------------------------------------------------

PROMPT = (
    "<|im_start|>user\nWhat does kludge mean in hacker jargon?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smollm2_fp32():
    pytest.importorskip("gguf")
    try:
        return load_model("smollm2", quant="none", dtype=torch.float32)
    except LorakitError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_fp32_equals_transformers_gguf_reader(smollm2_fp32):
    """Our streaming GGUF path (incl. undoing llama.cpp's Q/K permutation) matches transformers'."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, source = smollm2_fp32
    assert source.kind == "gguf" and source.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    ours = _logits(model, ids)
    reference = AutoModelForCausalLM.from_pretrained(
        source.path.parent, gguf_file=source.path.name, dtype=torch.float32
    ).eval()
    expected = _logits(reference, ids)
    del reference
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # And it is a working instruction model: the answer starts sensibly (not garbage ids).
    assert ours[0, -1].argmax().item() < len(tokenizer)


def _jargon_text(entries: int = 5) -> str:
    """A few entries of the packaged data set: ~200 tokens of real text."""
    from importlib.resources import files

    lines = (files("lorakit") / "datasets" / "jargon.jsonl").read_text().splitlines()[:entries]
    return "\n\n".join(f"{r['instruction']}\n{r['output']}" for r in map(json.loads, lines))


@pytest.mark.slow
def test_smollm2_nf4_has_210_nf4_layers(smollm2_fp32):
    fp32_model, tokenizer, _ = smollm2_fp32
    model, _, _ = load_model("smollm2", quant="nf4", dtype=torch.float32, with_tokenizer=False)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 210  # 30 blocks x (q, k, v, o, gate, up, down); the tied head is not
    assert set(nf4) == set(linear_modules(fp32_model))
    assert not any(p.requires_grad for p in model.parameters())
    # Each NF4 weight is the NF4 image of the fp32 weight, so the Q/K permutation of the GGUF
    # was undone before quantizing (checked on the first and last block).
    for name in (n for n in nf4 if n.startswith(("model.layers.0.", "model.layers.29."))):
        exact = fp32_model.get_submodule(name).weight
        expected = dequantize_nf4(quantize_nf4(exact), torch.float32)
        torch.testing.assert_close(nf4[name].dequantized_weight(torch.float32), expected)

    # NF4 costs a 135M model something; measured on this text (200 tokens): +0.21 nats of loss,
    # top-1 agreement 0.61, relative logit error 0.19. The bounds leave room, not slack for bugs
    # (an unpermuted or mis-scaled weight gives agreement near 0 and loss far above 5).
    ids = tokenizer(_jargon_text(), return_tensors="pt")["input_ids"][:, :200]
    fp32, quantized = _logits(fp32_model, ids)[0], _logits(model, ids)[0]
    targets = ids[0, 1:]
    loss_fp32 = torch.nn.functional.cross_entropy(fp32[:-1], targets).item()
    loss_nf4 = torch.nn.functional.cross_entropy(quantized[:-1], targets).item()
    assert loss_nf4 - loss_fp32 < 0.5, (loss_fp32, loss_nf4)
    assert (quantized.argmax(-1) == fp32.argmax(-1)).float().mean().item() > 0.5
    assert _rel(quantized, fp32) < 0.3


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8, vocab_size=10).save_pretrained(
        tmp_path
    )
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LorakitError, match="'t5' is an encoder-decoder model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(LorakitError, match="model type 'no-such-model' is unknown to transformers"):
        load_model(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_a_loaded_model_does_not_keep_its_file_mapped(model_dir, quant):
    """safetensors maps the file; a tensor kept as a view of it (same dtype) would keep the
    whole file mapped and resident for as long as the model lives."""
    model, _, _ = load_model(model_dir, quant=quant, dtype=torch.float32, with_tokenizer=False)
    files = [str(p.resolve()) for p in Path(model_dir).glob("*.safetensors")]
    assert files
    maps = Path("/proc/self/maps").read_text()
    assert not [f for f in files if f in maps]
    assert model.get_input_embeddings().weight.dtype == torch.float32  # nothing was cast
