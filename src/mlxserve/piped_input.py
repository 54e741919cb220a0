"""What is piped on stdin (`run`'s prompt, `chat`'s commands and questions), read as it comes.

Never all at once with stdin.read(): that holds everything in memory before anything is done
(`yes '/temp 0' | mlxserve chat` grew until the kernel killed it), and a Ctrl-C is not raised
while it runs (its C loop reads on as long as data comes). Here each read returns to Python,
and a wait for input wakes every SIGNAL_CHECK_S, so that a Ctrl-C the kernel hands to another
thread is still raised in the main thread (see interrupts).
"""

from __future__ import annotations

import codecs
import io
import os
import select
from collections.abc import Iterable, Iterator

from .interrupts import SIGNAL_CHECK_S

# The most text one prompt or question piped may have, in characters. Far more than any model's
# context holds (a million tokens is some 4 million characters): past it the text is refused in
# one line, instead of memory growing with whatever keeps coming (`yes |`).
MAX_PIPED_TEXT = 16_000_000
READ_BYTES = 1 << 16  # one read's worth
BOM = "\ufeff"  # a byte order mark, which editors on Windows put before a UTF-8 file's text


class PipedTextTooLong(ValueError):
    """More than MAX_PIPED_TEXT characters in one prompt or question."""

    def __init__(self, what: str):
        super().__init__(f"{what} on stdin has more than {MAX_PIPED_TEXT:,} characters, more than any "
                         f"model's context holds")


def read_pieces(stream) -> Iterator[str]:
    """The text of `stream` as it comes, one read's worth at a time, until its end. Decoded in
    the stream's encoding, bytes that are not text in it as U+FFFD, as the tokenizer takes such
    bytes from the command line (tokenizer.py): under a C locale Python reads them as lone
    surrogates, which a server then refused, and under a UTF-8 one it stopped at them."""
    try:
        fd = stream.fileno()
    except (AttributeError, io.UnsupportedOperation):  # no file under it (a StringIO): it cannot block
        while piece := stream.read(READ_BYTES):
            yield piece
        return
    decoder = codecs.getincrementaldecoder(stream.encoding or "utf-8")("replace")
    while True:
        if not select.select([fd], [], [], SIGNAL_CHECK_S)[0]:
            continue  # nothing yet: back in Python, where a pending Ctrl-C is raised
        data = os.read(fd, READ_BYTES)
        text = decoder.decode(data, final=not data)
        if text:
            yield text
        if not data:
            return


def piped_lines(pieces: Iterable[str]) -> Iterator[str]:
    """The lines of text that comes in pieces, each as soon as it is whole (the last one at
    the end, if no newline ends it), without its line end: "\n", or "\r\n" as Windows ends
    lines (a "\r" left in would stay inside a question of several lines). A byte order mark
    before the first line goes ("\ufeff/temp 0" is no command). A line longer than
    MAX_PIPED_TEXT is PipedTextTooLong, raised before more of it is read."""
    partial: list[str] = []  # the line read so far
    size = 0
    first = True
    for piece in pieces:
        if first:
            piece, first = piece.removeprefix(BOM), False
        *ends, rest = piece.split("\n")
        for end in ends:
            partial.append(end)
            yield "".join(partial).removesuffix("\r")
            partial, size = [], 0
        partial.append(rest)
        size += len(rest)
        if size > MAX_PIPED_TEXT:
            raise PipedTextTooLong("a line")
    if size:
        yield "".join(partial).removesuffix("\r")


def read_piped_text(stream, what: str) -> str:
    """All of `stream` (`run`'s prompt) as one text, without a byte order mark before it and
    with "\r\n" line ends as "\n" (as piped_lines takes them); past MAX_PIPED_TEXT characters,
    PipedTextTooLong, naming it as `what`, before more is read."""
    pieces, size = [], 0
    for piece in read_pieces(stream):
        size += len(piece)
        if size > MAX_PIPED_TEXT:
            raise PipedTextTooLong(what)
        pieces.append(piece)
    return "".join(pieces).removeprefix(BOM).replace("\r\n", "\n")
