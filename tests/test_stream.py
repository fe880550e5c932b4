"""TextStream: stop strings cut exactly (even across tokens) and never shown, not even in part;
a UTF-8 character split over tokens never shown half. A fake byte-level tokenizer stands in."""

from __future__ import annotations

import pytest

from lorakit.inference.stream import TextStream


def byte_tokens(pieces: list[bytes]) -> tuple[list[int], object]:
    """Token ids 0..n-1, token i standing for the bytes pieces[i], and a decode function that
    shows an incomplete UTF-8 character as U+FFFD, as tokenizers' decode does."""

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    return list(range(len(pieces))), decode


def stream_all(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """What each push returns, then what finish returns, for tokens `pieces`."""
    ids, decode = byte_tokens(pieces)
    stream = TextStream(decode, stop)
    shown = [stream.push(t) for t in ids]
    shown.append(stream.finish())
    return shown, stream


def test_without_stop_strings_every_token_is_shown_as_it_comes():
    shown, stream = stream_all([b"Hello", b" wor", b"ld"])
    assert shown == ["Hello", " wor", "ld", ""]
    assert not stream.stopped and stream.text == "Hello world"


def test_a_stop_string_inside_one_token_is_cut_there():
    shown, stream = stream_all([b"Hello", b" world. Bye", b" now"], stop=(".",))
    assert "".join(shown) == "Hello world" and stream.text == "Hello world"
    assert stream.stopped
    assert shown[2:] == ["", ""]  # nothing after the stop, not even at finish


def test_a_stop_string_spanning_two_tokens_is_never_shown_in_part():
    shown, stream = stream_all([b"The end", b" of", b" it: ##", b"# more"], stop=("###",))
    # " ##" may begin "###": held back until the next token settles it.
    assert shown[:3] == ["The end", " of", " it: "]
    assert "".join(shown) == "The end of it: " and stream.stopped
    assert all("#" not in s for s in shown)


def test_a_held_back_prefix_is_released_when_the_stop_string_does_not_follow():
    shown, stream = stream_all([b"a #", b"# b", b" c"], stop=("###",))
    assert shown == ["a ", "## b", " c", ""]  # "#" was held; "## b" begins no stop string
    assert "".join(shown) == stream.text == "a ## b c" and not stream.stopped


def test_the_end_of_the_text_releases_a_held_prefix():
    shown, stream = stream_all([b"x END"], stop=("END!",))
    assert shown == ["x ", "END"] and not stream.stopped


def test_the_earliest_of_several_stop_strings_wins():
    shown, stream = stream_all([b"one two three"], stop=("three", "two"))
    assert "".join(shown) == "one " and stream.text == "one "


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_a_multibyte_character_split_over_tokens_is_never_shown_half(char):
    raw = f"a{char}b".encode()
    pieces = [raw[i : i + 1] for i in range(len(raw))]  # one byte per token
    shown, stream = stream_all(pieces)
    assert "".join(shown) == f"a{char}b"
    assert all("\ufffd" not in s for s in shown)
    assert char in shown  # shown whole, once its last byte arrived


def test_a_stop_string_made_of_a_multibyte_character_spanning_tokens():
    raw = "price: 5€ each".encode()
    cut = raw.index("€".encode()) + 1  # the euro sign's 3 bytes split 1 + 2
    shown, stream = stream_all([raw[:cut], raw[cut:]], stop=("€",))
    assert "".join(shown) == "price: 5" and stream.stopped
    assert all("\ufffd" not in s for s in shown)


def test_a_character_cut_off_by_the_last_token_is_dropped_at_finish():
    raw = "ok €".encode()
    shown, stream = stream_all([raw[:4], raw[4:5]])  # "ok " + the euro sign's first two bytes
    assert shown == ["ok ", "", ""] and stream.text == "ok "
