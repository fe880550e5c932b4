"""Soak test of `lorakit serve`: many concurrent OpenAI clients over many adapters, with
more adapters registered than kept in memory (bench/serve_load.py: batching vs one at a time).

    python bench/serve_soak.py [--clients 200] [--requests 10000] [--adapters 200]
        [--max-loaded 32] [--max-tokens 8] [--model smollm2]

Starts `lorakit serve` on the loopback (a free port) with `--max-loaded`, registers
`--adapters` random rank-8 adapters (q/k/v/o) through POST /v1/adapters, then runs `--clients`
asyncio clients (the official `openai` package; half the requests streamed, each on a random
adapter or the base) until `--requests` are answered. Reports throughput, latency p50/p99, the
errors by kind (the client retries a 429 after its Retry-After, up to 3 times), and the
server's resident memory after each tenth of the requests (it should stay flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def make_adapters(model_name: str, root: Path, count: int) -> list[Path]:
    import torch

    from lorakit.lora.layer import attach_lora, lora_layers
    from lorakit.lora.peft_format import AdapterConfig, save_adapter
    from lorakit.lora.targets import resolve_targets
    from lorakit.models.loading import load_model

    model, _, _ = load_model(model_name, quant="nf4", device="cpu", with_tokenizer=False)
    modules, targets = resolve_targets(model, "default")
    attach_lora(model, modules, "x", rank=8, alpha=16)
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        for _, layer in lora_layers(model):
            w = layer.lora_B["x"].weight
            w.data.copy_(torch.randn(w.shape, generator=gen) * 0.01)
        paths.append(root / f"ad{i:03d}")
        save_adapter(model, paths[-1], AdapterConfig(rank=8, alpha=16, target_modules=targets), "x")
    return paths


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(args: argparse.Namespace, url: str, names: list[str], pid: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=3, timeout=600)
    latencies: list[float] = []
    errors: Counter = Counter()
    memory: list[tuple[int, float]] = []
    left, done = args.requests, 0
    rng = random.Random(0)

    async def one() -> None:
        nonlocal done
        model = rng.choice(names)
        stream = rng.random() < 0.5
        messages = [{"role": "user", "content": f"Say something about item {rng.randrange(999)}."}]
        t = time.perf_counter()
        try:
            kw = {"model": model, "messages": messages, "max_tokens": args.max_tokens}
            if stream:
                chunks = await client.chat.completions.create(**kw, stream=True)
                async for _ in chunks:
                    pass
            else:
                await client.chat.completions.create(**kw)
            latencies.append(time.perf_counter() - t)
        except openai.APIError as e:
            errors[type(e).__name__] += 1
        done += 1
        if done % max(1, args.requests // 10) == 0:
            memory.append((done, rss_mib(pid)))

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    print(
        f"{args.requests} requests, {args.clients} clients, {len(names) - 1} adapters "
        f"(--max-loaded {args.max_loaded}), {args.max_tokens} new tokens at most"
    )
    print(
        f"wall {wall:.1f} s, {len(latencies) / wall:.1f} requests/s, latency p50 "
        f"{pct(0.5):.2f} s, p99 {pct(0.99):.2f} s, errors {dict(errors) or 0}"
    )
    print("server RSS (MiB) after each tenth: " + ", ".join(f"{n}: {m:.0f}" for n, m in memory))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--max-loaded", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serve-load-"))
    paths = make_adapters(args.model, root, args.adapters)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--adapter-dir", str(root), "--max-loaded", str(args.max_loaded)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        while True:
            try:
                base = httpx.get(f"{url}/v1/models", timeout=1).json()["data"][0]["id"]
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.5)
        t = time.perf_counter()
        for p in paths:
            body = {"name": p.name, "path": str(p)}
            r = httpx.post(f"{url}/v1/adapters", content=json.dumps(body), timeout=120)
            r.raise_for_status()
        print(
            f"registered {len(paths)} adapters in {time.perf_counter() - t:.1f} s; "
            f"server RSS {rss_mib(server.pid):.0f} MiB"
        )
        asyncio.run(load(args, url, [base, *(p.name for p in paths)], server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
