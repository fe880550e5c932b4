"""The exported GGUF files in llama.cpp itself (llama-cpp-python, which builds llama.cpp from
source: `pip install llama-cpp-python`; skipped where it is not installed): the adapter and the
merged model give llama.cpp the logits and greedy tokens lorakit gives with the adapter, on an
F16 base."""

import numpy as np
import pytest
import torch
from test_gguf_export import _adapter

from lorakit.cli import main
from lorakit.inference.generate import Sampling, generate_ids
from lorakit.lora.layer import set_active_adapters
from lorakit.lora.peft_format import load_adapter
from lorakit.models.gguf_export import _copy_settings
from lorakit.models.loading import load_model, resolve_model

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")
gguf = pytest.importorskip("gguf")
PROMPT = [1, 504, 3458, 314, 253, 2726, 30, 355, 2118, 42, 9863, 28]
NEW = 16
TIE = 0.1  # lorakit top-two closer than this: llama.cpp's 16-bit activations may pick either
# (its logits differ from lorakit's by up to 0.05 here; the comparison allows 0.05 + 1%)


def _f16_base(out):
    """The embedded base (Q4_1) as an F16 GGUF: what llama.cpp and lorakit both start from."""
    reader = gguf.GGUFReader(str(resolve_model("smollm2").path))
    writer = gguf.GGUFWriter(str(out), "llama")
    _copy_settings(reader, writer, out)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        writer.add_tensor(t.name, w.astype(np.float16 if w.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _llama_cpp(model_path, lora_path, tokens):
    """llama.cpp's logits at every position of `tokens`, and its own greedy NEW tokens after
    PROMPT."""
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False, seed=0, **kw
    )
    llm.eval(tokens)
    logits = torch.tensor(np.array(llm.scores[: len(tokens)]))
    llm.reset()
    greedy = []
    for token in llm.generate(PROMPT, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        greedy.append(token)
        if len(greedy) == NEW:
            break
    llm.close()
    return logits, greedy


def _assert_same_greedy_path(got, want, logits):
    """llama.cpp's greedy tokens are lorakit's, except where lorakit's own top two logits are
    within TIE of each other: there 16-bit rounding may pick either, the two texts part, and
    what follows is not comparable. `logits` are lorakit's for each new token."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            assert logits[i, w] - logits[i, g] < TIE, (i, got, want)
            return


@pytest.mark.slow
def test_llama_cpp_with_the_exported_adapter_and_merged_model_answers_as_lorakit(tmp_path):
    base_gguf = _f16_base(tmp_path / "base-f16.gguf")
    model = load_model(str(base_gguf), quant="none", dtype=torch.float32, with_tokenizer=False)[0]
    adapter = _adapter(model, tmp_path / "ad")
    model = load_model(str(base_gguf), quant="none", dtype=torch.float32, with_tokenizer=False)[0]
    load_adapter(model, adapter, name="x")
    set_active_adapters(model, ["x"])
    want_tokens = generate_ids(model, [PROMPT], Sampling(max_new_tokens=NEW))[0]
    seq = PROMPT + want_tokens[:-1]  # the prompt and lorakit's answer, teacher-forced
    with torch.no_grad():
        want_logits = model(torch.tensor([seq])).logits[0]
        set_active_adapters(model, [])
        bare_logits = model(torch.tensor([seq])).logits[0]
    assert (want_logits - bare_logits).abs().max() > 0.5  # the adapter changes the answers
    new = want_logits[len(PROMPT) - 1 :]
    top2 = new.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > TIE  # the new tokens lorakit does not nearly tie on

    out = tmp_path / "ad.gguf"
    assert main(["export", str(adapter), "--model", str(base_gguf), "--out", str(out)]) == 0
    merged = tmp_path / "merged.gguf"
    args = ["export", str(adapter), "--model", str(base_gguf), "--merged", "--out", str(merged)]
    assert main(args) == 0
    for model_path, lora in [(base_gguf, out), (merged, None)]:
        logits, greedy = _llama_cpp(model_path, lora, seq)
        # llama.cpp rounds activations to 16 bits for F16 weights: close, not equal
        torch.testing.assert_close(logits, want_logits, atol=0.05, rtol=0.01)
        picks = logits[len(PROMPT) - 1 :].argmax(-1)
        assert picks[clear].tolist() == torch.tensor(want_tokens)[clear].tolist()
        _assert_same_greedy_path(greedy, want_tokens, new)
    bare, _ = _llama_cpp(base_gguf, None, seq)
    torch.testing.assert_close(bare, bare_logits, atol=0.05, rtol=0.01)
