"""Serving under load: concurrent requests over 4 adapters + the base vs the same one at a time.

Starts `lorakit serve` (the default model, NF4, bf16 compute where the CPU has it) on
127.0.0.1 in a subprocess, with random rank-16 adapters on q/k/v/o (non-zero B, so they change
the outputs). Then:
1. resident memory (VmRSS) of the server with 1, 8 and 32 adapters loaded, loading them while it
   runs (POST /v1/adapters), using the 32nd, and unloading all but 4 (DELETE /v1/adapters);
2. `--requests` chat requests spread evenly over the base and the 4 adapters, all sent at once
   (greedy, `--max-tokens` new tokens each): requests/s, p50/p95 latency, tokens/s, errors;
3. the same requests sent one at a time (each phase stops after `--phase-limit` seconds).

    python bench/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from generation import PROMPTS  # bench/ is on sys.path when run as a script

QUESTIONS = PROMPTS  # the same eight questions as bench/generation.py


def make_adapters(model_spec: str, folder: Path, n: int) -> list[Path]:
    """n random rank-16 adapters on the default targets, in PEFT's format (no model load)."""
    from safetensors.torch import save_file

    from lorakit.lora.layer import layer_features
    from lorakit.lora.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterConfig
    from lorakit.lora.targets import resolve_targets
    from lorakit.models.loading import empty_model, load_config, resolve_model

    source = resolve_model(model_spec)
    model = empty_model(load_config(source))
    modules, targets = resolve_targets(model, "default")
    config = AdapterConfig(rank=16, alpha=32, target_modules=targets, base_model=source.name)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        tensors = {}
        for name in modules:
            fan_in, fan_out = layer_features(model.get_submodule(name))
            a = torch.randn(16, fan_in) / fan_in**0.5
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(fan_out, 16) * 0.01
        path = folder / f"a{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(config.to_peft(), indent=2))
        paths.append(path)
    return paths


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, adapter: Path, folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--adapter", f"a0={adapter}", "--adapter-dir", str(folder)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("the server did not start within 300 s")


def body(i: int, model: str, max_tokens: int) -> dict:
    question = QUESTIONS[i % len(QUESTIONS)]
    messages = [{"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, int, str]:
    """(latency s, completion tokens, error or "")."""
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/chat/completions", json=payload)
    except httpx.HTTPError as e:
        return time.perf_counter() - start, 0, type(e).__name__
    latency = time.perf_counter() - start
    if r.status_code != 200:
        return latency, 0, f"HTTP {r.status_code}"
    return latency, r.json()["usage"]["completion_tokens"], ""


async def run_phase(url: str, payloads: list[dict], concurrent: bool, limit: float) -> dict:
    timeout = httpx.Timeout(limit, connect=30)
    limits = httpx.Limits(max_connections=len(payloads) + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, url, p) for p in payloads))
        else:
            results = []
            for p in payloads:
                if time.perf_counter() - start > limit:
                    break
                results.append(await one(client, url, p))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results if not r[2])
    errors = [r[2] for r in results if r[2]]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(results),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "wall_s": wall,
        "req_per_s": len(results) / wall,
        "p50_s": pct(0.50),
        "p95_s": pct(0.95),
        "tokens": sum(r[1] for r in results),
        "tok_per_s": sum(r[1] for r in results) / wall,
    }


def memory_phase(url: str, pid: int, paths: list[Path], max_tokens: int) -> list[tuple[int, float]]:
    """RSS with 1, 8, 32 adapters, loading while serving; then use the 32nd and unload to 4."""
    rows = []
    post = httpx.post(f"{url}/v1/chat/completions", json=body(0, "a0", 4), timeout=300)
    assert post.status_code == 200, post.text
    loaded = 1
    for target in (1, 8, 32):
        while loaded < target:
            name = f"a{loaded}" if loaded < len(paths) else f"copy{loaded}"
            path = paths[loaded % len(paths)]
            r = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": str(path)}, timeout=60)
            assert r.status_code == 200, r.text
            loaded += 1
        time.sleep(1)
        rows.append((target, rss_mb(pid)))
    r = httpx.post(f"{url}/v1/chat/completions", json=body(1, "copy31", max_tokens), timeout=300)
    assert r.status_code == 200, r.text
    for i in range(len(paths), 32):
        assert httpx.delete(f"{url}/v1/adapters/copy{i}", timeout=60).status_code == 200
    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert models[1:] == [f"a{i}" for i in range(len(paths))], models
    r = httpx.post(f"{url}/v1/chat/completions", json=body(1, "copy31", 4), timeout=60)
    assert r.status_code == 404, r.text
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=200, help="requests per phase (at most 500)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--phase-limit", type=float, default=600, help="seconds per phase, at most")
    args = p.parse_args()
    args.requests = min(args.requests, 500)

    folder = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    paths = make_adapters(args.model, folder, 4)
    server, url = start_server(args, paths[0], folder)
    try:
        memory = memory_phase(url, server.pid, paths, args.max_tokens)
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        names = [base, "a0", "a1", "a2", "a3"]
        payloads = [body(i, names[i % 5], args.max_tokens) for i in range(args.requests)]
        together = asyncio.run(run_phase(url, payloads, True, args.phase_limit))
        alone = asyncio.run(run_phase(url, payloads, False, args.phase_limit))
        peak = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n`python bench/serve_load.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"({os.cpu_count()} CPUs, OMP_NUM_THREADS {threads}, torch {torch.__version__}; "
        f"`lorakit serve --model {args.model}` on 127.0.0.1; chat requests, greedy, "
        f"max_tokens {args.max_tokens})\n"
    )
    print(
        "| requests | sent | errors | wall s | requests/s | p50 latency s | p95 latency s "
        "| completion tokens | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in (("all at once", together), ("one at a time", alone)):
        print(
            f"| {label} | {r['requests']} | {r['errors']} | {r['wall_s']:.1f} | "
            f"{r['req_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['tokens']} | "
            f"{r['tok_per_s']:.1f} |"
        )
    if together["error_kinds"] or alone["error_kinds"]:
        print(f"\nerrors: {together['error_kinds']} / {alone['error_kinds']}")
    speedup = together["tok_per_s"] / alone["tok_per_s"] if alone["tok_per_s"] else float("nan")
    print(f"\nall at once / one at a time, tokens/s: {speedup:.2f}x")
    print("\n| adapters loaded | server RSS (MB) |\n|---|---|")
    for n, mb in memory:
        print(f"| {n} | {mb:.0f} |")
    print(f"\nserver RSS after both phases (4 adapters): {peak:.0f} MB")
    print("load -> use -> unload while serving: 31 adapters loaded, the 32nd used, 28 unloaded")


if __name__ == "__main__":
    main()
