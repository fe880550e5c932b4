"""A generation request as the serving engine sees it, and the engine's refusals.

The engine calls the request's `emit(kind, value)` from its own thread for every event:
("token", id), ("finish", "stop" | "length") or ("error", message).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.inference.sampling import Sampling

Emit = Callable[[str, Any], None]


class Busy(LorakitError):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class UnknownAdapter(LorakitError):
    """No adapter of that name is loaded (HTTP 404)."""


class AdapterInUse(LorakitError):
    """An adapter cannot be unloaded while requests use it (HTTP 409)."""


@dataclass(eq=False)
class Request:
    """One generation: the engine calls `emit` from its thread for every event."""

    prompt: list[int]
    sampling: Sampling
    emit: Emit
    adapter: str | None = None  # None: the bare base
    generated: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    generator: torch.Generator | None = None

    def send(self, kind: str, value: Any) -> bool:
        """Hand an event to the request's consumer; False if the consumer is gone."""
        try:
            self.emit(kind, value)
            return True
        except Exception:  # e.g. its event loop has closed
            return False

    def cancel(self) -> None:
        """Stop generating (thread-safe); the row leaves the batch before the next step."""
        self.cancelled.set()
