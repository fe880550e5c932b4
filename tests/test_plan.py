"""`lorakit plan`: memory and time from config.json alone, the settings `train` would pick."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from lorakit.cli import main
from lorakit.lora.targets import TESTED_ARCHITECTURES
from lorakit.training import memory
from lorakit.training.config import TrainConfig

FLAGS = ["--no-calibrate", "--seq-len", "64", "--device", "cpu"]


@pytest.fixture
def config_only(tmp_path):
    """What a user has before downloading a model: its config.json, no weights."""
    tiny_model("llama").config.save_pretrained(tmp_path)
    return tmp_path


def _plan(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_from_config_alone_adds_up_to_its_peak(config_only, capsys):
    plan = _plan(capsys, str(config_only), *FLAGS, "--memory", "16GB")
    assert plan["fits"] and plan["budget_bytes"] == 16 * 2**30
    mem, settings = plan["memory_bytes"], plan["settings"]
    kept = "activations_checkpointed" if settings["grad_checkpointing"] else "activations"
    parts = ["runtime", "base", "weight_cache", "adapter_and_optimizer", kept, "logits"]
    assert plan["peak_memory_bytes"] == sum(mem[p] for p in parts)
    assert mem["runtime"] > 0  # this process's own memory, measured
    assert plan["alternatives_bytes"]["full_finetune"] > plan["alternatives_bytes"]["lora_16bit"]

    # The same estimate and decisions `lorakit train` runs on (training.memory).
    from lorakit.models.loading import empty_model, load_config, resolve_model
    from lorakit.models.precision import default_dtype

    model = empty_model(load_config(resolve_model(config_only, weights=False)))
    cfg = TrainConfig(seq_len=64)
    dtype = default_dtype(torch.device("cpu"))  # fp32 or bf16, as this CPU computes
    est = memory.estimate(model, cfg, dtype, settings["micro_batch"])
    assert mem["base"] == est.base and mem["activations"] == est.activations

    # A bigger adapter costs more; the file itself is enough too.
    wide = _plan(capsys, str(config_only / "config.json"), *FLAGS, "--targets", "all-linear")
    assert wide["memory_bytes"]["adapter_and_optimizer"] > mem["adapter_and_optimizer"]


def test_plan_turns_checkpointing_on_as_memory_shrinks_and_says_when_nothing_fits(
    config_only, capsys, monkeypatch
):
    from lorakit.training import plan

    monkeypatch.setattr(plan, "runtime_bytes", lambda device: 300 * 2**20)  # steady, not measured
    roomy = _plan(capsys, str(config_only), *FLAGS, "--memory", "64GB", "--batch-size", "64")
    runtime = roomy["memory_bytes"]["runtime"]
    lean = roomy["leanest_bytes"]
    assert not roomy["settings"]["grad_checkpointing"]
    tight = _plan(
        capsys, str(config_only), *FLAGS, "--batch-size", "64", "--memory", f"{lean + 1}B"
    )
    assert tight["fits"] and tight["settings"]["grad_checkpointing"]
    assert tight["peak_memory_bytes"] < roomy["peak_memory_bytes"]
    short = _plan(capsys, str(config_only), *FLAGS, "--memory", f"{runtime}B")
    assert not short["fits"] and "needs at least" in short["why_not"]
    capsys.readouterr()
    assert main(["plan", str(config_only), *FLAGS, "--memory", f"{runtime}B"]) == 0
    assert "It does not fit" in capsys.readouterr().out


def test_plan_times_a_layer_of_the_model_here_for_the_speed(config_only, capsys):
    plan = _plan(capsys, str(config_only), "--seq-len", "64", "--device", "cpu")
    speed, settings = plan["speed"], plan["settings"]
    assert plan["fits"], plan["why_not"]
    assert speed["layers"] == tiny_model("llama").config.num_hidden_layers
    assert speed["layer_seconds"] > 0 and speed["head_seconds"] > 0
    tokens = settings["batch_size"] * settings["seq_len"]
    assert speed["seconds_per_step"] == pytest.approx(tokens / speed["tokens_per_s"])
    assert speed["outside_layers_seconds"] > 0  # timed with the layer taken out
    passes = settings["batch_size"] // settings["micro_batch"]
    once = speed["outside_layers_seconds"] + speed["head_seconds"]  # once a pass, not a layer
    layers = speed["layers"] * speed["layer_seconds"]
    assert speed["seconds_per_step"] == pytest.approx(passes * (layers + once))
    capsys.readouterr()
    assert main(["plan", str(config_only), "--seq-len", "64", "--device", "cpu"]) == 0
    assert "one decoder layer of this model's shapes" in capsys.readouterr().out
    assert _plan(capsys, str(config_only), *FLAGS)["speed"] is None  # --no-calibrate
    assert speed["run_seconds"] is None  # no --steps: the run's length is the data's
    run = _plan(capsys, str(config_only), "--seq-len", "64", "--steps", "200")["speed"]
    assert run["run_seconds"] == pytest.approx(200 * run["seconds_per_step"])
    capsys.readouterr()
    assert main(["plan", str(config_only), "--seq-len", "64", "--steps", "200"]) == 0
    assert "200 steps: about " in capsys.readouterr().out
    assert speed["forward_only_layers"] == 0
    # Adapters on the last layer only: backward never reaches the layers below it.
    last = _plan(capsys, str(config_only), "--seq-len", "64", "--targets", r"re:.*layers\.1\..*")
    assert last["speed"]["forward_only_layers"] == 1
    assert last["speed"]["forward_only_layer_seconds"] > 0


@pytest.mark.parametrize("kind", TESTED_ARCHITECTURES)
def test_the_timed_layer_is_one_layer_of_the_model_in_nf4_and_trains(kind):
    """What `plan` times: the architecture cut to one decoder layer and a small vocabulary, its
    linear layers (and experts) in NF4 as `load_model` stores them, the adapter attached; a
    training pass reaches every adapter weight. The model's own config is left as it was."""
    from test_architectures import _config

    from lorakit.models.loading import empty_model
    from lorakit.quant.experts import NF4Experts
    from lorakit.quant.linear import NF4Linear
    from lorakit.training.layer_timing import VOCAB, layer_time, random_layer_model
    from lorakit.training.loss import causal_lm_loss
    from lorakit.training.trainer import attach_adapter

    config = _config(kind, 1000)
    before = config.to_dict()
    cpu = torch.device("cpu")
    model = random_layer_model(config, cpu, torch.float32)
    assert config.to_dict() == before
    cut = model.config.get_text_config()
    assert cut.num_hidden_layers == 1 and cut.vocab_size == VOCAB
    assert model.get_input_embeddings().weight.shape[0] == VOCAB
    assert not any(p.is_meta for p in model.parameters())
    quantized = [m for m in model.modules() if isinstance(m, (NF4Linear, NF4Experts))]
    assert quantized and not any(p.requires_grad for p in model.parameters())

    attach_adapter(model, TrainConfig(targets="all-linear"))
    ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = causal_lm_loss(model.train(), {"input_ids": ids, "labels": ids})
    loss.backward()
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in b)

    cfg = TrainConfig(seq_len=16, batch_size=2)
    for checkpointing, cache in [(True, False), (False, True)]:
        timed = layer_time(empty_model(config), cfg, cpu, torch.float32, 2, checkpointing, cache)
        assert timed.outside > 0 and timed.trained >= 0  # the layer's: the pass less outside
        assert timed.trained_layers == config.num_hidden_layers


def _qwen2_moe_with_a_dense_first_layer():
    """A Qwen2-MoE of four layers whose first is dense (`mlp_only_layers`), on meta."""
    from test_architectures import _config

    from lorakit.models.loading import empty_model

    config = _config("qwen2_moe", 1000)
    config.num_hidden_layers, config.mlp_only_layers = 4, [0]
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * 4
    return empty_model(config)


def test_the_timed_layer_is_of_the_kind_most_layers_are():
    from lorakit.quant.experts import NF4Experts
    from lorakit.training.layer_timing import layer_time, random_layer_model

    model = _qwen2_moe_with_a_dense_first_layer()
    cpu = torch.device("cpu")
    cut = random_layer_model(model.config, cpu, torch.float32)
    assert any(isinstance(m, NF4Experts) for m in cut.modules())  # a MoE layer, not the dense
    cfg = TrainConfig(seq_len=16, batch_size=1, targets="all-linear")
    timed = layer_time(model, cfg, cpu, torch.float32, 1, False, False)
    assert timed.trained + timed.outside > 0 and timed.trained_layers == 4


def test_a_plan_whose_adapters_are_not_in_the_timed_kind_of_layer_says_so():
    from lorakit.training.plan import format_plan, make_plan

    model = _qwen2_moe_with_a_dense_first_layer()
    cfg = TrainConfig(seq_len=16, batch_size=1, targets=r"re:.*layers\.0\.mlp\.down_proj")
    plan = make_plan(model, cfg, torch.device("cpu"), torch.float32, 8 * 2**30)
    assert plan["fits"] and plan["speed"] is None
    assert "model.layers.0.mlp.down_proj" in plan["speed_note"]
    assert "Speed not estimated: none of the 1 adapted modules" in format_plan(plan, "m")


def test_the_timed_layer_computes_its_input_gradient_as_upper_layers_do(monkeypatch):
    """Every layer above the lowest adapted one passes a gradient down through its frozen 4-bit
    weights; the timed layer, the only one, must do that work too."""
    from conftest import tiny_model as tiny

    from lorakit.models.loading import empty_model
    from lorakit.quant import linear
    from lorakit.training.layer_timing import layer_time

    calls = {"forward": 0, "backward": 0}
    forward, backward = linear._NF4Matmul.forward, linear._NF4Matmul.backward

    def counted(name, fn):  # noqa: ANN001, ANN202
        def run(ctx, *args):  # noqa: ANN001, ANN002, ANN202
            calls[name] += 1
            return fn(ctx, *args)

        return staticmethod(run)

    monkeypatch.setattr(linear._NF4Matmul, "forward", counted("forward", forward))
    monkeypatch.setattr(linear._NF4Matmul, "backward", counted("backward", backward))
    model = empty_model(tiny("llama").config)
    cfg = TrainConfig(seq_len=16, batch_size=1)  # q, k, v, o adapted
    layer_time(model, cfg, torch.device("cpu"), torch.float32, 1, False, False)
    # every 4-bit matmul, q/k/v included, passes its gradient on: a backward for each forward
    assert calls["forward"] > 0 and calls["backward"] == calls["forward"], calls


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--memory", "lots"], "--memory 'lots' is not a size"),
        (["--seq-len", "100000"], "exceeds the model's context"),
        (["--rank", "0"], "rank"),
    ],
)
def test_plan_bad_input_is_one_line(config_only, capsys, argv, says):
    capsys.readouterr()
    assert main(["plan", str(config_only), "--no-calibrate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_plan_of_a_4bit_checkpoint_bigger_than_memory_reads_its_weights_from_disk(
    config_only, tmp_path, capsys, monkeypatch
):
    from lorakit.quant.bnb_format import quantization_config
    from lorakit.training import plan

    monkeypatch.setattr(plan, "runtime_bytes", lambda device: 300 * 2**20)
    in_memory = _plan(capsys, str(config_only), *FLAGS, "--memory", "64GB")
    stored = tmp_path / "nf4"
    stored.mkdir()
    config = json.loads((config_only / "config.json").read_text())
    config["quantization_config"] = quantization_config(torch.float32, ["lm_head"])
    (stored / "config.json").write_text(json.dumps(config))
    assert not in_memory["settings"]["weights_from_disk"]
    lean = in_memory["leanest_bytes"]
    codes = (
        sum(
            p.numel()
            for n, p in tiny_model("llama").named_parameters()
            if "layers" in n and p.dim() == 2
        )
        // 2
    )
    # Room for all but half the 4-bit codes: a 16-bit checkpoint is refused, naming the fix...
    squeezed = ["--memory", f"{lean - codes // 2}B"]
    refused = _plan(capsys, str(config_only), *FLAGS, *squeezed)
    assert not refused["fits"] and "lorakit quantize" in refused["why_not"]
    # ...a 4-bit one trains with its codes read from disk as the layers run.
    streamed = _plan(capsys, str(stored), *FLAGS, *squeezed)
    assert streamed["fits"] and streamed["settings"]["weights_from_disk"]
    assert main(["plan", str(stored), *FLAGS, *squeezed]) == 0
    assert "read from disk" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2_moe"])
def test_the_pass_outside_the_layers_runs_with_the_layers_taken_out_and_put_back(kind):
    """The plan counts what a pass spends outside the decoder layers once a pass: it is timed on
    the cut model with its layer stack emptied, which must still run a training pass."""
    from test_architectures import _config

    from lorakit.lora.targets import layer_stack
    from lorakit.training.layer_timing import VOCAB, _without_layers, random_layer_model
    from lorakit.training.loss import causal_lm_loss

    cut = random_layer_model(_config(kind, 1000), torch.device("cpu"), torch.float32)
    name = layer_stack(cut)
    stack = cut.get_submodule(name)
    calls = []
    stack[0].register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    embeddings = cut.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    with _without_layers(cut, name):
        assert len(cut.get_submodule(name)) == 0
        loss, _ = causal_lm_loss(cut, {"input_ids": ids, "labels": ids})
        loss.backward()
    assert calls == []  # the layer did not run
    assert cut.get_submodule(name) is stack  # and is back
    causal_lm_loss(cut, {"input_ids": ids, "labels": ids})
    assert calls == [1]
    hook.remove()
