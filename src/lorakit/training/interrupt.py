"""Ctrl-C during training: the first press stops the run after the current step (which then
checkpoints), a second one at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lorakit.training.distributed import is_main


class _StopFlag:
    requested = False


@contextmanager
def stop_on_interrupt() -> Iterator[_StopFlag]:
    """The first Ctrl-C asks the loop to stop after the current step (which then checkpoints);
    a second one interrupts at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        if is_main():  # under torchrun every rank gets the signal; one says so
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
