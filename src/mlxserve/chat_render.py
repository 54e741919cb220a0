"""How the terminal chat shows an answer: streamed as it is generated, as Markdown, without
flicker, and the one-line figures after it.

`AnswerView` re-renders the whole answer as Markdown while it grows. Lines far enough above
the end that more text is unlikely to change them are printed once, for good; only the last
screenful stays in a rich Live region that is redrawn. So the region always fits the screen
(a Live region taller than the screen cannot be erased and leaves copies behind), and once
the answer is complete the region is replaced by its final lines.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment, SegmentLines
from rich.spinner import Spinner
from rich.text import Text

from .chat_backend import Delta, Stats

REFRESH_S = 0.1  # re-render the Markdown at most this often while streaming
CODE_THEME = "monokai"

# C0 controls but tab and newline, DEL and C1: a model's output must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))


def plural(n: int, noun: str) -> str:
    """`n` of `noun` as the CLI and the chat show counts: thousands separated, the noun
    singular for one (`1 token`, `1,531 tokens`)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def reading_prompt(read: int, total: int) -> str:
    """How far the engine has read a prompt, e.g. `reading the prompt: 1,536 of 4,096 tokens
    (37%)` (a long prompt takes minutes on a CPU)."""
    return f"reading the prompt: {read:,} of {plural(total, 'token')} ({100 * read // max(total, 1)}%)"


class AnswerView:
    """Use as a context manager; `add()` each Delta; leaving the block prints the final
    render (also after Ctrl-C: what came so far stays on screen). `live=False`: print only
    then (for text that is already complete). `plain`: print only then, the text as written
    and each line whole, not Markdown (for a file or a pipe: rendered Markdown is wrapped to
    the console's width, which off a terminal is nobody's). `show_content=False`: the answer's
    text is counted (the spinner line says "writing") but not shown, as it is written
    elsewhere (a file: see repl.Repl); the thinking, the spinner line and the progress are."""

    def __init__(self, console: Console, *, show_thinking: bool = True, live: bool = True,
                 plain: bool = False, show_content: bool = True,
                 progress: Callable[[], tuple[int, int] | None] | None = None):
        self.console = console
        self.live = live and not plain
        self.plain = plain
        self.show_thinking = show_thinking
        self.show_content = show_content
        self.progress = progress  # (prompt tokens read, prompt tokens) until the first token
        self._spinner = Spinner("dots")
        self.reasoning = ""
        self.content = ""
        self.tokens = 0
        self._printed = 0  # rendered lines already printed above the live region
        self._last_render = 0.0
        self._live: Live | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> AnswerView:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self.live and self.console.is_terminal:
            # transient: the region is erased when it stops, and the final lines printed instead
            self._live = Live(self._footer(), console=self.console, transient=True, auto_refresh=True,
                              refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.plain:
            if self._parts():
                self.console.print(Group(*self._parts()), soft_wrap=True)  # (soft_wrap: no line cut)
            return
        lines = self._lines()
        if self._live is not None:
            self._live.update(Text(""), refresh=False)
            self._live.stop()
        if len(lines) > self._printed:
            self.console.print(SegmentLines(lines[self._printed:], new_lines=True), end="")
        self._printed = len(lines)

    def add(self, delta: Delta) -> None:
        self.reasoning += delta.reasoning
        self.content += delta.content
        self.tokens += delta.tokens
        now = time.monotonic()
        if self._live is not None and now - self._last_render >= REFRESH_S:
            self._last_render = now
            self._refresh()

    # ---- rendering -----------------------------------------------------------------------------
    def _refresh(self) -> None:
        lines = self._lines()
        # Keep the region within the screen: the footer and the prompt line need room too.
        window = max(self.console.height - 4, 1)
        stable = max(len(lines) - window, 0)
        if stable > self._printed:
            self._live.console.print(SegmentLines(lines[self._printed:stable], new_lines=True), end="")
            self._printed = stable
        self._live.update(Group(SegmentLines(lines[self._printed:], new_lines=True), self._footer()))

    def _lines(self) -> list[list[Segment]]:
        parts = self._parts()
        if not parts:
            return []
        return self.console.render_lines(Group(*parts), self.console.options, pad=False)

    def _parts(self) -> list:
        parts = []
        reasoning = self.reasoning.strip()
        if self.show_thinking and reasoning:
            parts.append(Text(printable(reasoning), style="dim italic"))
        if self.show_content and self.content.strip():
            if parts:
                parts.append(Text(""))
            content = printable(self.content.strip())
            parts.append(Text(content) if self.plain else Markdown(content, code_theme=CODE_THEME))
        return parts

    def _footer(self) -> _Footer:
        return _Footer(self)

    def footer_text(self) -> str:
        if self.content.strip():
            doing = "writing"
        elif self.reasoning.strip():
            doing = "thinking"
        else:
            read = self.progress() if self.progress is not None and not self.tokens else None
            if read is not None:
                return f"{reading_prompt(*read)} · Ctrl-C stops"
            doing = "waiting"
        return f"{doing} · {plural(self.tokens, 'token')} · Ctrl-C stops"


class _Footer:
    """The spinner line under the answer. Its text is made at every redraw (the Live region
    redraws 8 times a second), so that it moves while no token comes: a long prompt being
    read. One spinner per view, so that its animation runs on."""

    def __init__(self, view: AnswerView):
        self.view = view

    def __rich__(self) -> Spinner:
        self.view._spinner.update(text=Text(self.view.footer_text(), style="dim"))
        return self.view._spinner


def format_stats(stats: Stats | None, cut: bool = False) -> str:
    """The line after an answer, e.g. `prompt 1,086 (1,024 cached) · TTFT 0.02s · 412.3 tok/s ·
    300 generated`: counts of tokens, without the word, so that the line fits 80 columns in the
    usual case with thousands separators; (max): the answer reached max_tokens, (cut): stopped
    with Ctrl-C; figures the source did not give are left out."""
    if stats is None:
        return "(cut)" if cut else ""
    parts = []
    if stats.prompt_tokens is not None:
        cached = f" ({stats.cached_tokens:,} cached)" if stats.cached_tokens is not None else ""
        parts.append(f"prompt {stats.prompt_tokens:,}{cached}")
    if stats.ttft_s is not None:
        parts.append(f"TTFT {stats.ttft_s:.2f}s")
    if stats.tok_s is not None:
        parts.append(f"{stats.tok_s:.1f} tok/s")
    why = " (cut)" if cut else " (max)" if stats.finish_reason == "length" else ""
    parts.append(f"{stats.completion_tokens:,} generated{why}")
    return " · ".join(parts)
