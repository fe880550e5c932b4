"""Which of the server's adapters are in memory: all of them, or at most `max_loaded`.

An adapter is registered once (`lorakit serve --adapter`, POST /v1/adapters): its folder is
read and checked, and its name can be requested from then on. With `--max-loaded N` at most N
stay in memory, the least recently used going first; its files stay where they are, and the
next request that names it waits in the queue while the engine thread reads it again (once,
however many requests wait for it), between two decoding steps. An adapter a running request
uses is never unloaded: a request whose adapter finds no room waits until a running one ends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

from lorakit.errors import LorakitError
from lorakit.inference.request import AdapterInUse, Request, UnknownAdapter
from lorakit.lora.layer import lora_layers
from lorakit.lora.peft_format import load_adapter


class LRU:
    """Names in memory, least recently used first, at most `limit` (None: no limit)."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise LorakitError(f"--max-loaded must be at least 1, got {limit}")
        self.limit = limit
        self.order: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self.order

    def __len__(self) -> int:
        return len(self.order)

    def touch(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name in self.order:
                self.order.move_to_end(name)

    def add(self, name: str) -> None:
        self.order[name] = None
        self.order.move_to_end(name)

    def remove(self, name: str) -> None:
        self.order.pop(name, None)

    def victims(self, needed: set[str], busy: set[str]) -> list[str] | None:
        """The names to unload so that every one of `needed` is in memory, least recently used
        first and none of `busy` or `needed`; None where that cannot be done now."""
        missing = [n for n in needed if n not in self.order]
        if self.limit is None:
            return []
        over = len(self.order) + len(missing) - self.limit
        if over <= 0:
            return []
        free = [n for n in self.order if n not in busy and n not in needed]
        return free[:over] if len(free) >= over else None


class AdapterShelf:
    """The Engine's adapters: registering, unloading, and keeping the ones a batch needs in
    memory (the Engine's `adapters`: every registered name -> its folder; `resident`: LRU)."""

    adapters: dict[str, str]
    resident: LRU

    def load_adapter(self, name: str, path: str) -> Future:
        """Register adapter `name` from folder `path`, reading and checking it now (its config
        is the future's result); with a memory limit, the least recently used idle adapter
        beyond it goes out of memory."""

        def load() -> object:
            if name in self.adapters:
                raise LorakitError(f"an adapter named {name!r} is already loaded")
            config = self._read(name, str(path))
            with self._cond:
                self.adapters[name] = str(path)
            for victim in self.resident.victims(set(), self._busy()) or []:
                self._forget(victim)
            return config

        return self.call(load)

    def unload_adapter(self, name: str) -> Future:
        """Unregister adapter `name` (and free its memory); refused while requests use it."""

        def unload() -> None:
            with self._cond:
                if name not in self.adapters:
                    raise UnknownAdapter(f"no adapter named {name!r} is loaded")
                busy = sum(r.adapter == name for r in [*self.rows, *self._waiting])
                if busy:
                    raise AdapterInUse(
                        f"adapter {name!r} is serving {busy} request(s); retry when they finish"
                    )
                del self.adapters[name]
            self._forget(name)

        return self.call(unload)

    def _busy(self) -> set[str]:
        return {r.adapter for r in self.rows if r.adapter is not None}

    def _room_for(self, new: list[Request], r: Request) -> bool:
        """Whether `r` can join the admitted `new` with every adapter they need in memory."""
        needed = {q.adapter for q in [*new, r] if q.adapter is not None}
        return self.resident.victims(needed, self._busy()) is not None

    def _bring_in(self, new: list[Request]) -> list[Request]:
        """Make the adapters of the requests being admitted resident (unloading idle ones as
        needed); returns the requests whose adapter could not be read again, told why."""
        needed = {r.adapter for r in new if r.adapter is not None}
        missing = [n for n in needed if n not in self.resident]
        if not missing:
            self.resident.touch(needed)
            return []
        self._unfold()  # the layers change: nothing may stay added into cached weights
        for victim in self.resident.victims(needed, self._busy()) or []:
            self._forget(victim)
        failed = []
        for name in missing:
            try:
                self._read(name, self.adapters[name])
            except LorakitError as e:
                for r in new:
                    if r.adapter == name:
                        r.send("error", f"adapter {name!r} could not be read again: {e}")
                        failed.append(r)
        return failed

    def _read(self, name: str, path: str) -> object:
        config = load_adapter(self.model, path, name=name)
        self.resident.add(name)
        self._adapters_changed()
        return config

    def _forget(self, name: str) -> None:
        """Out of memory (the registration stays unless the caller drops it)."""
        self._unfold()
        for _, layer in lora_layers(self.model):
            if name in layer.lora_A:
                layer.delete_adapter(name)
        self.resident.remove(name)
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        self._setting = None  # the next forward sets the adapters up again
        if self._decoder is not None:
            self._decoder.adapters_changed()
