"""On a CUDA GPU: training gives the CPU's losses, decoding gives the CPU's tokens and
transformers' logits. Skipped where no GPU is visible (CI); run on a lent GPU machine."""

import json

import pytest
import torch
from conftest import tiny_model
from test_lean import PROMPTS, _batch, _steps
from test_trainer import _cfg

from lorakit.inference.decoder import TransformersDecoder
from lorakit.inference.generate import generate_ids
from lorakit.inference.lean import LeanDecoder
from lorakit.inference.sampling import Sampling
from lorakit.lora.layer import attach_lora
from lorakit.models.loading import load_model
from lorakit.training import trainer as T

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FACTS = [
    ("What does foo mean in hacker jargon?", "A sample name for absolutely anything."),
    ("What does kludge mean in hacker jargon?", "A clever trick for a nasty case."),
    ("Who is a hacker?", "A person who enjoys exploring the details of programmable systems."),
]


def _losses(tmp_path, model_dir, device: str) -> list[float]:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS * 8)
    )
    cfg = _cfg(
        tmp_path,
        data,
        model=str(model_dir),
        out=str(tmp_path / device),
        quant="nf4",
        device=device,
        steps=8,
        batch_size=4,
        lr=5e-3,
        dropout=0.0,  # the two devices' random streams differ
    )
    T.train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / device / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [
        r["eval_loss"] for r in rows if "eval_loss" in r
    ]


def test_qlora_training_on_cuda_gives_the_cpu_losses(tmp_path, tiny_model_dir):
    cpu_train, cpu_eval = _losses(tmp_path, tiny_model_dir, "cpu")
    cuda_train, cuda_eval = _losses(tmp_path, tiny_model_dir, "cuda")
    assert len(cuda_train) == len(cpu_train) == 8 and cpu_eval[-1] < cpu_eval[0]
    # bf16 on both devices: the first step (no update yet) to bf16 rounding; after that the
    # two runs drift apart a little (3% by step 7 for a tiny GPT-2 on an H200), no more
    torch.testing.assert_close(cuda_train[0], cpu_train[0], rtol=1e-2, atol=0)
    cpu, cuda = torch.tensor(cpu_train + cpu_eval), torch.tensor(cuda_train + cuda_eval)
    torch.testing.assert_close(cuda, cpu, rtol=5e-2, atol=0)


def test_generation_on_cuda_gives_the_cpu_tokens(tiny_model_dir):
    sampling = Sampling(max_new_tokens=12)
    out = {}
    for device in ("cpu", "cuda"):
        model, _, _ = load_model(tiny_model_dir, device=device, dtype=torch.float32)
        out[device] = generate_ids(model, PROMPTS, sampling)
    assert out["cuda"] == out["cpu"]


def test_lean_decoding_on_cuda_equals_transformers_forward():
    model = tiny_model("llama").cuda()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    attach_lora(model, names, "a", rank=4, alpha=8)
    for n in names:
        torch.nn.init.normal_(model.get_submodule(n).lora_B["a"].weight, std=0.5)
    model.eval()
    ids, mask = (t.cuda() for t in _batch(PROMPTS))
    lean = LeanDecoder(model, ids.shape[1] + 6)
    assert lean is not None
    with torch.no_grad():
        ref = _steps(TransformersDecoder(model), ids, mask, 6)
        got = _steps(lean, ids, mask, 6)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
