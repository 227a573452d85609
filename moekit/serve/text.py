"""From token ids to the text a client sees: incremental decoding that never shows half a character or the
start of a stop string, and cuts the answer where a stop string appears (the stop string is not returned)."""

from __future__ import annotations

from collections.abc import Sequence

from moekit.data.tokenizers import Tokenizer


class TextStream:
    """Feed a request's tokens one by one; each :meth:`push` returns the text that is now safe to send."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False  # a stop string appeared: the answer is complete

    def push(self, token_id: int) -> str:
        """Add one generated token; the new text to send ('' while it is held back)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        cut = min((i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        return self._take(text, len(text) - _held_back(text, self.stop))

    def flush(self) -> str:
        """The held-back text once the answer has ended without a stop string."""
        return "" if self.stopped else self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        piece, self.sent = text[self.sent : end], end
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
