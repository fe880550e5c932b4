"""The `lorakit` command line: one module per command group, each parsing its flags and calling
the package; `main` turns a user mistake (LorakitError) into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from lorakit.errors import LorakitError
from lorakit.heap import restart_with_tuned_heap

# Long runs whose memory counts: started again with glibc's small-block caches off (lorakit/heap.py)
TUNED_HEAP = ("train", "serve")


class Parser(argparse.ArgumentParser):
    """argparse, with a refused flag reported as lorakit's own errors are: one line, exit 2
    (not the usage text first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from lorakit.cli import (
        adapters,
        anatomy,
        evaluate,
        export,
        generate,
        plan,
        quantize,
        serve,
        train,
    )

    parser = Parser(
        prog="lorakit", description="QLoRA fine-tuning on the hardware you already have."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (anatomy, plan, quantize, train, generate, evaluate, adapters, export, serve):
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] and sys.argv[1] in TUNED_HEAP:
        restart_with_tuned_heap()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help exits 0 as argparse does; a refused flag returns 2
        if not e.code:
            raise
        return int(e.code)
    try:
        args.func(args)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
