"""`lorakit train --shard-base` under torchrun: the 4-bit base split over the ranks (FSDP2).

The layout first (one process): `NF4Linear.as_blocks` keeps the same weight, and any cut along
its rows leaves shards that dequantize alone, block for block. Then two gloo ranks on the CPU:
each holds half of the 4-bit state, and the run takes the same steps as one process."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import CHATML_TEMPLATE, tiny_model
from test_distributed import _data, _losses, _same_adapter, _train

from lorakit.errors import LorakitError
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import NF4State, dequantize_nf4
from lorakit.training.config import TrainConfig, validate

SHAPES = [(32, 32), (300, 200), (256, 512)]  # under one super-block, ragged, four whole ones


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_blocks_keep_the_weight_and_its_outputs(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layer = NF4Linear.from_weight(w, double_quant=double_quant)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1), requires_grad=True)
    weight, y = layer.dequantized_weight(torch.float32), layer(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    layer.as_blocks()
    assert torch.equal(layer.dequantized_weight(torch.float32), weight)
    y2 = layer(x)
    assert torch.equal(y2, y)
    assert torch.equal(torch.autograd.grad(y2.square().sum(), x)[0], grad)
    # frozen parameters now (what FSDP2 shards), one row a super-block of 256 blocks of 64
    params = dict(layer.named_parameters())
    assert {"packed", "absmax"} <= params.keys()
    assert not any(p.requires_grad for p in params.values())
    rows = -(-w.numel() // (64 * 256))
    assert params["packed"].shape == (rows, 64 * 256 // 2)
    assert params["absmax"].shape == (rows, 256)


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_cut_along_rows_is_whole_blocks(ranks):
    """FSDP2 cuts dim 0 into `torch.chunk`s: each one, alone, dequantizes to its part of the
    weight (no block or scale of the scales straddles two ranks)."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # 4 rows, the last ragged
    layer = NF4Linear.from_weight(w)
    flat = layer.dequantized_weight(torch.float32).reshape(-1)
    layer.as_blocks()
    state, per_row = layer.state, 64 * 256
    chunks = [torch.chunk(getattr(layer, n), ranks) for n in ("packed", "absmax", "absmax_scale")]
    start = 0
    for packed, absmax, scale in zip(*chunks, strict=True):
        n = min(packed.shape[0] * per_row, w.numel() - start)
        alone = NF4State(
            packed=packed.reshape(-1),
            absmax=absmax.reshape(-1),
            shape=torch.Size([n]),
            dtype=torch.float32,
            offset=state.offset,
            absmax_scale=scale.reshape(-1).view(torch.float32),
            absmax_code=state.absmax_code,
        )
        assert torch.equal(dequantize_nf4(alone, torch.float32), flat[start : start + n])
        start += n
    assert start == w.numel()


def test_shard_base_is_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(LorakitError, match="torchrun --nproc-per-node N"):
        validate(TrainConfig(shard_base=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LorakitError, match="needs --quant nf4"):
        validate(TrainConfig(shard_base=True, quant="none"))
    with pytest.raises(LorakitError, match="drop one of them"):
        validate(TrainConfig(shard_base=True, cache_weights="on"))


@pytest.fixture(params=["llama", "qwen2"])  # the output head tied to the embeddings, and not
def wide_model_dir(request, tmp_path_factory, _tiny_tokenizer_base):
    """A small model whose every linear layer is several super-blocks, so that two ranks split
    each one."""
    path = tmp_path_factory.mktemp(f"wide-{request.param}")
    tok = copy.deepcopy(_tiny_tokenizer_base)
    tok.chat_template = CHATML_TEMPLATE
    model = tiny_model(request.param, len(tok), hidden_size=256, intermediate_size=512)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_two_ranks_holding_half_the_base_each_take_one_process_steps(wide_model_dir, tmp_path):
    data = _data(tmp_path)
    # batch 3: one rank runs two passes, the other one real pass and one of weight 0
    args = ("--steps", "3", "--batch-size", "3")
    _train(wide_model_dir, data, tmp_path / "one", 1, *args)
    two = _train(wide_model_dir, data, tmp_path / "two", 2, *args, "--shard-base")
    held, total = map(float, re.search(r"holds ([\d.]+) of their ([\d.]+) MB", two.stdout).groups())
    assert held == pytest.approx(total / 2, rel=0.02)
    # bf16 compute: the split base is dequantized per use, the whole one may be cached
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-3)
    _same_adapter(tmp_path / "one", tmp_path / "two")
    assert two.stdout.count("done: 3 steps") == 1


@pytest.mark.parametrize("wide_model_dir", ["llama"], indirect=True)
def test_a_sharded_run_resumes_where_it_stopped(wide_model_dir, tmp_path):
    data, out = _data(tmp_path), tmp_path / "two"
    _train(wide_model_dir, data, tmp_path / "one", 1, "--steps", "4")
    _train(wide_model_dir, data, out, 2, "--steps", "2", "--save-every", "1", "--shard-base")
    _train(wide_model_dir, data, out, 2, "--steps", "4", "--resume", "--shard-base")
    assert _losses(out)[-2:] == pytest.approx(_losses(tmp_path / "one")[-2:], rel=1e-3)
    _same_adapter(tmp_path / "one", out)
    assert json.loads((out / "train_config.json").read_text())["shard_base"] is True
