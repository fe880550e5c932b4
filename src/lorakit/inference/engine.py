"""Continuous batching: one thread owns the model and decodes every running request together.

Each `step()` (1) runs queued commands (adapter load/unload) between forward passes, (2) admits
waiting requests: one prefill forward over the new prompts (left-padded, each row with its own
adapter), whose KV cache is then merged into the running batch, and (3) runs one decode forward
for all running rows, each row with its own adapter, and hands each row its token. While every
running row uses the same adapter, that adapter is added into the cached base weights once
(`lora.layer.folded_adapters`) when the base is kept dequantized, or goes into the 4-bit
kernel's call with the base, so decoding costs about the bare base's; a mixed batch runs each
row's adapter beside the base instead. Finished or
cancelled rows leave the batch at once (index_select on the cache), so a short request never
waits for a long one and a new request never waits for the batch to drain.

Every row is right-aligned: its tokens fill the last columns of the cache, padding sits on the
left with attention mask 0, and positions are mask.cumsum - 1, as in `generate.generate_ids`;
so a row's tokens are the same whatever it is batched with. The model and its cache are driven
through the same `decoder.Decoder` as `generate_ids` (lorakit's lean pass where it applies).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.decoder import (
    Decoder,
    check_joinable,
    left_padded,
    new_decoder,
    output_head_kernel,
    positions,
)
from lorakit.inference.kv_cache import cat_rows
from lorakit.inference.request import Busy, Request, UnknownAdapter
from lorakit.inference.residency import LRU, AdapterShelf
from lorakit.inference.sampling import greedy, next_tokens
from lorakit.lora.layer import folded_adapters, row_adapters, set_active_adapters
from lorakit.models.loading import context_length
from lorakit.models.precision import autocast
from lorakit.quant.linear import dequantized_weights, use_weight_cache


class Engine(AdapterShelf):
    """Continuous-batching generation over one model with many adapters (see module docstring;
    which adapters stay in memory: inference.residency)."""

    def __init__(
        self,
        model: nn.Module,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        max_batch: int = 32,
        max_queue: int = 256,
        cache_weights: bool | None = None,
        max_loaded: int | None = None,
    ) -> None:
        self.model = model
        self.eos = set(eos_ids)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = context_length(model)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.dtype
        if cache_weights is None:
            cache_weights = use_weight_cache(model, self.dtype, self.device)
        self.cache_weights = cache_weights
        self._length = self.context or 1 << 30  # what every decoder is made for (joinable)
        check_joinable(model, self._length)
        self.adapters: dict[str, str] = {}  # every registered name -> its folder
        self.resident = LRU(max_loaded)  # the ones in memory
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], object], Future]] = deque()
        self._thread: threading.Thread | None = None
        self._admitting: list[Request] = []  # popped from the queue, not yet in the batch
        self._stopping = False
        # The running batch: rows, their decoder (and KV cache), mask (B, T) and the token
        # each feeds next.
        self.rows: list[Request] = []
        self._decoder: Decoder | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # rows in each decode forward
        self._fold = ExitStack()  # holds `folded_adapters` while one adapter is folded in
        self.folded: str | None = None  # the adapter added into the cached weights, if any
        self._setting: tuple | None = None  # the adapters the last forward ran with

    # --- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request, or raise LorakitError (bad request), UnknownAdapter or Busy."""
        s = request.sampling
        s.validate()
        if not request.prompt:
            raise LorakitError("empty prompt; give some text to continue")
        if not all(0 <= t < self.vocab for t in request.prompt):
            raise LorakitError(f"prompt token ids must lie in [0, {self.vocab})")
        if self.context is not None and len(request.prompt) + s.max_new_tokens > self.context:
            raise LorakitError(
                f"prompt ({len(request.prompt)} tokens) + max_tokens ({s.max_new_tokens}) "
                f"exceed the model's context of {self.context} tokens; shorten the prompt or "
                "lower max_tokens"
            )
        with self._cond:
            if request.adapter is not None and request.adapter not in self.adapters:
                raise UnknownAdapter(f"no adapter named {request.adapter!r} is loaded")
            if len(self._waiting) >= self.max_queue:
                raise Busy(f"the server is busy ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps (now, if the thread is not running)."""
        future: Future = Future()
        with self._cond:
            if self._thread is not None:
                self._commands.append((fn, future))
                self._cond.notify()
                return future
        _run_command(fn, future)
        return future

    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        with self._cond:
            return len(self.rows), len(self._waiting)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            self._thread = None
            pending = [*self.rows, *self._waiting]
            self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for fn, future in commands:  # no thread any more: run what was asked of it here
            _run_command(fn, future)
        self._drop(set(pending))
        for r in pending:
            r.send("error", "the server is shutting down")

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        weights = dequantized_weights(self.model, self.dtype) if self.cache_weights else None
        # steps of up to decoder.HEAD_ROWS rows run the output head through the compiled kernel
        with weights or nullcontext(), self._fold, output_head_kernel(self.model):
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._commands or self.rows):
                        self._cond.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as e:  # a failed step must not take the server down
                    failed = {*self.rows, *self._admitting}
                    self._drop(failed)
                    self._admitting = []
                    for r in failed:
                        r.send("error", f"generation failed: {e}")

    @torch.no_grad()
    def step(self) -> None:
        """Commands, then admission (prefill + merge), then one decode step for every row."""
        self._drop({r for r in self.rows if r.cancelled.is_set()})
        while True:
            with self._cond:
                if not self._commands:
                    break
                fn, future = self._commands.popleft()
            self._unfold()  # commands change adapters: they see the weights as stored
            _run_command(fn, future)
        with autocast(self.device, self.dtype):
            self._admit()
            if not self.rows or self._decoder is None:
                return
            self.batch_sizes.append(len(self.rows))
            self.resident.touch(r.adapter for r in self.rows)
            logits = self._forward(self._decoder, self._last[:, None], self._mask, self.rows, True)
            self._last = torch.tensor(self._deliver(self.rows, logits), device=self.device)
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            self._drop({r for r in self.rows if r.finished or r.cancelled.is_set()})

    def _forward(
        self,
        decoder: Decoder,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: list[Request],
        decode: bool = False,
    ) -> torch.Tensor:
        """Feed ids (B, t) to `decoder`; mask (B, T) covers its cache and them -> the last
        position's logits (B, V)."""
        with self._adapters(rows, decode):
            return decoder(ids, mask, positions(mask, ids.shape[1]))

    def _adapters(self, rows: list[Request], decode: bool) -> AbstractContextManager:
        """Set the adapters up for a forward over `rows`; returns the context to run it in.

        Rows all on one adapter (or all on the bare base) run it as the model's active adapter:
        through the 4-bit kernel's call with the base, or, with the base kept dequantized,
        folded into that copy for decoding, kept across steps while the batch stays on it.
        Mixed rows unfold first and run each row's adapter beside the base. Prefill never
        folds: admitting a request on another adapter would otherwise fold twice in one pass.
        """
        names = [r.adapter for r in rows]
        one = names[0] if len(set(names)) == 1 else None
        if self.folded is not None and self.folded != one:
            self._unfold()
        if len(set(names)) > 1:
            self._changed(("rows", tuple(names)))
            return row_adapters(self.model, names)
        fold = decode and one is not None and self.cache_weights
        if self._changed(("one", one, one if fold else self.folded)):  # as after this call
            set_active_adapters(self.model, [one] if one else [])
        if fold and self.folded is None:
            self._fold.enter_context(folded_adapters(self.model))
            self.folded = one
        return nullcontext()

    def _changed(self, setting: tuple) -> bool:
        """Note the adapters the next forward runs with; True (and the running decoder told)
        when they differ from the last forward's."""
        if setting == self._setting:
            return False
        self._setting = setting
        if self._decoder is not None:
            self._decoder.adapters_changed()
        return True

    def _unfold(self) -> None:
        self._fold.close()
        if self.folded is not None:
            self._setting = None
        self.folded = None

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, then merge them into the running batch."""
        new: list[Request] = []
        with self._cond:
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                r = self._waiting.popleft()
                if r.cancelled.is_set():
                    continue
                if not self._room_for(new, r):  # its adapter waits for a running one to end
                    self._waiting.appendleft(r)
                    break
                new.append(r)
        failed = self._bring_in(new)
        new = [r for r in new if r not in failed]
        if not new:
            return
        self._admitting = new
        for r in new:
            if r.sampling.seed is not None:
                r.generator = torch.Generator(self.device).manual_seed(r.sampling.seed)
        ids, mask = left_padded([r.prompt for r in new], self.pad_id, self.device)
        room = max(r.sampling.max_new_tokens for r in new)
        decoder = new_decoder(self.model, ids.shape[1] + room, self._length)
        logits = self._forward(decoder, ids, mask, new)
        last = torch.tensor(self._deliver(new, logits), device=self.device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # the pending token
        self._merge(new, decoder, mask, last)
        self._admitting = []
        self._drop({r for r in new if r.finished or r.cancelled.is_set()})

    def _merge(
        self, new: list[Request], decoder: Decoder, mask: torch.Tensor, last: torch.Tensor
    ) -> None:
        """Append rows to the batch: left-pad the shorter side with zeros, concatenate rows."""
        with self._cond:
            if self._decoder is None or not self.rows:
                self.rows, self._decoder, self._mask, self._last = new, decoder, mask, last
                return
            self._decoder.extend(decoder)
            self._decoder.adapters_changed()
            self._mask = cat_rows(self._mask, mask, dim=1)  # (B, T)
            self._last = torch.cat([self._last, last])
            self.rows = [*self.rows, *new]

    def _deliver(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token (with its own sampling settings) and hand it over."""
        tokens = greedy(logits).tolist()
        for i, r in enumerate(rows):
            if r.sampling.temperature > 0:
                tokens[i] = int(next_tokens(logits[i : i + 1], r.sampling, r.generator)[0])
            if r.cancelled.is_set():
                continue
            if tokens[i] in self.eos:
                r.finished = True
                r.send("finish", "stop")
                continue
            r.generated += 1
            if not r.send("token", tokens[i]):
                r.cancel()
            elif r.generated >= r.sampling.max_new_tokens:
                r.finished = True
                r.send("finish", "length")
        return tokens

    def _drop(self, gone: set[Request]) -> None:
        """Remove rows from the batch, then the leading columns that are padding in every row."""
        if not gone & set(self.rows):
            return
        with self._cond:
            keep = [i for i, r in enumerate(self.rows) if r not in gone]
            self.rows = [self.rows[i] for i in keep]
            if not keep or self._decoder is None:
                self._decoder, self._last, self._mask = None, self._last[:0], self._mask[:0, :0]
                return
            index = torch.tensor(keep, device=self.device)
            self._mask, self._last = self._mask[index], self._last[index]
            lead = int(self._mask.any(0).long().argmax())  # the first column some row uses
            self._mask = self._mask[:, lead:]
            self._decoder.select(index)
            self._decoder.trim(lead)


def _run_command(fn: Callable[[], object], future: Future) -> None:
    try:
        future.set_result(fn())
    except Exception as e:
        future.set_exception(e)
