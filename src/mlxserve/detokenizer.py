"""Streaming text: token ids -> UTF-8-safe text deltas -> stop-string cut.

`IncrementalDetokenizer` uses the prefix-offset / read-offset scheme (as in TGI and vLLM). It
keeps a short window of ids: ``[prefix_offset, read_offset)`` is already-emitted context and
``[read_offset, end)`` is pending. After each token it decodes the window with and without the
pending part; the difference is new text, emitted once it does not end in U+FFFD (a UTF-8
character whose bytes are split over tokens still has bytes to come). The context token keeps
left-context effects right, e.g. SentencePiece's leading space, which ``decode([id])`` drops.
Each step decodes a few tokens, so a long output costs O(n), not O(n^2).

`StopMatcher` holds back any tail of the text that could still grow into a stop string.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character
    and never change already-emitted text."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_tail: Sequence[int] = ()):
        """``decode`` turns ids into text (e.g. ``tokenizer.decode`` with the caller's choice of
        skip_special_tokens). ``prompt_tail``: the last few prompt ids (about 5), giving the first
        generated tokens their left context; it is never emitted."""
        self._decode = decode
        self._ids = list(prompt_tail)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_id: int) -> str:
        """Append a token; return the text that became final (maybe "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        # The tokens just emitted become the context window; older ids are no longer needed.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """End of stream: release held-back text (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        delta = new_text[len(prefix_text) :]
        if delta:
            self._pieces.append(delta)
        return delta


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could be the start of one.

    The result depends only on the whole text, never on how it was cut into deltas: the stream
    stops at the first position where some stop string ends (of two ending there, the longer
    wins), and the emitted text ends right before that stop string.
    """

    def __init__(self, stops: Sequence[str]):
        if not all(stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._pending = ""  # text received but not emitted; never contains a whole stop string
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped?). After a stop, everything is swallowed."""
        if self.stopped:
            return "", True
        text = self._pending + delta
        cut = self._first_stop(text)
        if cut is not None:
            self._pending = ""
            self.stopped = True
            return text[:cut], True
        held = self._held_tail(text)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        """End of stream without a stop: release the held-back tail."""
        tail, self._pending = self._pending, ""
        return "" if self.stopped else tail

    def _first_stop(self, text: str) -> int | None:
        """Start of the stop string that ends first in ``text``, or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else best[1]

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        held = 0
        last = text[-1:]
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if stop[n - 1] == last and text.endswith(stop[:n]):  # (the cheap test first: no slice)
                    held = n
                    break
        return held
