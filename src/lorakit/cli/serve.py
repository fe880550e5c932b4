"""`lorakit serve`: the OpenAI-compatible HTTP server over one base and its adapters."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from lorakit.cli.common import adapter_spec, add_model_flags, warn
from lorakit.errors import LorakitError
from lorakit.models.chat import pad_id


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lorakit.server import app as server
        from lorakit.server.schemas import ADAPTER_NAME
    except ImportError as e:
        raise LorakitError(
            f"lorakit serve needs FastAPI and uvicorn ({e}); pip install 'lorakit[serve]'"
        ) from None
    from lorakit.inference.engine import Engine
    from lorakit.models.loading import load_model
    from lorakit.models.precision import resolve_device

    device = resolve_device(args.device)
    if not 0 <= args.port <= 65535:
        raise LorakitError(f"--port {args.port} is not a port number (0-65535)")
    for flag in ("max_batch", "max_queue", "max_tokens", "max_loaded"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise LorakitError(f"--{flag.replace('_', '-')} must be positive")
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    adapters = [adapter_spec(spec) for spec in args.adapter or []]
    for adapter, path in adapters:
        if not ADAPTER_NAME.match(adapter):
            raise LorakitError(
                f"adapter name {adapter!r}: use letters, digits, '_', '-'; give --adapter NAME=DIR"
            )
        if not Path(path).is_dir():
            raise LorakitError(f"adapter directory {path} not found")
    for folder in args.adapter_dir or []:
        if not Path(folder).is_dir():
            raise LorakitError(f"--adapter-dir {folder} is not a directory")
    dirs = [Path(p).resolve().parent for _, p in adapters] + (args.adapter_dir or [])

    model, tokenizer, source = load_model(args.model, quant=args.quant, device=device)
    name = args.served_name or source.name
    if name in {a for a, _ in adapters}:
        raise LorakitError(f"{name!r} names both the base and an adapter; rename one")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = Engine(
        model, eos, pad_id(tokenizer), args.max_batch, args.max_queue, max_loaded=args.max_loaded
    )
    for adapter, path in adapters:
        config = engine.load_adapter(adapter, path).result()
        if config.base_model and config.base_model != source.name:
            warn(f"adapter {adapter} was trained on {config.base_model}")
    app = server.create_app(engine, tokenizer, name, dirs, api_key, args.max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        warn(f"serving on {args.host} without --api-key")
    models = ", ".join([name, *(a for a, _ in adapters)])
    print(f"serving {models} at http://{args.host}:{args.port}/v1", flush=True)
    # SIGTERM (docker stop, systemd, kubernetes): uvicorn stops taking connections, lets the
    # requests in flight finish (streams to their final event), then hands the signal back to
    # the handler that was there before it; this one makes that a clean exit, status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: one base, many adapters chosen per request",
        description="Serve the base and its adapters over OpenAI's API (/v1/models, "
        "/v1/completions, /v1/chat/completions); a request's `model` names the base or an "
        "adapter. POST /v1/adapters {name, path} and DELETE /v1/adapters/NAME load and unload "
        "adapters while serving, from the allowed directories only: the parent folders of the "
        "--adapter directories and every --adapter-dir.",
    )
    add_model_flags(p)
    p.add_argument("--adapter-dir", action="append", help="folder adapters may be loaded from")
    p.add_argument("--served-name", help="the base's name in the API (default: the model's)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or LORAKIT_API_KEY)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="most new tokens a request may ask for (default 1024)",
    )
    p.add_argument(
        "--max-batch", type=int, default=32, help="most requests decoded together (default 32)"
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)"
    )
    p.add_argument(
        "--max-loaded",
        type=int,
        default=None,
        help="most adapters kept in memory (default: all); the least recently used idle one "
        "leaves memory and is read again from its folder when a request names it",
    )
    p.set_defaults(func=cmd_serve)
