"""The decoder interface: rows joined from two decoders, dropped and trimmed, each row giving
the logits it gives alone, for lorakit's lean pass and for transformers' forward pass."""

import pytest
import torch
from conftest import tiny_model

from lorakit.inference.decoder import TransformersDecoder, new_decoder
from lorakit.inference.kv_cache import cat_rows
from lorakit.inference.lean import LeanDecoder

PROMPTS = [[5, 17, 42, 9], [7, 8], [100, 3, 3, 3, 250, 11]]


class Rows:
    """A decoder and the mask and positions of its rows, fed the way the engine feeds it."""

    def __init__(self, decoder, prompts: list[list[int]]) -> None:
        longest = max(map(len, prompts))
        self.ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):
            self.ids[i, longest - len(p) :] = torch.tensor(p)
            self.mask[i, longest - len(p) :] = 1
        self.decoder = decoder

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, t) after what was fed -> the last position's logits (B, V)."""
        if self.decoder.size:  # a decoding step: its column joins the mask
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with torch.no_grad():
            return self.decoder(ids, self.mask, positions)

    def prefill(self) -> torch.Tensor:
        return self.feed(self.ids)

    def join(self, other: "Rows") -> None:
        self.decoder.extend(other.decoder)
        self.mask = cat_rows(self.mask, other.mask, dim=1)

    def keep(self, rows: list[int]) -> None:
        self.mask = self.mask[rows]
        lead = int(self.mask.any(0).long().argmax())  # columns every row pads
        self.mask = self.mask[:, lead:]
        self.decoder.select(torch.tensor(rows))
        self.decoder.trim(lead)


def _alone(model, prompt: list[int], tokens: list[int], make) -> list[torch.Tensor]:
    """One row by itself: the prompt, then each of `tokens`; the logits after each."""
    row = Rows(make(model, len(prompt) + len(tokens)), [prompt])
    out = [row.prefill()[0]]
    out += [row.feed(torch.tensor([[t]]))[0] for t in tokens]
    return out


DECODERS = {
    "lean": lambda model, capacity: LeanDecoder(model, capacity),
    "transformers": lambda model, capacity: TransformersDecoder(model),
}


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("way", list(DECODERS))
def test_rows_joined_dropped_and_trimmed_give_their_own_logits(kind, way):
    if way == "lean" and kind == "gpt2":
        pytest.skip("the lean pass is for LLaMA-style models")
    model = tiny_model(kind)
    make = DECODERS[way]
    a = Rows(make(model, 5), PROMPTS[:2])  # a small capacity: the lean cache has to grow
    b = Rows(make(model, 8), PROMPTS[2:])
    logits = {0: [], 1: [], 2: []}
    for i, row in enumerate(a.prefill()):
        logits[i].append(row)
    logits[2].append(b.prefill()[0])
    fed = {0: [11, 12, 13, 14, 15], 1: [21, 22, 23], 2: [31, 32, 33]}
    for step in range(2):  # a decodes on its own for two steps
        out = a.feed(torch.tensor([[fed[0][step]], [fed[1][step]]]))
        logits[0].append(out[0])
        logits[1].append(out[1])
    a.join(b)  # b's row joins a's two, right-aligned
    out = a.feed(torch.tensor([[fed[0][2]], [fed[1][2]], [fed[2][0]]]))
    for i in range(3):
        logits[i].append(out[i])
    a.keep([2, 0])  # the shortest row leaves; the last columns come first now
    for step in range(1, 3):
        out = a.feed(torch.tensor([[fed[2][step]], [fed[0][step + 2]]]))
        logits[2].append(out[0])
        logits[0].append(out[1])
    for i, prompt in enumerate(PROMPTS):
        want = _alone(model, prompt, fed[i][: len(logits[i]) - 1], make)
        assert len(want) == len(logits[i])
        for got, ref in zip(logits[i], want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_new_decoder_picks_the_lean_pass_where_it_applies():
    assert isinstance(new_decoder(tiny_model("llama"), 8), LeanDecoder)
    assert isinstance(new_decoder(tiny_model("gpt2"), 8), TransformersDecoder)
    short_window = tiny_model("mistral", sliding_window=8)
    assert isinstance(new_decoder(short_window, 8), LeanDecoder)
    # the choice follows `length`, so decoders made for the same length can be joined
    assert isinstance(new_decoder(short_window, 8, length=64), TransformersDecoder)
