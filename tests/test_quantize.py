"""`lorakit quantize` and 4-bit checkpoints: what lorakit writes loads in transformers +
bitsandbytes with the same weights, what transformers + bitsandbytes saves loads in lorakit with
the same weights, lorakit reloads its own without quantizing again, and bad input is refused
with one line and nothing half-written. bitsandbytes (installed by the test dependencies) is
the oracle."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.models import quantized
from lorakit.models.checkpoint import entries
from lorakit.models.loading import empty_model, load_model
from lorakit.models.quantized import quantize_model, write_safetensors
from lorakit.quant.linear import NF4Linear
from lorakit.training import memory
from lorakit.training.config import TrainConfig

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


@pytest.fixture(autouse=True)
def _eager():
    # bitsandbytes' CPU fallback torch.compiles its dequantize once per shape (~2 s each).
    with torch._dynamo.config.patch(disable=True):
        yield


def nf4_layers(model) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of a 4-bit weight. Its AVX-512 CPU kernel (bitsandbytes
    0.50.2) gets rows that are not whole blocks wrong (these tiny models' 32-wide rows; real
    models' rows are multiples of 64), so those go through bitsandbytes' own generic code, the
    fallback it takes itself for odd shapes."""
    if packed.device.type != "cpu" or state.shape[-1] % state.blocksize == 0:
        return bnbf.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(
        flat, absmax.float(), state.code, state.blocksize, state.shape, state.dtype
    )


def bnb_weights(model) -> dict[str, torch.Tensor]:
    """Each bitsandbytes 4-bit layer's weight, dequantized by bitsandbytes, as (out, in)."""
    import bitsandbytes as bnb

    return {
        n: bnb_dequantize(m.weight.data, m.weight.quant_state).float()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.oracle
def test_what_lorakit_writes_loads_in_transformers_and_again_in_lorakit(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = quantize_model(tiny_model_dir, tmp_path / "nf4", shard_bytes=20_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded as asked
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"

    ours, _, _ = load_model(tiny_model_dir, dtype=torch.float32, with_tokenizer=False)
    expected = {n: m.dequantized_weight(torch.float32) for n, m in nf4_layers(ours).items()}
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    got = bnb_weights(theirs)
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name

    again, tokenizer, _ = load_model(out, dtype=torch.float32)
    assert tokenizer is not None
    for name, layer in nf4_layers(again).items():  # the same codes: not quantized again
        before = nf4_layers(ours)[name]
        assert torch.equal(layer.packed, before.packed) and torch.equal(layer.absmax, before.absmax)
        assert layer.offset == before.offset and layer.weight_shape == before.weight_shape
    assert torch.equal(logits(again), logits(ours))


def bnb_saved(model_dir, out, model_dir_dtype=torch.float32):
    """What transformers + bitsandbytes save for `model_dir` loaded in 4 bits (NF4, double
    quantization): the common "-bnb-4bit" checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=model_dir_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map="cpu"
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return model


@pytest.mark.oracle
def test_a_bnb_4bit_checkpoint_loads_with_its_weights(tiny_model_dir, tmp_path):
    bnb_model = bnb_saved(tiny_model_dir, tmp_path / "bnb")
    expected = bnb_weights(bnb_model)
    ours, _, _ = load_model(tmp_path / "bnb", dtype=torch.float32, with_tokenizer=False)
    layers = nf4_layers(ours)
    assert layers.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(layers[name].dequantized_weight(torch.float32), weight), name
    # The same model in full precision, given the dequantized weights: the same logits.
    plain, _, _ = load_model(
        tmp_path / "bnb", quant="none", dtype=torch.float32, with_tokenizer=False
    )
    assert not nf4_layers(plain)
    for name, weight in expected.items():
        module = plain.get_submodule(name)
        stored = module.weight.T if type(module).__name__ == "Conv1D" else module.weight
        assert torch.equal(stored, weight), name
    torch.testing.assert_close(logits(ours), logits(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_quantize_then_train_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_model_dir), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "MiB" in said
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i} " * 8} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*argv, "--steps", "2", "--seq-len", "64", "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_quantize_refuses_an_existing_output_and_a_quantized_source(
    tiny_model_dir, tmp_path, capsys
):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    err = one_line_error(["quantize", str(tiny_model_dir), "--out", str(taken)], capsys)
    assert "exists and is not empty" in err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_model_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    err = one_line_error(["quantize", str(out), "--out", str(tmp_path / "again")], capsys)
    assert "already NF4" in err and not (tmp_path / "again").exists()
    argv = ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--blocksize", "48"]
    err = one_line_error(argv, capsys)
    assert "--blocksize 48" in err


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_full_disk_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def fills_up(path, tensors):
        calls.append(path)
        if len(calls) == 2:  # the first shard is written, the second finds the disk full
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        write_safetensors(path, tensors)

    monkeypatch.setattr(quantized, "write_safetensors", fills_up)
    with pytest.raises(LorakitError, match="No space left on device; free some disk space"):
        quantize_model(tiny_model_dir, tmp_path / "nf4", shard_bytes=20_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def rewrite_without(file, drop: str) -> None:
    """The safetensors file again, lacking tensor `drop`."""
    kept = [(e.key, e.read()) for e in entries(file) if e.key != drop]
    write_safetensors(file, kept)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_broken_and_foreign_4bit_checkpoints_are_named(tiny_model_dir, tmp_path, capsys):
    out = quantize_model(tiny_model_dir, tmp_path / "nf4")
    file = out / "model.safetensors"
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_without(file, f"{name}.absmax")
    argv = ["generate", "--model", str(out), "--prompt", "hi", "--device", "cpu"]
    err = one_line_error(argv, capsys)
    assert f"tensor {name}.absmax is missing" in err

    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    for change, says in [
        ({"bnb_4bit_quant_type": "fp4"}, "FP4"),
        ({"load_in_4bit": False, "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "gptq"}, "quantized with gptq"),
    ]:
        config_file.write_text(
            json.dumps(
                {**config, "quantization_config": {**config["quantization_config"], **change}}
            )
        )
        err = one_line_error(argv, capsys)
        assert says in err and "16-bit original" in err


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_4bit_tensor_of_the_wrong_size_is_named(tiny_model_dir, tmp_path):
    out = quantize_model(tiny_model_dir, tmp_path / "nf4")
    file = out / "model.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = [(e.key, e.read()) for e in entries(file)]
    tensors = [(k, t[: t.numel() // 2] if k == name else t) for k, t in tensors]
    write_safetensors(file, tensors)
    with pytest.raises(LorakitError, match=f"tensor {name} holds .* bytes"):
        load_model(out, with_tokenizer=False)


def mapped_file(address: int) -> str | None:
    """The file whose mapping holds `address` in this process (/proc/self/maps), else None."""
    with open("/proc/self/maps") as f:
        lines = f.readlines()
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            path = fields[5].strip() if len(fields) == 6 else ""
            return path if path.startswith("/") else None  # not [heap], [stack]...
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_4bit_codes_stay_in_their_file_and_the_memory_estimate_knows(tiny_model_dir, tmp_path):
    out = quantize_model(tiny_model_dir, tmp_path / "nf4", shard_bytes=20_000)
    model, _, _ = load_model(out, dtype=torch.float32, with_tokenizer=False)
    shards = {str(p.resolve()) for p in out.glob("*.safetensors")}
    for name, layer in nf4_layers(model).items():
        assert mapped_file(layer.packed.data_ptr()) in shards, name  # a view of the file
        assert mapped_file(layer.absmax.data_ptr()) is None, name  # the scales are read
    plain, _, _ = load_model(tiny_model_dir, dtype=torch.float32, with_tokenizer=False)
    for name, layer in nf4_layers(plain).items():  # quantized here: in memory
        assert mapped_file(layer.packed.data_ptr()) is None, name

    cfg = TrainConfig(seq_len=64)
    mapped = memory.estimate(empty_model(model.config), cfg, torch.float32, 1)
    in_memory = memory.estimate(empty_model(plain.config), cfg, torch.float32, 1)
    codes = sum(m.packed.numel() for m in nf4_layers(model).values())
    assert mapped.mapped and not in_memory.mapped
    on_gpu = memory.estimate(empty_model(model.config), cfg, torch.float32, 1, device="cuda")
    assert not on_gpu.mapped  # a GPU holds its own copy of the codes
    assert mapped.codes == in_memory.codes == codes


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_train_streams_a_4bit_base_bigger_than_its_memory(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from lorakit.models.loading import load_config, resolve_model
    from lorakit.models.precision import default_dtype

    out = quantize_model(tiny_model_dir, tmp_path / "nf4")
    cfg = TrainConfig(model=str(out), seq_len=64, batch_size=1)
    meta = empty_model(load_config(resolve_model(out)))
    est = memory.estimate(meta, cfg, default_dtype("cpu"), 1)
    lean = est.total(checkpointing=True, cache=False)
    # room for all but half the codes: refused if they were in memory, streamed from the file
    monkeypatch.setattr(memory, "device_budget", lambda device, cap=None: lean - est.codes // 2)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": "Hi", "output": "yo " * 9}) + "\n" for _ in range(4))
    )
    argv = ["train", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "run")]
    assert (
        main([*argv, "--steps", "1", "--seq-len", "64", "--batch-size", "1", "--device", "cpu"])
        == 0
    )
    said = capsys.readouterr().out
    assert "do not all fit" in said and "read from disk" in said
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
