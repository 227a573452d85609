"""Incremental text: no half characters, no start of a stop string, a cut where the stop string appears."""

from __future__ import annotations

from moekit.data.tokenizers import ByteTokenizer
from moekit.serve.text import TextStream


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(b) for b in text.encode("utf-8")]


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
    stream = TextStream(ByteTokenizer(), stop=["END"])
    pieces = feed(stream, "abEN")
    assert "".join(pieces) == "ab" and not stream.stopped  # "EN" may still become "END"
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.flush() == ""


def test_a_false_start_is_released_and_flush_returns_the_rest():
    stream = TextStream(ByteTokenizer(), stop=["END"])
    assert "".join(feed(stream, "xENx")) == "xENx"
    assert "".join(feed(stream, "E")) == "" and stream.flush() == "E"


def test_a_multibyte_character_is_sent_whole():
    stream = TextStream(ByteTokenizer())
    pieces = feed(stream, "é!")
    assert pieces == ["", "é", "!"]


def test_text_before_a_stop_in_the_same_token_is_kept():
    stream = TextStream(ByteTokenizer(), stop=["\nUser:"])
    assert "".join(feed(stream, "hi there\nUser: more")) == "hi there" and stream.stopped
