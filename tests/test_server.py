"""`lorakit serve`: the engine's continuous batching, the HTTP API in-process, and one real server
driven by the official `openai` client; greedy outputs equal `generate_ids` for the same prompt
and adapter."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from lorakit.errors import LorakitError
from lorakit.inference.engine import Busy, Engine, Request, UnknownAdapter
from lorakit.inference.generate import Sampling, generate_ids
from lorakit.inference.request import AdapterInUse
from lorakit.lora.layer import attach_lora, lora_layers, set_active_adapters
from lorakit.lora.peft_format import AdapterConfig, load_adapter, save_adapter
from lorakit.lora.targets import resolve_targets
from lorakit.models.chat import encode_prompt

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lorakit import kernels
from lorakit.server.app import create_app  # noqa: E402

BASE = "tiny"
PROMPTS = [[5, 17, 42, 9], [7, 8], [100, 3, 3, 3, 250, 11]]


# --- helpers ------------------------------------------------------------------------------------


def make_adapters(kind: str, root: Path) -> dict[str, Path]:
    """Two adapters with non-zero B: "a" on every default target, "b" on the first one only
    (so a batch mixes adapters that target different layers)."""
    model = tiny_model(kind)
    modules, targets = resolve_targets(model, "default")
    out = {}
    for seed, (name, names) in enumerate({"a": modules, "b": modules[:1]}.items()):
        torch.manual_seed(seed)
        attach_lora(model, names, name, rank=4, alpha=8)
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
        out[name] = root / name
        save_adapter(model, out[name], AdapterConfig(rank=4, alpha=8, target_modules=targets), name)
    return out


def reference(kind: str, adapter: Path | None, prompt: list[int], n: int, eos=()) -> list[int]:
    """What `lorakit generate` gives: the adapter loaded and active, `generate_ids`, greedy."""
    model = tiny_model(kind)
    if adapter is not None:
        load_adapter(model, adapter, name="x")
    set_active_adapters(model, ["x"] if adapter is not None else [])
    return generate_ids(model, [prompt], Sampling(max_new_tokens=n), eos_ids=eos)[0]


class Collect:
    """An engine consumer that records its events."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.tokens: list[int] = []
        self.events: list[tuple[str, object]] = []
        self.done = threading.Event()
        self.gate = gate

    def __call__(self, kind: str, value: object) -> None:
        if self.gate is not None:
            self.gate.wait()  # holds the engine thread: a deterministic "busy" engine
        self.events.append((kind, value))
        if kind == "token":
            self.tokens.append(int(value))
        else:
            self.done.set()


def request(prompt, n, adapter=None, gate=None) -> tuple[Request, Collect]:
    sink = Collect(gate)
    return Request(list(prompt), Sampling(max_new_tokens=n), sink, adapter), sink


def drain(engine: Engine) -> None:
    """Step the (unthreaded) engine until every request is done."""
    while engine.rows or engine.load()[1]:
        engine.step()


@pytest.fixture
def adapters(tmp_path) -> dict[str, Path]:
    return make_adapters("llama", tmp_path / "adapters")


def engine_with(adapters: dict[str, Path], tok=None, **kw) -> Engine:
    vocab = len(tok) if tok is not None else 400
    eos = [tok.eos_token_id] if tok is not None else []
    engine = Engine(tiny_model("llama", vocab_size=vocab), eos, 0, **kw)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path)).result()
    return engine


# --- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_request_joins_a_running_batch_and_every_row_equals_generate(kind, tmp_path):
    paths = make_adapters(kind, tmp_path)
    engine = Engine(tiny_model(kind))
    for name, path in paths.items():
        engine.load_adapter(name, str(path)).result()
    rows = [("a", 12), (None, 6), ("b", 10)]
    reqs = [request(p, n, adapter) for p, (adapter, n) in zip(PROMPTS, rows, strict=True)]
    engine.submit(reqs[0][0])
    for _ in range(3):
        engine.step()  # the first request decodes alone...
    engine.submit(reqs[1][0])
    engine.submit(reqs[2][0])  # ...then two more join it between two decode steps
    drain(engine)
    # Continuous batching: the newcomers joined after the third step; the short one (6 tokens)
    # left after the eighth, the 12-token one after the eleventh; one forward per step.
    assert list(engine.batch_sizes) == [1, 1, 1, 3, 3, 3, 3, 3, 2, 2, 2, 1]
    for (p, (adapter, n)), (_, sink) in zip(zip(PROMPTS, rows, strict=True), reqs, strict=True):
        assert sink.tokens == reference(kind, paths.get(adapter), p, n)
        assert sink.events[-1] == ("finish", "length")
    assert len({tuple(sink.tokens[:6]) for _, sink in reqs}) == 3  # adapters change outputs
    assert engine._mask.shape == (0, 0) and engine._decoder is None  # everything released


def test_batch_is_bounded_and_waiting_requests_are_admitted_later(adapters):
    engine = engine_with(adapters, max_batch=2)
    reqs = [request(p, 8, adapter) for p, adapter in zip(PROMPTS, ["a", "b", None], strict=True)]
    for r, _ in reqs:
        engine.submit(r)
    drain(engine)
    assert max(engine.batch_sizes) == 2
    for p, adapter, (_, sink) in zip(PROMPTS, ["a", "b", None], reqs, strict=True):
        assert sink.tokens == reference("llama", adapters.get(adapter), p, 8)


def test_eos_finishes_with_stop_and_cancel_frees_the_row(adapters):
    full = reference("llama", None, PROMPTS[0], 10)
    engine = Engine(tiny_model("llama"), eos_ids=[full[4]])
    r, sink = request(PROMPTS[0], 10)
    engine.submit(r)
    drain(engine)
    assert sink.tokens == full[: full.index(full[4])] and sink.events[-1] == ("finish", "stop")

    r, sink = request(PROMPTS[1], 50)
    engine.submit(r)
    engine.step()
    engine.step()
    r.cancel()
    steps = len(engine.batch_sizes)
    engine.step()
    assert engine.rows == [] and len(engine.batch_sizes) == steps  # dropped before a forward
    assert len(sink.tokens) == 3 and not sink.done.is_set()
    waiting, sink = request(PROMPTS[1], 5)
    engine.submit(waiting)
    waiting.cancel()  # cancelled before admission: never runs
    engine.step()
    assert sink.events == [] and engine.load() == (0, 0)


def test_full_queue_unknown_adapter_and_limits_are_refused(adapters):
    engine = engine_with(adapters, max_queue=1)
    engine.submit(request(PROMPTS[0], 4)[0])
    with pytest.raises(Busy):
        engine.submit(request(PROMPTS[0], 4)[0])
    with pytest.raises(UnknownAdapter):
        engine.submit(request(PROMPTS[0], 4, adapter="nope")[0])
    with pytest.raises(LorakitError, match="context of 256"):
        engine.submit(request([1] * 250, 10)[0])
    with pytest.raises(LorakitError, match="token ids"):
        engine.submit(request([400], 4)[0])


def test_adapters_load_and_unload_between_steps_and_never_while_in_use(adapters):
    engine = engine_with(adapters)
    r, sink = request(PROMPTS[0], 30, "a")
    engine.submit(r)
    engine.step()
    future = engine.unload_adapter("a")  # the engine is not threaded here: runs at once
    with pytest.raises(AdapterInUse):
        future.result()
    r.cancel()
    engine.step()
    engine.unload_adapter("a").result()
    assert "a" not in engine.adapters
    assert not any("a" in layer.lora_A for _, layer in lora_layers(engine.model))
    engine.load_adapter("again", str(adapters["a"])).result()
    r, sink = request(PROMPTS[0], 6, "again")
    engine.submit(r)
    drain(engine)
    assert sink.tokens == reference("llama", adapters["a"], PROMPTS[0], 6)


def test_with_max_loaded_the_least_recently_used_adapter_leaves_memory_and_comes_back(
    adapters, tmp_path
):
    """Three adapters registered, two in memory: a request for the one unloaded reads it back
    (once), another idle one leaves; every answer is its adapter's. A folder deleted while its
    adapter is out of memory fails that adapter's requests, not the others'."""
    third = shutil.copytree(adapters["a"], tmp_path / "c")
    engine = engine_with({**adapters, "c": third}, max_loaded=2)
    resident = lambda: {n for _, layer in lora_layers(engine.model) for n in layer.lora_A}  # noqa: E731
    assert set(engine.adapters) == {"a", "b", "c"} and resident() == {"b", "c"}  # a: LRU, out
    reads = []
    real_read = engine._read
    engine._read = lambda name, path: reads.append(name) or real_read(name, path)
    jobs = [request(PROMPTS[i % 3], 6, name) for i, name in enumerate(["a", "a", "b", "a"])]
    for r, _ in jobs:
        engine.submit(r)
    drain(engine)
    assert reads == ["a"]  # read back once for the three requests that wait for it
    assert resident() == {"a", "b"}  # c was the least recently used idle one
    for i, (name, (_, sink)) in enumerate(zip(["a", "a", "b", "a"], jobs, strict=True)):
        assert sink.tokens == reference("llama", adapters[name], PROMPTS[i % 3], 6), i
    # three adapters in one moment with room for two: the third waits for a running one
    jobs = [request(PROMPTS[0], 4, name) for name in ("a", "b", "c")]
    for r, _ in jobs:
        engine.submit(r)
    drain(engine)
    for name, (_, sink) in zip(("a", "b", "c"), jobs, strict=True):
        want = reference("llama", adapters["a"] if name == "c" else adapters[name], PROMPTS[0], 4)
        assert sink.tokens == want, name
    assert len(resident()) == 2
    # c's folder is deleted while it is out of memory (a and b were used last)
    for name in ("a", "b"):
        r, _ = request(PROMPTS[1], 2, name)
        engine.submit(r)
        drain(engine)
    assert resident() == {"a", "b"}
    shutil.rmtree(third)
    (bad, bad_sink), (good, good_sink) = request(PROMPTS[0], 3, "c"), request(PROMPTS[0], 3, "a")
    engine.submit(bad)
    engine.submit(good)
    drain(engine)
    kind, message = bad_sink.events[-1]
    assert kind == "error" and "adapter 'c' could not be read again" in message
    assert good_sink.tokens == reference("llama", adapters["a"], PROMPTS[0], 3)


def test_a_batch_on_one_adapter_decodes_with_it_folded_into_the_cached_weights(adapters):
    from lorakit.models.loading import quantizable_modules
    from lorakit.quant.linear import NF4Linear

    model = tiny_model("llama")
    for name in quantizable_modules(model):
        model.set_submodule(name, NF4Linear.from_linear(model.get_submodule(name)))
    engine = Engine(model, cache_weights=True)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path)).result()

    def expected(adapter: str, prompt: list[int], n: int) -> list[int]:
        set_active_adapters(model, [adapter])  # the NF4 path, adapter beside the base
        return generate_ids(model, [prompt], Sampling(max_new_tokens=n), cache_weights=False)[0]

    want = {(a, i): expected(a, PROMPTS[i], 6) for a in "ab" for i in (0, 1)}
    layer = next(layer for _, layer in lora_layers(model) if "b" in layer.lora_A)
    engine.start()
    try:
        one = [request(PROMPTS[i], 6, "a") for i in (0, 1)]
        for r, _ in one:
            engine.submit(r)
        for _, sink in one:
            assert sink.done.wait(30)
        _wait_idle(engine)
        # Idle after a batch on "a": it stays folded in until the batch changes.
        assert engine.folded == "a" and layer.merged_adapters == ["a"]
        cached = layer.base_layer.__dict__["_cached_weight"]
        plain = layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight("a")
        torch.testing.assert_close(cached, plain)
        mixed = [request(PROMPTS[i], 6, a) for i, a in ((0, "a"), (1, "b"))]
        for r, _ in mixed:
            engine.submit(r)
        for _, sink in mixed:
            assert sink.done.wait(30)
        _wait_idle(engine)
        assert engine.folded is None and layer.merged_adapters == []  # per-row again
        assert [sink.tokens for _, sink in one] == [want["a", 0], want["a", 1]]
        assert [sink.tokens for _, sink in mixed] == [want["a", 0], want["b", 1]]
    finally:
        engine.stop()
    assert "_cached_weight" not in layer.base_layer.__dict__ and layer.merged_adapters == []


@pytest.mark.skipif(
    kernels._build.library() is None,
    reason="no C compiler or no AVX2 on this machine",
)
def test_the_engine_thread_decodes_a_bf16_head_through_the_kernel(monkeypatch):
    import lorakit.inference.engine as E
    from lorakit.inference import decoder

    calls = []
    real = kernels.bf16_matmul.bf16_matmul
    monkeypatch.setattr(decoder, "bf16_matmul", lambda x, w: calls.append(1) or real(x, w))

    def serve(head) -> list[list[int]]:
        monkeypatch.setattr(E, "output_head_kernel", head)
        model = tiny_model("llama", hidden_size=64, intermediate_size=128).to(torch.bfloat16)
        engine = Engine(model, [], 0)
        engine.start()
        try:
            reqs = [request(PROMPTS[i], 8) for i in (0, 1)]
            for r, _ in reqs:
                engine.submit(r)
            assert all(sink.done.wait(30) for _, sink in reqs)
            return [sink.tokens for _, sink in reqs]
        finally:
            engine.stop()

    with_kernel = serve(E.output_head_kernel)
    used = len(calls)
    assert used
    assert serve(lambda model: __import__("contextlib").nullcontext()) == with_kernel
    assert len(calls) == used  # the second engine ran torch's head


def test_a_failing_forward_fails_its_rows_and_the_engine_goes_on():
    engine = Engine(tiny_model("llama"))
    embed = engine.model.get_input_embeddings()  # every forward pass starts here
    real, calls = embed.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    embed.forward = flaky
    engine.start()
    try:
        r, bad = request(PROMPTS[0], 5)
        engine.submit(r)
        assert bad.done.wait(10) and bad.events[-1] == ("error", "generation failed: boom")
        r, good = request(PROMPTS[0], 5)
        engine.submit(r)
        assert good.done.wait(10) and good.tokens == reference("llama", None, PROMPTS[0], 5)
    finally:
        engine.stop()


# --- the HTTP API, in-process -------------------------------------------------------------------


@pytest.fixture
def client(adapters, tiny_tokenizer):
    engine = engine_with(adapters, tiny_tokenizer)
    app = create_app(engine, tiny_tokenizer, BASE, [adapters["a"].parent], max_tokens=64)
    with TestClient(app) as c:
        c.engine = engine
        yield c


def chat_ids(tok, text: str) -> list[int]:
    return encode_prompt([{"role": "user", "content": text}], tok)


def sse(text: str) -> list:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_models_lists_the_base_and_every_adapter(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [BASE, "a", "b"]
    assert [m["parent"] for m in data] == [None, BASE, BASE]
    assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}


@pytest.mark.parametrize("model", [BASE, "a", "b"])
def test_chat_and_completion_equal_generate_and_count_usage(
    client, adapters, tiny_tokenizer, model
):
    tok, eos = tiny_tokenizer, [tiny_tokenizer.eos_token_id]
    adapter = adapters.get(model)
    want = reference("llama", adapter, chat_ids(tok, "What is a hacker?"), 12, eos)
    body = {"model": model, "messages": [{"role": "user", "content": "What is a hacker?"}]}
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == model
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": tok.decode(want, skip_special_tokens=True),
    }
    assert out["choices"][0]["finish_reason"] == ("length" if len(want) == 12 else "stop")
    n_prompt = len(chat_ids(tok, "What is a hacker?"))
    assert out["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(want),
        "total_tokens": n_prompt + len(want),
    }
    prompt = tok.encode("A hacker is")
    want = reference("llama", adapter, prompt, 10, eos)
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": "A hacker is", "max_tokens": 10, "temperature": 0},
    )
    assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == len(want)


def test_streaming_sends_openai_chunks_that_add_up_to_the_whole_answer(client):
    body = {"model": "a", "max_tokens": 9, "temperature": 0}
    chat = {**body, "messages": [{"role": "user", "content": "hi"}]}
    whole = client.post("/v1/chat/completions", json=chat).json()
    r = client.post(
        "/v1/chat/completions",
        json={**chat, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    done = client.post("/v1/completions", json={**body, "prompt": "foo"}).json()
    r = client.post("/v1/completions", json={**body, "prompt": "foo", "stream": True})
    chunks = sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == done["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == done["choices"][0]["finish_reason"]


def test_stop_strings_cut_the_text_streamed_or_not(client):
    body = {"model": "a", "prompt": "A hacker is", "max_tokens": 12, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = text[3:6]
    assert stop and text.index(stop) >= 0
    cut = client.post("/v1/completions", json={**body, "stop": [stop, "never"]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    r = client.post("/v1/completions", json={**body, "stop": stop, "stream": True})
    streamed = "".join(c["choices"][0]["text"] for c in sse(r.text))
    assert streamed == text[: text.index(stop)]


def test_chat_takes_text_parts_and_the_developer_role(client):
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a hacker?"},
    ]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is "},
                {"type": "text", "text": "a hacker?"},
            ],
        },
    ]
    body = {"model": "a", "max_tokens": 6, "temperature": 0}
    want = client.post("/v1/chat/completions", json={**body, "messages": plain}).json()
    got = client.post("/v1/chat/completions", json={**body, "messages": parts}).json()
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = client.post("/v1/chat/completions", json={**body, "messages": image})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_seeded_sampling_is_reproducible(client):
    body = {"model": "b", "prompt": "foo", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first


BAD_REQUESTS = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", "", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": BASE, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": BASE, "prompt": [1, 99999]}, 400, None),
    ("/v1/completions", {"model": BASE, "prompt": ""}, 400, None),
    ("/v1/completions", {"model": BASE, "prompt": [1] * 250, "max_tokens": 10}, 400, "max_tokens"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "cat"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "x", "messages": [{"role": "user"}]}, 404, "model"),
    ("/v1/adapters", {"name": "c"}, 400, "path"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_client_mistakes_get_openai_errors_and_the_server_goes_on(
    client, path, body, status, param
):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    ok = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_huge_body_is_refused_unread(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x" * (3 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods_get_openai_errors(client):
    for r in (client.get("/v1/nothing"), client.get("/v1/completions")):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_answers_429(adapters, tiny_tokenizer):
    engine = engine_with(adapters, tiny_tokenizer, max_batch=1, max_queue=1)
    app = create_app(engine, tiny_tokenizer, BASE)
    gate = threading.Event()
    with TestClient(app) as c:
        busy, sink = request(PROMPTS[0], 3, gate=gate)
        engine.submit(busy)  # admitted, then holds the engine in its first hand-off
        while engine.load()[1]:
            time.sleep(0.01)
        engine.submit(request(PROMPTS[1], 3)[0])  # waits: the queue is now full
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1"  # the OpenAI client waits that long and retries
        gate.set()
        _wait_idle(engine)  # both queued requests done: there is room again
        r = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_load_use_unload_an_adapter_while_serving(client, adapters, tiny_tokenizer):
    tok = tiny_tokenizer
    r = client.post("/v1/adapters", json={"name": "c", "path": "a"})  # relative to the folder
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "c"
    assert "c" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    body = {"model": "c", "prompt": "A hacker is", "max_tokens": 8, "temperature": 0}
    want = reference("llama", adapters["a"], tok.encode("A hacker is"), 8, [tok.eos_token_id])
    got = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert got == tok.decode(want, skip_special_tokens=True)
    r = client.post("/v1/adapters", json={"name": "c", "path": str(adapters["b"])})
    assert r.status_code == 409
    assert client.delete("/v1/adapters/c").json() == {"id": "c", "object": "model", "deleted": True}
    assert "c" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.post("/v1/completions", json=body).status_code == 404
    assert client.delete("/v1/adapters/c").status_code == 404
    assert client.delete(f"/v1/adapters/{BASE}").status_code == 400


def test_an_adapter_in_use_is_not_unloaded(client):
    gate = threading.Event()
    busy, sink = request(PROMPTS[0], 3, "a", gate=gate)
    client.engine.submit(busy)  # holds the engine in its first hand-off...
    threading.Timer(0.3, gate.set).start()  # ...until the unload command is queued
    r = client.delete("/v1/adapters/a")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert sink.done.wait(10)
    assert client.delete("/v1/adapters/a").status_code == 200


def test_adapter_paths_stay_inside_the_allowed_folders(client, adapters, tmp_path):
    outside = make_adapters("llama", tmp_path / "outside")["a"]
    folder = adapters["a"].parent
    (folder / "link").symlink_to(outside, target_is_directory=True)
    sneaky = folder / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in ["../outside/a", str(outside), "link", "sneaky", "/etc", "a/../../outside/a"]:
        r = client.post("/v1/adapters", json={"name": "evil", "path": path})
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "path_not_allowed"
    pickle = folder / "pickled"
    pickle.mkdir()
    (pickle / "adapter_config.json").write_text("{}")
    (pickle / "adapter_model.bin").write_bytes(b"not loaded")
    r = client.post("/v1/adapters", json={"name": "p", "path": "pickled"})
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    for name in ["../x", "a/b", "", BASE, "-x", "x" * 65]:
        r = client.post("/v1/adapters", json={"name": name, "path": "a"})
        assert r.status_code == 400, name
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "a", "b"]


def test_a_broken_adapter_is_refused_with_its_reason_and_serving_goes_on(client, adapters):
    from safetensors.torch import load_file, save_file

    folder = adapters["a"].parent
    rank = shutil.copytree(adapters["a"], folder / "rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    nan = shutil.copytree(adapters["a"], folder / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    tensors[sorted(tensors)[0]][0, 0] = float("inf")
    save_file(tensors, nan / "adapter_model.safetensors")
    for path, message in [
        ("rank", "has rank 4 in its tensors but adapter_config.json says r = 8"),
        ("nan", "holds NaN/inf in base_model.model.model.layers.0"),
    ]:
        r = client.post("/v1/adapters", json={"name": path, "path": path})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
    r = client.post("/v1/adapters", json={"name": "v1.2", "path": "a"})  # no '.' in a name
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "a", "b"]
    ok = client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_an_adapter_of_another_base_is_refused_and_serving_goes_on(client, adapters):
    """An adapter trained on a base of other sizes: a 400 naming the mismatch, nothing half
    loaded, the server answers on."""
    other = tiny_model("llama", hidden_size=64, intermediate_size=128)
    modules, targets = resolve_targets(other, "default")
    attach_lora(other, modules, "x", rank=4, alpha=8)
    path = adapters["a"].parent / "other"
    save_adapter(other, path, AdapterConfig(rank=4, alpha=8, target_modules=targets), "x")
    r = client.post("/v1/adapters", json={"name": "other", "path": "other"})
    assert r.status_code == 400, r.text
    assert "64" in r.json()["error"]["message"]  # the other base's size, named
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "a", "b"]
    ok = client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_no_adapter_folders_means_no_loading(adapters, tiny_tokenizer):
    engine = engine_with(adapters, tiny_tokenizer)
    with TestClient(create_app(engine, tiny_tokenizer, BASE)) as c:
        r = c.post("/v1/adapters", json={"name": "c", "path": str(adapters["a"])})
        assert r.status_code == 403


def test_api_key_is_required_when_set(adapters, tiny_tokenizer):
    engine = engine_with(adapters, tiny_tokenizer)
    with TestClient(create_app(engine, tiny_tokenizer, BASE, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/completions", content="{bad")  # refused before the body is read
        assert r.status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_engine_failure_is_a_500_and_serving_goes_on(client, monkeypatch):
    embed = client.engine.model.get_input_embeddings()  # every forward pass starts here
    real = embed.forward

    def boom(*args, **kwargs):
        monkeypatch.setattr(embed, "forward", real)  # fail once
        raise RuntimeError("boom")

    monkeypatch.setattr(embed, "forward", boom)
    body = {"model": BASE, "prompt": "x", "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert client.post("/v1/completions", json=body).status_code == 200


# --- a real server: the openai client, disconnects ------------------------------------------------


@contextmanager
def real_server(app):
    """uvicorn on 127.0.0.1, on a port the OS picks, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_openai_client_against_a_real_server_equals_generate(adapters, tiny_tokenizer):
    openai = pytest.importorskip("openai")
    tok, eos = tiny_tokenizer, [tiny_tokenizer.eos_token_id]
    engine = engine_with(adapters, tok)
    app = create_app(engine, tok, BASE, api_key="k")
    question, prompt = "What does foo mean?", "The quick brown fox"

    def text(ids: list[int]) -> str:
        # a character cut off by the last token is dropped, not sent as U+FFFD (TextStream)
        return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")

    chat_want = {
        m: text(reference("llama", adapters.get(m), chat_ids(tok, question), 10, eos))
        for m in (BASE, "a", "b")
    }
    text_want = {
        m: text(reference("llama", adapters.get(m), tok.encode(prompt), 10, eos))
        for m in (BASE, "a", "b")
    }
    assert len(set(chat_want.values())) == 3  # the adapters change the answer

    with real_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == [BASE, "a", "b"]

        def chat(model: str, stream: bool) -> str:
            kw = {"model": model, "max_tokens": 10, "temperature": 0}
            messages = [{"role": "user", "content": question}]
            if not stream:
                out = client.chat.completions.create(messages=messages, **kw)
                assert out.usage.completion_tokens > 0
                return out.choices[0].message.content
            chunks = client.chat.completions.create(messages=messages, stream=True, **kw)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        def complete(model: str, stream: bool) -> str:
            kw = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0}
            if not stream:
                return client.completions.create(**kw).choices[0].text
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))

        jobs = [(f, m, s) for f in (chat, complete) for m in (BASE, "a", "b") for s in (0, 1)]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share decode steps
            results = list(pool.map(lambda job: job[0](job[1], bool(job[2])), jobs))
        for (f, model, _), got in zip(jobs, results, strict=True):
            assert got == (chat_want if f is chat else text_want)[model], (f.__name__, model)

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad").models.list()


def test_a_client_that_hangs_up_stops_its_generation(tiny_tokenizer):
    import httpx

    engine = engine_with({}, tiny_tokenizer)
    # Slow every forward pass down so a 200-token request would take seconds.
    embed = engine.model.get_input_embeddings()  # every forward pass starts here
    embed.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    app = create_app(engine, tiny_tokenizer, BASE, max_tokens=200)
    body = {"model": BASE, "prompt": "x", "max_tokens": 200, "temperature": 0}
    with real_server(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk arrived; now hang up
        _wait_idle(engine)
        assert len(engine.batch_sizes) < 100

        steps = len(engine.batch_sizes)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        _wait_idle(engine)
        assert len(engine.batch_sizes) - steps < 100


def _wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load() == (0, 0)


# --- the command line ---------------------------------------------------------------------------


def test_serve_help_and_one_line_errors(capsys, tmp_path):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--adapter-dir" in help_text and "127.0.0.1" in help_text and "--api-key" in help_text
    for argv, message in [
        (["serve", "--port", "70000"], "not a port number"),
        (["serve", "--max-queue", "0"], "must be positive"),
        (["serve", "--adapter", f"x={tmp_path}/missing"], "not found"),
        (["serve", "--adapter", f"../x={tmp_path}"], "adapter name"),
        (["serve", "--adapter-dir", f"{tmp_path}/missing"], "not a directory"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_sigterm_finishes_the_streams_in_flight_then_exits_0(tiny_model_dir):
    """`lorakit serve` stopped by SIGTERM (systemd, docker stop, kubernetes): the stream in
    flight runs to its end and its final event, new connections are refused, exit status 0."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "lorakit", "serve", "--model", str(tiny_model_dir)]
    argv += ["--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "x", "max_tokens": 200, "stream": True}
        body["temperature"] = 0
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not lines:  # the first chunk is here, the rest of the answer is not
                    os.kill(proc.pid, signal.SIGTERM)
                lines.append(line)
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        assert len(events) > 10  # more than what had been sent before the signal
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
