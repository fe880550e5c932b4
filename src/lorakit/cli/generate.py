"""`lorakit generate` and `lorakit chat`: text from the base or base + adapter(s), streamed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from torch import nn

from lorakit.cli.common import add_sampling_flags, load_with_adapters, sampling
from lorakit.errors import LorakitError
from lorakit.inference.generate import generate


def _answer(model: nn.Module, tokenizer: Any, prompt: Any, args: argparse.Namespace, **kw) -> str:
    """Stream the answer to stdout as it comes; returns it."""
    settings = dataclasses.asdict(sampling(args))

    def show(text: str) -> None:
        print(text, end="", flush=True)

    text = generate(model, tokenizer, prompt, on_text=show, **settings, **kw)
    print()
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LorakitError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    sampling(args)  # refuse bad sampling flags before the model loads
    model, tokenizer, _, names = load_with_adapters(args)
    if args.raw:
        _answer(model, tokenizer, prompt, args, adapter=names, raw=True)
    else:
        _answer(model, tokenizer, prompt.strip(), args, adapter=names)


def cmd_chat(args: argparse.Namespace) -> None:
    sampling(args)
    model, tokenizer, source, names = load_with_adapters(args)
    who = f"{source.name}" + (f" + {', '.join(names)}" if names else "")
    print(f"chatting with {who}; empty line or Ctrl-D to quit, /reset to forget the history")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line:
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _answer(model, tokenizer, history, args, adapter=names)
        except LorakitError as e:  # the history outgrew the context: the chat goes on
            history.pop()
            print(f"error: {e}; or /reset to forget the history", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt (--prompt or stdin), streamed")
    add_sampling_flags(p)
    p.add_argument("--prompt", help="the prompt (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="continue the text; no chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history")
    add_sampling_flags(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)
