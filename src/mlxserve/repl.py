"""`mlxserve chat`: the terminal REPL (prompt_toolkit for input, rich for output).

The loop reads a line, runs it as a slash command or sends it as the next question, and
shows the answer as it streams (chat_render). Answers come from a backend (chat_backend):
the engine in this process, or a server given with --url. With stdin not a terminal (a
pipe) the same commands and questions come from what was piped (see piped_messages), and
only the answers' text goes to stdout (PipedRepl).
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from . import piped_input
from .chat_backend import BackendError, Delta, Stats
from .chat_render import AnswerView, format_stats, plural, printable
from .chat_session import ChatSession, Settings, UsageError
from .interrupts import join
from .paths import expand_user

PROMPT = ">>> "
CONTINUATION = "... "
KEYS_HELP = ("Enter sends · Esc-Enter (or paste) for several lines · Tab completes commands · "
             "Up/Down history · Ctrl-C stops an answer or clears the line · Ctrl-D quits · "
             "start a message with // to send a leading /")


def mlxserve_home() -> Path:
    """Where the chat keeps its files (history): $MLXSERVE_HOME, or ~/.mlxserve."""
    return expand_user(os.environ.get("MLXSERVE_HOME") or Path.home() / ".mlxserve")


# ---- entry point ------------------------------------------------------------------------------
def run_chat(args) -> int:
    """`mlxserve chat` (and bare `mlxserve`): the REPL, or what was piped when stdin is a pipe."""
    from .cli import CLIError, check_max_tokens_flag, check_temperature_flag

    check_temperature_flag(args.temperature)  # (in run's words: one message for both)
    check_max_tokens_flag(args.max_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        # Ctrl-C must stop an answer even when this process was started with SIGINT ignored
        # (a parent's choice that children inherit: e.g. one busy in system(), as MLX's CPU
        # back-end is while it compiles kernels).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    piped = None
    if not interactive:
        # Taken as it comes (a FIFO can drive the chat line by line); the model loads once the
        # first line that is not blank has come: there is something to do.
        lines = piped_input.piped_lines(piped_input.read_pieces(sys.stdin))
        first = next((line for line in lines if line.strip()), None)
        if first is None:
            raise CLIError("no question on stdin")
        name, *rest = first.split(maxsplit=1)
        command = find_command(name)
        if command is not None and command.run is _cmd_quit:
            if rest:  # refused as Repl.command refuses it later in the input (`/exit now`)
                raise CLIError(f"usage: {name} (nothing after it)")
            return 0  # nothing to do: no model to load for it
        piped = piped_messages(itertools.chain([first], lines))
    settings = Settings(think=not args.no_think)
    if args.temperature is not None:
        settings.set("temperature", str(args.temperature))
    if args.max_tokens is not None:
        settings.set("max_tokens", str(args.max_tokens))
    if args.format is not None:
        try:
            settings.set("schema", args.format)
        except UsageError as exc:
            raise CLIError(str(exc).replace("/format", "--format", 1)) from None
    session = ChatSession(system=args.system, settings=settings)  # ('': no system prompt, see ChatSession)
    try:
        backend = open_backend(args)
    except BackendError as exc:
        raise CLIError(str(exc)) from None
    if settings.schema is not None:
        try:
            backend.check_schema(settings.schema)
        except BackendError as exc:
            backend.close()
            raise CLIError(str(exc).replace("/format", "--format", 1)) from None
    try:
        if not interactive:
            return PipedRepl(backend, session, piped).run()
        from .cli import output_console

        if sys.stdout is not None and sys.stdout.isatty():
            return Repl(backend, session, output_console()).run()
        # stdout a file or a pipe (`mlxserve chat > answers.txt`): only the answers' text goes
        # there, as piped chat writes it; all else (banner, figures, what commands say, errors,
        # the prompt) goes to the terminal typed in (_terminal_stream), as piped chat's to stderr.
        screen = _terminal_stream()
        console = (Console(file=screen, no_color=bool(os.environ.get("NO_COLOR")), markup=False) if screen.isatty()
                   else output_console(stderr=True))  # (no terminal at all: stderr, unwrapped)
        return Repl(backend, session, console, answers=sys.stdout, screen=screen).run()
    except KeyboardInterrupt:
        if not interactive:  # as `run` does: nothing to keep, and no waiting for the engine's step
            from .cli import _exit_at_once

            _exit_at_once(130)
        raise
    finally:
        backend.close()


def open_backend(args):
    from .chat_backend import EngineBackend, HTTPBackend

    if args.url:
        from .cli import check_api_key

        api_key = args.api_key or os.environ.get("MLXSERVE_API_KEY")
        check_api_key(api_key, "--api-key" if args.api_key else "MLXSERVE_API_KEY")
        return HTTPBackend(args.url, api_key=api_key, model=args.model)
    from .cli import _load, engine_config
    from .loader import parse_dtype
    from .registry import DEFAULT_MODEL

    config = engine_config(args)  # a bad --memory-budget fails before the model loads
    gguf_mode = args.gguf_mode or "exact"  # (None unless given: see cli._add_chat_parser)
    loaded = _load(args.model or DEFAULT_MODEL, args.dtype, gguf_mode)
    return EngineBackend(loaded, config, {"dtype": parse_dtype(args.dtype), "gguf_mode": gguf_mode})


def message_text(text: str) -> str:
    """A message as typed or pasted, to send: without the blank lines before it and the
    whitespace after it, but with the indentation of its first line (pasted code: the
    first line's indentation is as much part of it as the others'). "" for whitespace only."""
    lines = text.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def piped_messages(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """What was piped on stdin, as it would be typed, taken as it comes: ("command", line) for
    a line that starts with a command's name (`/quit`, `/temp 0`: see COMMANDS), as soon as it
    comes; ("ask", message) for the lines between two commands, as one message (message_text),
    so that a file piped in is one question, as soon as its end is known (the next command, or
    the end of stdin). Only the commands' names make a command here: a line such as
    `/* comment */` or `/etc/hosts` in piped text stays text, and `//quit` sends `/quit`. In a
    fenced block (``` or ~~~, as in Markdown: pasted code, a shell session) every line is text,
    as it is, up to the fence that closes it (or the end of stdin). A question of more than
    MAX_PIPED_TEXT characters is PipedTextTooLong: memory does not grow with what keeps coming."""
    block: list[str] = []
    size = 0
    fence = None  # inside a fenced block: the fence that opened it

    for line in lines:
        if fence is not None:
            if _closes_fence(line, fence):
                fence = None
        else:
            word = _first_word(line)
            if find_command(word) is not None:
                message = message_text("\n".join(block))
                block, size = [], 0
                if message:
                    yield "ask", message
                yield "command", line.strip()
                continue
            if word.startswith("//") and find_command(word[1:]) is not None:
                line = line.replace("/", "", 1)
            fence = _opened_fence(line)
        if not block and not line.strip():
            continue  # blank lines before a question are not sent (nor kept: `yes ''`)
        size += len(line) + 1
        if size > piped_input.MAX_PIPED_TEXT:
            raise piped_input.PipedTextTooLong("a question")
        block.append(line)
    message = message_text("\n".join(block))
    if message:
        yield "ask", message


def _first_word(line: str) -> str:
    """What names a piped line's command, if it has one (piped_messages)."""
    return (line.split(maxsplit=1) or [""])[0]


def _indent(line: str) -> int:
    """Spaces before a line's text: a fence has at most three (Markdown)."""
    return len(line) - len(line.lstrip(" "))


def _opened_fence(line: str) -> str | None:
    """The fence a line opens (three or more ` or ~, after at most three spaces), or None. As
    in Markdown, a backtick fence's info string (```python) has no backtick: "```x```" is code
    inline; and a line indented further is indented code, not a fence."""
    if _indent(line) > 3:
        return None
    text = line.lstrip(" ")
    for mark in "`~":
        length = len(text) - len(text.lstrip(mark))
        if length >= 3 and not (mark == "`" and "`" in text[length:]):
            return text[:length]
    return None


def _closes_fence(line: str, fence: str) -> bool:
    """Whether a line closes the fenced block `fence` opened: the same mark, at least as many
    times, after at most three spaces, and nothing else."""
    text = line.strip()
    return _indent(line) <= 3 and len(text) >= len(fence) and text == fence[0] * len(text)


# ---- slash commands -----------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    args: str  # how the argument is written in /help ("" when there is none)
    help: str
    run: Callable[[Repl, str], bool | None]  # returns True to leave the REPL
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()  # argument completions


QUIT = True


HELP_MIN_WIDTH = 24  # the fewest columns /help gives the descriptions beside the commands


def _cmd_help(repl: Repl, arg: str) -> None:
    # Text, not markup: rich would take "[on|off]" for a style tag and drop it.
    rows = [(Text(f"{' = '.join([c.name, *c.aliases])} {c.args}".rstrip()), Text(c.help)) for c in COMMANDS]
    longest = max(len(usage) for usage, _ in rows)
    if longest + 2 + HELP_MIN_WIDTH <= repl.console.width:
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column()
        for usage, text in rows:
            table.add_row(usage, text)
        repl.console.print(table)
    else:
        # A narrow terminal: side by side, the descriptions had a column or two each, and
        # showed as "…". Each under its command instead, the command on one line as it is.
        for usage, text in rows:
            repl.console.print(usage, soft_wrap=True)
            repl.console.print(Padding(text, (0, 0, 0, 4)))
    repl.say(KEYS_HELP, style="dim")


def _cmd_reset(repl: Repl, arg: str) -> None:
    repl.session.reset()
    repl.say("New conversation." + (" The system prompt stays." if repl.session.system else ""))


def _cmd_system(repl: Repl, arg: str) -> None:
    # none and default are what `chat --system ''` and no --system give (see ChatSession.system);
    # after `--` the text is taken as it is, so that a system prompt can be one of those words.
    if arg:
        literal = _after_double_dash(arg, "usage: /system -- TEXT (TEXT as it is, even none or default)")
        repl.session.system = literal if literal is not None else {"none": "", "default": None}.get(arg.lower(), arg)
    system = repl.session.system
    if system is None:
        repl.say("System prompt: the chat template's default, if any (/system TEXT sets one).")
    elif not system:
        repl.say("System prompt: none, not even the chat template's default.")
    else:
        repl.say("System prompt set." if arg else f"System prompt: {printable(system)}")


def _after_double_dash(arg: str, usage: str) -> str | None:
    """The text after a leading `--` (as a shell command's `--` ends its options), or None
    when the argument does not start with one."""
    parts = arg.split(maxsplit=1)
    if parts[0] != "--":
        return None
    if len(parts) == 1:  # (nothing after it to take as it is)
        raise UsageError(usage)
    return parts[1]


def _setting_command(name: str, label: str) -> Callable[[Repl, str], None]:
    def run(repl: Repl, arg: str) -> None:
        settings = repl.session.settings
        if arg:
            settings.set(name, arg)
        repl.say(f"{label}: {settings.describe(name)}")

    return run


def _cmd_format(repl: Repl, arg: str) -> None:
    settings = repl.session.settings
    if arg:
        probe = Settings()
        probe.set("schema", arg)  # UsageError: the argument's form
        if probe.schema is not None:
            try:
                repl.backend.check_schema(probe.schema)
            except BackendError as exc:  # e.g. a schema no text satisfies
                raise UsageError(str(exc)) from None
        settings.schema = probe.schema
    repl.say(f"answers: {settings.describe('schema')}")


def _cmd_retry(repl: Repl, arg: str) -> None:
    previous = repl.session.take_last_answer()
    if not repl.session.awaiting_answer:
        if previous is not None:  # an answer with no question before it (a loaded file): keep it
            repl.session.messages.append(previous)
        raise UsageError("nothing to retry: ask something first")
    if not repl.answer() and previous is not None:
        repl.session.messages.append(previous)  # the old answer stays when the new one fails


def _cmd_model(repl: Repl, arg: str) -> None:
    if not arg:
        repl.say(f"Model: {repl.backend.describe()} (switch with /model NAME; /models lists them)")
        return
    # (Text, not markup: a path may hold "[", see cli._load)
    loading = repl.console.status(Text(f"Loading {arg} …"), spinner="dots") if repl.backend.loads_models else nullcontext()
    try:
        with loading:
            message = repl.backend.switch_model(arg)
    except (BackendError, ValueError, RuntimeError, OSError) as exc:  # the old model stays
        repl.error(f"cannot switch to {arg}: {_first_line(exc)}")
        return
    repl.say(message)


def _cmd_models(repl: Repl, arg: str) -> None:
    # A name must stay whole to be copied into /model NAME: never cut short or folded (a table
    # did both in a narrow terminal). The details stand beside the names where every row fits
    # the width, else each under its name; a name wider than the terminal is one line that
    # the terminal wraps.
    models = repl.backend.models()
    longest = max((len(m.name) for m in models), default=0)
    beside = all(4 + longest + 2 + len(m.detail) <= repl.console.width for m in models)
    for m in models:
        line = Text(f" {'*' if m.current else ' '}  {m.name.ljust(longest) if beside else m.name}")
        if m.detail:
            line.append("  " if beside else "\n      ")
            line.append(m.detail, style="dim")
        repl.console.print(line, soft_wrap=True)


def _cmd_stats(repl: Repl, arg: str) -> None:
    rows = [(key, _stat_value(key, value)) for key, value in repl.backend.stats().items()]
    # (The table's width: a space either side of each column, one between them.)
    if max((len(key) + len(value) + 4 for key, value in rows), default=0) > repl.console.width:
        # A narrow terminal: the table cut the names short ("kv_bytes_in_u…"); a line each.
        for key, value in rows:
            repl.console.print(Text.assemble((f"{key}:", "dim"), f" {value}"), soft_wrap=True)
        return
    table = Table(box=None, show_header=False, padding=(0, 1))
    table.add_column(style="dim")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    repl.console.print(table)


def _stat_value(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and "bytes" in key:
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _cmd_save(repl: Repl, arg: str) -> None:
    path = repl.session.save(_path_arg(arg, "usage: /save FILE"), model=repl.backend.model)
    repl.say(f"Saved {plural(len(repl.session.messages), 'message')} to {printable(str(path))}")


def _cmd_load(repl: Repl, arg: str) -> None:
    loaded, model = ChatSession.load(_path_arg(arg, "usage: /load FILE"), current=repl.session)
    if loaded.settings.schema is not None:  # checked as /format checks it, before anything changes
        try:
            repl.backend.check_schema(loaded.settings.schema)
        except BackendError as exc:
            raise UsageError(f"cannot load {arg}: its {exc}") from None
    repl.session.system, repl.session.settings, repl.session.messages = loaded.system, loaded.settings, loaded.messages
    repl.replay()
    note = f" (saved with {printable(model)})" if model and model != repl.backend.model else ""
    repl.say(f"Loaded {plural(len(loaded.messages), 'message')}, {plural(loaded.turns, 'question')}{note}")


def _cmd_export(repl: Repl, arg: str) -> None:
    path = repl.session.export(_path_arg(arg, "usage: /export FILE.md"), model=repl.backend.model)
    repl.say(f"Wrote {printable(str(path))}")


def _cmd_quit(repl: Repl, arg: str) -> bool:
    return QUIT


def _path_arg(arg: str, usage: str) -> str:
    """A command's file name as typed: written as a shell takes it where it is quoted or
    has escaped spaces ("my chat.json", or my\\ chat.json as a Mac's Terminal pastes a file
    dragged onto it), else as it is (my chat.json: spaces need no quotes)."""
    if not arg:
        raise UsageError(usage)
    if arg[0] in "'\"" or "\\ " in arg:
        try:
            words = shlex.split(arg)
        except ValueError:  # an unbalanced quote: the name as typed
            return arg
        if len(words) == 1 and words[0]:
            return words[0]
    return arg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


COMMANDS = [
    Command("/help", "", "this list", _cmd_help),
    Command("/reset", "", "start a new conversation", _cmd_reset, aliases=("/clear",)),
    Command("/system", "[TEXT|none|default]", "show or set the system prompt (none: not even the chat "
            "template's default; default: the template's; -- TEXT: TEXT as it is, even none or default)",
            _cmd_system, choices=("none", "default")),
    Command("/temp", "[X]", "sampling temperature (0 = greedy)", _setting_command("temperature", "temperature")),
    Command("/top_p", "[X]", "nucleus sampling mass, in (0, 1]", _setting_command("top_p", "top_p")),
    Command("/max_tokens", "[N|auto]", "longest answer, in tokens", _setting_command("max_tokens", "max_tokens"),
            choices=("auto",)),
    Command("/think", "[on|off]", "show thinking (off: hide it, ask the model not to think)",
            _setting_command("think", "thinking"), choices=("on", "off")),
    Command("/format", "[text|json|SCHEMA]", "answers as text, any JSON object, or JSON under a schema (a file, "
            "or inline JSON)", _cmd_format, choices=("text", "json")),
    Command("/retry", "", "answer the last question again", _cmd_retry),
    Command("/model", "[NAME]", "show or switch the model", _cmd_model),
    Command("/models", "", "list models", _cmd_models),
    Command("/stats", "", "engine statistics", _cmd_stats),
    Command("/save", "FILE", "save the conversation as JSON", _cmd_save),
    Command("/load", "FILE", "load a conversation saved with /save", _cmd_load),
    Command("/export", "FILE.md", "write the conversation as Markdown", _cmd_export),
    Command("/quit", "", "leave (or Ctrl-D)", _cmd_quit, aliases=("/exit",)),
]
_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def find_command(name: str) -> Command | None:
    return _BY_NAME.get(name.lower())


# ---- the loop -------------------------------------------------------------------------------------
class Repl:
    """The chat typed in a terminal. `answers`: where the answers' text goes when that is not
    the console (stdout a file or a pipe, see run_chat): there each answer as the model wrote
    it, ended by a newline, and on the console (`screen`, the terminal, where the prompt is
    drawn too) everything else, the thinking and the progress of the answer included."""

    def __init__(self, backend, session: ChatSession, console: Console, prompt: bool = True,
                 answers=None, screen=None):
        self.backend = backend
        self.session = session
        self.console = console
        self.answers = answers
        self.screen = screen
        # (prompt False: PipedRepl, which reads no line from the terminal and keeps no history.)
        self._prompt = _prompt_session(self) if prompt else None
        # A cut answer's cancellation, still waiting for the engine's step in flight.
        self._stopping: threading.Thread | None = None

    def run(self) -> int:
        self.banner()
        while True:
            try:
                text = self._prompt.prompt(PROMPT)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is dropped
                continue
            except EOFError:  # Ctrl-D
                return self._leave()
            text = message_text(text)
            if not text:
                continue
            head = text.lstrip()  # "  /help" is still a command
            try:
                if head.startswith("/") and not head.startswith("//"):
                    if self.command(head) is QUIT:
                        return self._leave()
                else:
                    self.ask(text.replace("/", "", 1) if head.startswith("//") else text)
            except KeyboardInterrupt:  # e.g. while loading a model: back to the prompt
                self.error("interrupted")

    def banner(self) -> None:
        self.say(f"mlxserve chat · {self.backend.describe()}", style="bold")
        self.say("/help lists commands · Ctrl-C stops an answer · Ctrl-D quits", style="dim")

    def command(self, line: str) -> bool | None:
        name, arg = (line.split(maxsplit=1) + [""])[:2]
        command = find_command(name)
        if command is None:
            self.error(f"unknown command {name}; /help lists them")
            return None
        if arg.strip() and not command.args:  # `/reset extra` did the command, the words unseen
            self.error(f"usage: {name} (nothing after it)")
            return None
        try:
            return command.run(self, arg.strip())
        except BrokenPipeError:  # what it says has no reader any more (`2>&1 | head`): cli.main ends quietly
            raise
        except UsageError as exc:
            self.error(str(exc))
        except (BackendError, ValueError, OSError) as exc:
            self.error(_first_line(exc))
        except Exception as exc:  # a bug: one line, and the conversation survives it
            self.error(f"{name} failed: {type(exc).__name__}: {_first_line(exc)}")
        return None

    # ---- answers ------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        self.session.add_user(text)
        answered = False
        try:
            answered = self.answer()
        finally:
            if not answered:  # also when interrupted at an odd moment: roles keep alternating
                self.session.drop_unanswered()

    def answer(self) -> bool:
        """Answer the conversation's last question; False (and a line why) if that failed.
        Ctrl-C stops the answer: what came so far is kept, marked as cut."""
        settings = self.session.settings
        try:
            self._wait_for_stop()
            generation = self.backend.generate(self.session.model_messages(), settings)
        except BackendError as exc:
            self.error(str(exc))
            return False
        except KeyboardInterrupt:  # before anything was generated: as if never asked
            return False
        # (Only an in-process engine can tell how far it has read the prompt: a server tells
        # nothing before its first token.)
        view = AnswerView(self.console, show_thinking=settings.think, plain=not self.console.is_terminal,
                          show_content=self.answers is None, progress=getattr(generation, "prompt_progress", None))
        cut, failure = False, None
        line_open = False  # an answer's text is in self.answers, its newline not yet
        with view:
            try:
                for delta in generation:
                    view.add(delta)
                    if self.answers is not None and delta.content:
                        self._write_answer(delta.content, generation)
                        line_open = True
                if self.answers is not None:
                    self._write_answer("\n", generation)  # (an empty answer too: a line each)
                    line_open = False
            except KeyboardInterrupt:
                cut = True
                self._stop(generation)
            except BackendError as exc:
                failure = exc
        if line_open:  # cut, or failed: what came of it ends its line, as every answer's does
            self._write_answer("\n", generation)
        if failure is not None:
            self.error(str(failure))
            return False
        if cut and not (view.content or view.reasoning):
            return False  # stopped before anything came: as if never asked
        self.session.add_answer(view.content, view.reasoning, cut=cut)
        stats = generation.stats
        if stats is None and cut:  # the engine is still in its step: the figures we have
            stats = Stats(view.tokens, "cancelled")
        self.say(format_stats(stats, cut=cut), style="dim")
        return True

    def _write_answer(self, text: str, generation) -> None:
        """Text of the answer to `self.answers` (a file or a pipe). Its reader gone (`| head`):
        the answer is cancelled and the BrokenPipeError ends the chat (quietly: cli.main)."""
        try:
            self.answers.write(text)
            self.answers.flush()
        except BrokenPipeError:
            _cancel(generation)
            raise

    def _stop(self, generation) -> None:
        """Ctrl-C during an answer: cancel it without holding up the prompt. The engine drops
        the request only when its current step ends, which on the CPU back-end can be a prompt
        chunk of tens of seconds; the cancellation waits for that in the background. Its
        figures are shown if they come within CUT_FIGURES_WAIT_S (a GPU's step: milliseconds)."""
        stopper = threading.Thread(target=_cancel, args=(generation,), name="mlxserve-chat-stop", daemon=True)
        stopper.start()
        self._stopping = stopper
        try:
            stopper.join(CUT_FIGURES_WAIT_S)
        except KeyboardInterrupt:  # an impatient second Ctrl-C: show the prompt without them
            pass

    def _leave(self) -> int:
        """Ctrl-D or /quit: once a cut answer's step has ended; a Ctrl-C while it has not
        quits at once."""
        try:
            self._wait_for_stop()
        except KeyboardInterrupt:
            from .cli import _exit_at_once

            _exit_at_once(130)
        return 0

    def _wait_for_stop(self) -> None:
        """Before the next answer (or leaving): let a cut answer's cancellation end, saying
        why there is a wait. Ctrl-C stops waiting (KeyboardInterrupt): the engine still takes
        the cancellation before any later request, so nothing waits on it again."""
        stopper = self._stopping
        if stopper is None or not stopper.is_alive():
            self._stopping = None
            return
        self._stopping = None
        with self.console.status("Stopping the previous answer: the engine is finishing its current step …",
                                 spinner="dots"):
            join(stopper)

    def replay(self) -> None:
        """Show a loaded conversation the way it was shown live."""
        for m in self.session.messages:
            if m.role == "user":
                self.say(PROMPT + printable(m.content).replace("\n", "\n" + CONTINUATION), style="bold")
                continue
            with AnswerView(self.console, show_thinking=self.session.settings.think, live=False,
                            plain=not self.console.is_terminal) as view:
                view.add(Delta(m.reasoning, m.content))
            if m.cut:
                self.say("(cut)", style="dim")

    # ---- output -------------------------------------------------------------------------------
    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(Text(text, style=style or ""))

    def error(self, text: str) -> None:
        # soft_wrap: one line, however long (the terminal wraps it, rich inserts no newline)
        self.console.print(Text(f"error: {printable(text)}", style="red"), soft_wrap=True)


CUT_FIGURES_WAIT_S = 0.5  # how long a cut answer's figures are waited for before the prompt returns


def _cancel(generation) -> None:
    """Cancel a generation (in a thread of its own: see Repl._stop)."""
    try:
        generation.cancel()
    except Exception:  # e.g. a server connection that fails as it closes: the answer is cut anyway
        pass


class PipedRepl(Repl):
    """Stdin not a terminal: the commands and questions piped in (piped_messages) run, each as
    soon as it has come, as the terminal's do (Repl.command and Repl.ask, so /temp, /system,
    /reset, /retry, /save … act alike, and /quit or /exit ends the session, reading no more),
    but stdout gets only the answers' text (no thinking, no decoration), each ended by a
    newline; their figures and what commands say go to stderr. Nobody is there to type a line again, so the first error ends the session (one
    line, exit status 2) instead of going on under settings the input did not ask for."""

    def __init__(self, backend, session: ChatSession, messages: Iterable[tuple[str, str]]):
        from .cli import output_console

        super().__init__(backend, session, output_console(stderr=True), prompt=False)
        self.messages = messages
        self._failure: str | None = None
        self._reader_gone = False

    def run(self) -> int:
        from .cli import CLIError

        for kind, text in self.messages:
            if kind == "command":
                if self.command(text) is QUIT:
                    break
            else:
                self.ask(text)
            if self._reader_gone:
                raise BrokenPipeError  # cli.main ends the process quietly
            if self._failure is not None:
                raise CLIError(self._failure)
        return 0

    def answer(self) -> bool:
        try:
            generation = self.backend.generate(self.session.model_messages(), self.session.settings)
        except BackendError as exc:
            self.error(str(exc))
            return False
        content, reasoning = [], []
        line_open = False  # an answer's text is on stdout, its newline not yet
        try:
            for delta in generation:
                reasoning.append(delta.reasoning)
                if delta.content:
                    content.append(delta.content)
                    sys.stdout.write(delta.content)
                    sys.stdout.flush()
                    line_open = True
            sys.stdout.write("\n")
            sys.stdout.flush()
            line_open = False
        except BackendError as exc:
            self._end_line(line_open)
            self.error(str(exc))
            return False
        except BrokenPipeError:  # the reader of stdout went away (`| head`)
            generation.cancel()
            self._reader_gone = True
            return False
        except KeyboardInterrupt:
            self._end_line(line_open)
            raise
        # (A Ctrl-C goes straight to run_chat, which ends the process at once: cancelling here
        # would wait for the engine's step in flight.)
        self.session.add_answer("".join(content), "".join(reasoning))
        print(format_stats(generation.stats), file=sys.stderr)
        return True

    @staticmethod
    def _end_line(line_open: bool) -> None:
        """An answer cut (Ctrl-C, an error) ends its line on stdout too, as every answer there
        does: a reader taking stdout line by line gets what came of it."""
        if line_open:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def error(self, text: str) -> None:
        if self._failure is None:  # the first one ends the session (run)
            self._failure = printable(text)


# ---- input ------------------------------------------------------------------------------------------
def _prompt_session(repl: Repl) -> PromptSession:
    try:
        path = mlxserve_home() / "history"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fail here, not at the first line typed, if it cannot be written or read (a folder
        # of that name: touch() would pass).
        with open(path, "a"), open(path, "rb"):
            pass
        history = FileHistory(str(path))
    except FileExistsError as exc:  # mkdir: a file where the folder would be (MLXSERVE_HOME=a file)
        # (its own words, "[Errno 17] File exists: '…'", read as if all were well)
        repl.error(f"history not kept: {exc.filename} is not a folder")
        history = InMemoryHistory()
    except OSError as exc:
        repl.error(f"history not kept: {exc}")
        history = InMemoryHistory()
    return PromptSession(
        output=_prompt_output(repl.screen),
        history=history,
        completer=SlashCompleter(repl),
        complete_while_typing=False,  # Tab completes; a menu popping up while typing distracts
        key_bindings=_key_bindings(),
        prompt_continuation=lambda width, line_number, wrap_count: CONTINUATION.rjust(width),
        enable_suspend=True,
    )


TERMINAL = "/dev/tty"  # the process's terminal, whatever its streams are


def _prompt_output(screen=None):
    """Where the prompt, the line being typed and the completion menu are drawn: the terminal
    they are typed in (`screen` where the Repl has one: see run_chat). With stdout a terminal,
    prompt_toolkit's own choice (stdout). With stdout a file or a pipe (`mlxserve chat >
    answers.txt`), prompt_toolkit would write them into it as plain text (with carriage
    returns); they go to the terminal (_terminal_stream), so that stdout gets only the answers."""
    if screen is None and sys.stdout is not None and sys.stdout.isatty():
        return None  # prompt_toolkit's default: stdout
    from prompt_toolkit.output import create_output

    return create_output(stdout=screen if screen is not None else _terminal_stream())


def _terminal_stream():
    """The terminal the chat is typed in, for all but the answers when stdout is a file or a
    pipe: stderr where that is the terminal, else the terminal itself (/dev/tty, kept open while
    the chat runs: closed with the process), and only where there is none (a process without
    one, tests) stderr, as plain text."""
    if sys.stderr is not None and sys.stderr.isatty():
        return sys.stderr
    if sys.stdin is None or not sys.stdin.isatty():  # nobody types at a terminal (tests)
        return sys.stderr
    try:
        return open(TERMINAL, "w")
    except OSError:
        return sys.stderr


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:
        """Esc-Enter (Alt-Enter) starts a new line instead of sending."""
        event.current_buffer.insert_text("\n")

    return bindings


class SlashCompleter(Completer):
    """Completes command names, then the arguments that have a fixed set of values (model
    names for /model, file paths for /save, /load and /export)."""

    def __init__(self, repl: Repl):
        self.repl = repl
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        name, space, arg = text.partition(" ")
        if not space:
            for command_name, command in _BY_NAME.items():
                if command_name.startswith(name.lower()):
                    yield Completion(command_name, start_position=-len(name), display_meta=command.help)
            return
        command = find_command(name)
        if command is None:
            return
        if command.name in ("/save", "/load", "/export", "/format"):  # (/format: a schema's file)
            yield from self._paths.get_completions(Document(arg, len(arg)), complete_event)
            if command.name != "/format":
                return
        choices = command.choices
        if command.name == "/model":
            choices = tuple(m.name for m in self._models())
        for choice in choices:
            if choice.startswith(arg):
                yield Completion(choice, start_position=-len(arg))

    def _models(self):
        try:
            return self.repl.backend.models()
        except (BackendError, OSError, ValueError):
            return []
