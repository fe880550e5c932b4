"""Token ids in, text out, for every way lorakit streams text (the CLI, the server, the API).

`TextStream` holds back an unfinished UTF-8 character (the tokenizer's decode shows it as
U+FFFD until its last byte arrives) and any ending that may begin a stop string, and cuts the
text exactly before the first stop string, even inside a token. So no stop string is ever shown,
and no half character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Push token ids one at a time; each push returns the text now safe to show."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string appeared: self.text ends before it

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._take(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # a multi-byte character still incomplete
        held = [k for s in self.stop for k in range(1, len(s)) if self.text[:safe].endswith(s[:k])]
        return self._take(safe - max(held, default=0))

    def finish(self) -> str:
        """The rest of the text (what was held back), once no token will follow; a character
        whose last bytes never came (generation stopped inside it) is dropped, not shown as
        U+FFFD."""
        if not self.stopped:
            self.text = self.text.rstrip("\ufffd")
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
