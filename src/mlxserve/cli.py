"""The `mlxserve` command line: parse arguments, call the library, print results.

Errors the user can fix (unknown model, bad flag value, failed download) print one line
`mlxserve: error: …` on stderr and exit with status 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import NoReturn
from urllib.parse import urlsplit

from . import __version__
from .checks import MAX_TEMPERATURE, is_temperature
from .spec import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS

EXIT_USAGE = 2
PROGRESS_INTERVAL_S = 0.25  # how often `run` updates how far it has read a long prompt


class CLIError(Exception):
    """A problem to report in one line (exit status 2)."""


class StdoutError(OSError):
    """Writing to standard output failed (a full disk: `>/dev/full`). Its own message,
    "[Errno 28] No space left on device", does not say what was being written."""


class _Stdout:
    """Standard output, whose write errors are StdoutError, whatever wrote (print, rich, the
    chat's answers): main() tells them from other OSErrors (a model file that cannot be read).
    A reader that went away (`| head`) stays a BrokenPipeError, ended quietly."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._failing_as_stdout(self._stream.write, text)

    def flush(self) -> None:
        self._failing_as_stdout(self._stream.flush)

    @staticmethod
    def _failing_as_stdout(call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(exc.errno, exc.strerror or str(exc)) from exc

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are reported like every other: one line, exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-5GB" is a value (refused later with its reason), not an unknown option.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        print(f"mlxserve: error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def _print_message(self, message: str, file=None) -> None:
        # argparse drops a failed write: `--help >/dev/full` printed nothing, exit status 0. (The
        # flush: --version exits right after, and a buffered write would fail only at exit.)
        if message:
            file = file or sys.stderr
            file.write(message)
            file.flush()

    def parse_args(self, args=None, namespace=None):
        # argparse refuses arguments that no parser took from the top-level parser, whose help
        # lists the commands (`mlxserve run --bogus` pointed at `mlxserve --help`): the
        # command's own parser refuses them, its help listing its options.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            command = getattr(parsed, "command", None)
            parser = subparsers[0].choices.get(command, self) if subparsers and command else self
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


class _NonEmptyCheck:
    """For a flag whose value names a file, URL, model, host or key: an empty value (`--json ''`,
    `--url "$UNSET"`) is a usage error, not taken as if the flag were left out (bench wrote no
    file, chat ran in-process, serve listened on every interface)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not values.strip():
            parser.error(f"argument {option_string}: expected a value, got {values!r}")
        super().__call__(parser, namespace, values, option_string)


class _NonEmpty(_NonEmptyCheck, argparse._StoreAction):
    pass


class _NonEmptyAppend(_NonEmptyCheck, argparse._AppendAction):
    pass


def build_parser() -> argparse.ArgumentParser:
    from .registry import DEFAULT_MODEL

    parser = _Parser(
        prog="mlxserve",
        description="Fast local LLM inference on MLX: run, chat, serve an OpenAI-compatible API, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"mlxserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="generate text for one prompt and stream it to stdout")
    run.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt, or pipe it on stdin)")
    run.add_argument("--prompt", "-p", help="the prompt text")
    _add_model_args(run, DEFAULT_MODEL)
    run.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    run.add_argument("--temperature", "--temp", type=float, default=0.7, help=f"sampling temperature, 0 to {MAX_TEMPERATURE} as in OpenAI's API; 0 = greedy (default 0.7)")
    run.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    run.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    run.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × the top probability")
    run.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already in the context (1 = off)")
    run.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    run.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    run.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    run.add_argument("--stop", action="append", default=[], metavar="STR", help="stop when this text appears (repeatable)")
    # Both of a --x/--no-x pair is refused: argparse would take the last one given.
    chat_or_not = run.add_mutually_exclusive_group()
    chat_or_not.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap the prompt in the model's chat template (default when it has one)")
    chat_or_not.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt as plain text")
    run.add_argument("--system", help="system message (chat mode); '' for none at all: without the flag the "
                                      "chat template's default system prompt applies, if it has one")
    run.add_argument("--no-think", dest="think", action="store_false",
                     help="chat mode: ask the model to answer without reasoning first (Qwen3's enable_thinking=False; "
                          "templates without the switch ignore it)")
    run.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.add_argument("--format", metavar="json|SCHEMA",
                     help="hold the answer to JSON: 'json' for any JSON object, or a JSON schema (a file, or the "
                          "schema itself as JSON text); chat mode then asks the model not to think")
    _add_engine_args(run)

    pull = sub.add_parser("pull", help="download a model into the local cache")
    pull.add_argument("model", nargs="?", help=f"alias or Hugging Face repo id (default {DEFAULT_MODEL})")
    pull.add_argument("--list", action="store_true", help="list the known aliases")

    models = sub.add_parser("models", help="list models available locally")
    models.add_argument("--json", action="store_true", help="print JSON")

    doctor = sub.add_parser("doctor", help="check this machine and the installation")
    doctor.add_argument("--json", action="store_true", help="print JSON")

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                                         "/v1/embeddings)")
    _add_model_args(serve, DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1", action=_NonEmpty, help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", action=_NonEmpty, help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--cors", action=_NonEmptyAppend, default=[], metavar="ORIGIN", help="allow browser requests from ORIGIN, scheme://host[:port] as browsers send it (e.g. http://localhost:3000), or * for any (repeatable; none by default)")
    serve.add_argument("--max-running", type=int, default=64, help="requests decoding at once (default 64)")
    serve.add_argument("--served-model-name", action=_NonEmpty, help="the model name clients use (default: --model; "
                       "a .gguf file: its alias if pulled as one, else its name without .gguf)")
    _add_engine_args(serve)

    _add_chat_parser(sub, DEFAULT_MODEL)
    _add_bench_parser(sub, DEFAULT_MODEL)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags: the KV memory budget and speculative decoding."""
    from .spec import DRAFTERS

    p.add_argument("--memory-budget", metavar="SIZE",
                   help="most memory the KV cache may use, e.g. 8GB (default: 60%% of device memory minus the weights)")
    p.add_argument("--speculative", choices=DRAFTERS, default=None,
                   help="speculative decoding: draft tokens that the model checks in its next step; the "
                        "output is the same. 'ngram' drafts the tokens that followed the latest earlier "
                        "occurrence of the last few tokens (prompt lookup): faster where the answer repeats "
                        "its context. 'dflash' drafts a block with a DFlash draft model (--draft-model) "
                        "(default off)")
    p.add_argument("--draft-model", metavar="MODEL", action=_NonEmpty,
                   help="with --speculative dflash: the DFlash draft trained for this model (folder, alias or "
                        "Hugging Face repo id, e.g. z-lab/Qwen3-4B-DFlash-b16); 'random' gives random weights "
                        "at the model's shape, for benchmarks")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help=f"most draft tokens a row checks in one step (default {DEFAULT_DRAFT_TOKENS}; "
                        "dflash: the draft's block size minus one)")


def _add_model_args(p: argparse.ArgumentParser, default_model: str, default_said: str | None = None) -> None:
    """`default_said`: how --help states the model's default, where it is not default_model alone."""
    p.add_argument("--model", "-m", default=default_model, action=_NonEmpty,
                   help=f"model folder, .gguf file, alias or Hugging Face repo id (default {default_said or default_model})")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: the checkpoint's; GGUF: float16 on a GPU, float32 on the CPU)")
    from .quant import GGUF_MODES

    p.add_argument("--gguf-mode", choices=GGUF_MODES, default="exact",
                   help="GGUF quantized weights: 'exact' keeps llama.cpp's codes (default); "
                        "'native-q4' re-quantizes them to MLX 4-bit g64: smaller in memory, and lossy")


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with standard output closed (`>&-`): as if sent to /dev/null
        sys.stdout = open(os.devnull, "w")
    if sys.stdin is None:  # started with standard input closed (`<&-`): as if empty
        sys.stdin = open(os.devnull)
    stdout = sys.stdout
    sys.stdout = _Stdout(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout = stdout  # (a caller in this process, a test, gets its own back)


def _main(argv: list[str] | None) -> int:
    try:
        # (Inside the try: --help and --version write to standard output too.)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            if not sys.stdin.isatty():
                parser.print_help()
                return 0
            args = parser.parse_args(["chat"])  # bare `mlxserve` in a terminal: chat with the default model
        handler = {"run": cmd_run, "pull": cmd_pull, "models": cmd_models, "doctor": cmd_doctor,
                   "bench": cmd_bench, "serve": cmd_serve, "chat": cmd_chat}[args.command]
        if args.command in ("run", "bench", "serve", "chat"):
            # (These load MLX anyway. Inside the try: a Ctrl-C during these seconds of imports
            # is a Ctrl-C like any other, not a traceback.)
            from . import engine

            # A Ctrl-C while an engine finishes its step on the way out (a bench's first Ctrl-C
            # waits for it to report what was measured; chat waits for a cut answer's): quit now.
            engine.on_ctrl_c_while_stopping = lambda: _exit_at_once(130)
        status = handler(args)
        sys.stdout.flush()  # what is still buffered fails here, in one line, not at exit
        return status
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except CLIError as exc:
        return _fail(str(exc))
    except ImportError as exc:
        if "libmlx" in str(exc):  # Linux: the mlx wheel is there, no back-end library with it
            return _fail(_no_mlx_back_end(exc))
        raise
    except OSError as exc:  # e.g. standard output on a full disk (`>/dev/full`): one line
        if _stdout_broken():
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        if isinstance(exc, StdoutError):
            return _fail(f"cannot write to standard output: {exc.strerror}")
        return _fail(_one_line(str(exc)))
    except Exception as exc:  # known user-facing errors from the library
        from .loader import ModelLoadError
        from .registry import ModelNotFound, PullError
        from .tokenizer import TokenizerError

        if isinstance(exc, (ModelNotFound, ModelLoadError, PullError, TokenizerError, ValueError)):
            return _fail(_one_line(str(exc)) or type(exc).__name__)
        if isinstance(exc, RuntimeError) and str(exc).startswith(ENGINE_START_FAILED):
            return _fail(_one_line(str(exc)))  # e.g. a bench's engine (see _running_engine)
        raise


def _no_mlx_back_end(exc: ImportError) -> str:
    """What to do when mlx.core cannot load its library: install the back-end package of the
    mlx that is installed (mlxserve is not on PyPI: `pip install 'mlxserve[cpu]'` would fetch
    whatever an index has under that name), or mlxserve again with its extra."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pin = f"=={version('mlx')}"
    except PackageNotFoundError:
        pin = ""
    return (f"MLX has no back-end installed ({exc}): install exactly one, pip install 'mlx[cpu]{pin}' "
            f"(CPU) or 'mlx[cuda13]{pin}' (NVIDIA GPU), or install mlxserve again from its clone "
            f"with the extra cpu or cuda (pip install '.[cpu]')")


def _fail(message: str) -> int:
    print(f"mlxserve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(message: str) -> str:
    """A message on one line: one whose lines continue it (MLX lists parameter names one a
    line after "Missing 1 parameters:") keeps them, joined."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


ENGINE_START_FAILED = "engine failed to start"  # how engine.Engine.start's RuntimeError begins


@contextmanager
def _running_engine(loaded, config, exit_on_ctrl_c: bool = False):
    """A started engine, stopped on leaving; one that fails to start (no memory for the KV
    cache, an operation the device cannot run) is a CLIError, not a traceback. With
    exit_on_ctrl_c, a Ctrl-C anywhere while the engine runs ends the process at once (see
    _exit_at_once) instead of waiting, in Engine.stop, for the step in flight. That covers the
    whole block, not only where its caller reads events: a Ctrl-C that lands a moment earlier
    (Engine.submit returning) once left `run` waiting for ever for a step that never ended."""
    from .engine import Engine

    engine = Engine(loaded, config)
    try:
        try:
            engine.start()
        except RuntimeError as exc:
            engine.stop()
            raise CLIError(_one_line(str(exc))) from None
        yield engine
    except KeyboardInterrupt:
        if exit_on_ctrl_c:
            _exit_at_once(130)
        raise
    finally:
        engine.stop()


# ---- run ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .chat_render import plural
    from .sampling import SamplingParams

    if args.prompt is not None and args.prompt_arg is not None:
        raise CLIError("give the prompt once: as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_arg
    given = prompt is not None  # (else stdin's, or none)
    if not given and not sys.stdin.isatty():
        from .piped_input import read_piped_text

        prompt = read_piped_text(sys.stdin, "the prompt")  # (not stdin.read(): see piped_input)
    if not prompt:
        if given:
            raise CLIError("the prompt is empty: give some text to answer or continue")
        raise CLIError("no prompt: give one as an argument, with --prompt, or on stdin")
    if not prompt.strip():
        where = "" if given else " on stdin"
        raise CLIError(f"the prompt{where} is blank (only whitespace): give some text to answer or continue")
    check_max_tokens_flag(args.max_tokens)
    check_temperature_flag(args.temperature)
    params = SamplingParams(
        grammar=_format_grammar(args.format),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
    except ValueError as exc:  # "top_p: must be …", the API field's name: the flag's here
        field, _, reason = str(exc).partition(": ")
        flag = "--" + field.replace("_", "-")
        if not reason or field not in _RUN_SAMPLING_FLAGS:
            raise
        raise CLIError(f"{flag} {reason}" if reason.startswith("must ") else f"{flag}: {reason}") from None
    if args.system is not None and args.chat is False:  # before loading the model
        raise CLIError("--system needs the chat template: leave out --no-chat")
    if not args.think and args.chat is False:
        raise CLIError("--no-think needs the chat template: leave out --no-chat")
    config = engine_config(args)  # a bad --memory-budget fails before the model loads
    loaded = _load(args.model, args.dtype, args.gguf_mode)
    prompt_ids = _prompt_ids(loaded.tokenizer, prompt, args.chat, args.system, args.think,
                             constrained=params.grammar is not None)
    from .grammar import GrammarError
    from .scheduler import Request

    text_parts, token_ids, final = [], [], None
    with _running_engine(loaded, config, exit_on_ctrl_c=True) as engine:
        if params.grammar:
            try:
                engine.grammars.check(params.grammar)
            except GrammarError as exc:
                raise CLIError(f"--format: {exc}") from None
        stream = engine.submit(Request(prompt_ids, params))
        for event in _shown_while_prompt_is_read(stream, len(prompt_ids), lambda: engine.prompt_progress(stream.id)):
            token_ids.extend(event.token_ids)
            text_parts.append(event.text)
            if not args.json and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.finish_reason:
                final = event
        stats = engine.stats()
    if final.finish_reason == "error":
        raise CLIError(final.error or "generation failed")
    timings = {"ttft_s": _round(final.ttft_s), "decode_tok_s": _round(final.decode_tok_s)}
    if args.json:
        print(json.dumps({
            "model": loaded.name,
            "text": "".join(text_parts),
            "token_ids": token_ids,
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "finish_reason": final.finish_reason,
            "timings": timings,
            **({"speculative": {"drafted_tokens": stats["drafted_tokens"], "accepted_tokens": stats["accepted_tokens"]}}
               if args.speculative else {}),
        }))
    else:
        sys.stdout.write("\n")
        _status(
            f"{plural(final.prompt_tokens, 'prompt token')}, {final.completion_tokens:,} generated, "
            f"TTFT {_fmt(final.ttft_s, 's')}, {_fmt(final.decode_tok_s, ' tok/s')}, finish: {final.finish_reason}"
            + (f", drafts: {stats['accepted_tokens']:,} of {plural(stats['drafted_tokens'], 'token')} accepted"
               if args.speculative else "")
        )
    return 0


# SamplingParams' fields that `run` takes from flags of the same name (--top-p: top_p).
_RUN_SAMPLING_FLAGS = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                       "seed", "stop")


def check_max_tokens_flag(value: int | None) -> None:
    """--max-tokens of `run` and `chat`, refused in the same words, naming the flag (the
    server's messages name the API's field, max_tokens)."""
    if value is not None and value < 1:
        raise CLIError(f"--max-tokens must be a whole number >= 1, got {value}")


def check_temperature_flag(value: float | None) -> None:
    """--temperature of `run` and `chat` (see check_max_tokens_flag)."""
    if value is not None and not is_temperature(value):
        raise CLIError(f"--temperature must be a number from 0 to {MAX_TEMPERATURE} (0 = greedy), got {value:g}")


def check_api_key(key: str | None, source: str = "--api-key") -> None:
    """An API key (of `serve`, or the one `chat --url` sends, from `source`) that an HTTP header
    can carry as it is: clients send header values as ASCII (or Latin-1, or UTF-8: no two
    agree), and the server reads them without leading or trailing spaces, so a key with
    other characters was refused whatever was sent, or failed in the client in a codec's words."""
    if key is None:
        return
    odd = next((ch for ch in key if not " " <= ch <= "~"), None)
    if odd is not None:
        raise CLIError(f"{source} must be printable ASCII (it is sent in an HTTP header, "
                       f"'Authorization: Bearer KEY'), but holds {odd!r}")
    if key != key.strip():
        raise CLIError(f"{source} must not start or end with a space (an HTTP header's value is read without them)")


def check_cors_origin(origin: str) -> None:
    """A --cors value: "*", or an origin as a browser sends it (scheme://host[:port], nothing
    after it). The server compares origins as strings, so one written otherwise
    (`localhost:3000`, a trailing slash or a path) would be accepted and never match."""
    if origin == "*":
        return
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:  # not a port number (or past 65535)
        port = -1
    if not (parts.scheme and parts.hostname) or port == -1 or origin.partition("://")[2] != parts.netloc:
        raise CLIError(f"--cors: {origin!r} is not an origin: give it as a browser sends it, "
                       "scheme://host[:port] (e.g. http://localhost:3000), or * for any")
    # A browser writes the scheme and host in lower case and leaves a scheme's default port out.
    scheme, host = parts.scheme.lower(), parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    if origin != f"{scheme}://{netloc}":
        raise CLIError(f"--cors: a browser sends {origin!r} as '{scheme}://{netloc}', and origins are "
                       "compared as text: give that")


def _shown_while_prompt_is_read(stream, prompt_tokens: int, progress):
    """The stream's events; in a terminal a spinner says the prompt is being read until the
    first comes (a long prompt takes minutes on a CPU, and nothing else shows meanwhile), and
    how far, from `progress()` ((tokens read, prompt tokens), or None: the last figure stays),
    every quarter second."""
    from .chat_render import plural, reading_prompt

    console = output_console(stderr=True)
    events = iter(stream)
    if not console.is_terminal:
        yield from events
        return
    first_came = threading.Event()

    def show_progress(status) -> None:
        while not first_came.wait(PROGRESS_INTERVAL_S):
            read = progress()
            if read is not None:
                status.update(reading_prompt(*read).capitalize() + " …")

    with console.status(f"Reading the prompt ({plural(prompt_tokens, 'token')}) …", spinner="dots") as status:
        ticker = threading.Thread(target=show_progress, args=(status,), daemon=True)
        ticker.start()
        try:
            first = next(events)
        finally:
            first_came.set()
            ticker.join()
    yield first
    yield from events


def _stdout_broken() -> bool:
    """Whether standard output fails to take what it still holds."""
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def _exit_at_once(status: int) -> NoReturn:
    """A Ctrl-C that would otherwise wait for the engine's step in flight (in `run`, piped
    `chat`, leaving the chat window, `bench`'s second): end the process now, as main() does
    after a Ctrl-C (a newline on stderr, then the status), without that wait: on the CPU one
    prompt chunk of 512 tokens takes tens of seconds, and Engine.stop waits for it. Not a
    normal exit: Python's and MLX's teardown while the engine thread is still inside MLX
    aborts the process (see Engine.stop). os._exit ends every thread where it is; the step's
    work is thrown away with the process, and nothing of it was to be kept (no file is being
    written)."""
    for out in (sys.stdout, sys.stderr):
        try:
            out.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream
            pass
    try:
        print("", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    os._exit(status)


def _format_grammar(value: str | None) -> str | None:
    """`run --format`: 'json', a JSON schema's file, or the schema as JSON text -> a grammar."""
    if value is None:
        return None
    from .grammar import GrammarError, json_schema_grammar, read_schema

    try:
        return json_schema_grammar(read_schema(value))
    except GrammarError as exc:
        raise CLIError(f"--format: {exc}") from None


def _prompt_ids(tokenizer, prompt: str, chat: bool | None, system: str | None, think: bool = True,
                constrained: bool = False) -> list[int]:
    """`think` False: --no-think. `constrained` (--format): the answer starts as its grammar
    says, so the chat template is asked to leave thinking out as --no-think does."""
    if chat is None:
        chat = tokenizer.chat_template is not None
    if not chat:
        if system is not None:
            raise CLIError("--system needs a chat template, which this model has not")
        if not think:
            raise CLIError("--no-think needs a chat template, which this model has not")
        return tokenizer.encode(prompt, add_special_tokens=True)
    if tokenizer.chat_template is None:
        raise CLIError("this model has no chat template; use --no-chat")
    # An empty --system is an empty system message, so that the template adds no default of its own.
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    from .chat_backend import chat_prompt_ids

    return chat_prompt_ids(tokenizer, messages, think and not constrained)


def _load(spec: str, dtype_name: str | None, gguf_mode: str = "exact"):
    import mlx.core as mx

    from .loader import load_model, parse_dtype

    from rich.text import Text

    dtype = parse_dtype(dtype_name)
    console = output_console(stderr=True)
    # Text, not markup: a path may hold "[" ("models [old]/…" lost its "[old]", and "[/x]"
    # was rich's MarkupError, a traceback)
    with console.status(Text(f"Loading {spec} …"), spinner="dots") if console.is_terminal else nullcontext():
        loaded = load_model(spec, dtype=dtype, progress=True, gguf_mode=gguf_mode)
    _status(f"Loaded {loaded.name} ({loaded.format}, {loaded.quantization}) in {loaded.load_seconds:.1f}s")
    # Once loaded: a dtype the model refuses (bfloat16 for GGUF) is then one line, not this and the error.
    if dtype is not None and dtype in (mx.float16, mx.bfloat16) and mx.default_device() == mx.cpu:
        _status(f"warning: MLX's CPU back-end runs {dtype_name} matrix products far slower than float32 "
                "(float16 about 40 times, see loader.default_gguf_dtype): leave --dtype out, or use float32")
    return loaded


# ---- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .registry import served_names
    from .server import listen_socket, serve

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_running < 1:
        raise CLIError("--max-running must be >= 1")
    check_api_key(args.api_key)
    for origin in args.cors:
        check_cors_origin(origin)
    config = engine_config(args, max_running=args.max_running)
    try:
        sock = listen_socket(args.host, args.port)  # a taken port fails before the model loads
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    with sock:
        try:
            with _sigterm_raised():
                loaded = _load(args.model, args.dtype, args.gguf_mode)
        except _Terminated:
            # (A service manager stopping it, `docker stop`, while a large model loads: the
            # default action ended the process without a word in its log.)
            _status("mlxserve: stopped by SIGTERM while loading the model")
            _end_by(signal.SIGTERM)
        names = [args.served_model_name] if args.served_model_name else served_names(args.model)
        with _running_engine(loaded, config) as engine:
            serve(engine, names[0], sock, other_model_names=names[1:], api_key=args.api_key, cors_origins=args.cors)
            _stop_saying_so(engine)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread (see _sigterm_raised). A BaseException, as
    KeyboardInterrupt is: an `except Exception` on the way would take it for a failure of
    the code it interrupts (a model that cannot be read)."""


@contextmanager
def _sigterm_raised():
    """SIGTERM raises _Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt,
    for this block; the handler before it is put back after."""
    def terminated(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_by(signum: int) -> NoReturn:
    """End the process by `signum`'s default action, as the signal would have without a
    handler: its parent sees a process the signal stopped (a shell's status 143 for SIGTERM),
    which service managers count as a stop asked for; an exit with status 143 is a failure to
    systemd. Nothing of the load is to be kept, and the kernel closes the listening socket."""
    for out in (sys.stdout, sys.stderr):
        try:
            out.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # (delivered to this thread before it returns)
    os._exit(128 + signum)  # (not reached)


STOP_NOTICE_S = 1.0  # how long a stopping engine may take before the user is told what it waits for


def _stop_saying_so(engine) -> None:
    """Stop a server's engine once the server has stopped (its requests have had their 503):
    the engine finishes its step in flight first, on a CPU tens of seconds for a prompt chunk.
    Where that takes a while, say so; a further Ctrl-C quits without waiting (see Engine.stop)."""
    notice = threading.Timer(STOP_NOTICE_S, lambda: print(
        "mlxserve: stopping once the engine's step in flight ends (Ctrl-C again quits at once)",
        file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        engine.stop()
    finally:
        notice.cancel()


# ---- chat -----------------------------------------------------------------------------------
def _add_chat_parser(sub, default_model: str) -> None:
    chat = sub.add_parser(
        "chat", help="chat with a model in the terminal (what bare `mlxserve` starts)",
        description="A terminal chat with the engine in this process, or with an OpenAI-compatible "
                    "server (--url). Type /help inside for commands. With stdin not a terminal it "
                    "runs what was piped: a line that starts with a command (/temp 0, /quit) is that "
                    "command, the text between two commands one question; only the answers go to stdout.")
    _add_model_args(chat, default_model, default_said=f"{default_model}; with --url: the server's first model")
    # model None: the default model, or with --url the server's first one. gguf_mode None: exact
    # (see repl.open_backend), None so that `--gguf-mode exact` is told from no flag (CHAT_ENGINE_ONLY).
    chat.set_defaults(model=None, gguf_mode=None)
    chat.add_argument("--system", help="system prompt; '' for none at all: without the flag the chat template's "
                                       "default system prompt applies, if it has one (/system changes it)")
    chat.add_argument("--url", action=_NonEmpty, help="chat with this OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")
    chat.add_argument("--api-key", action=_NonEmpty, help="API key for --url (default $MLXSERVE_API_KEY)")
    chat.add_argument("--no-think", action="store_true", help="ask the model not to think, and hide any thinking")
    chat.add_argument("--temperature", type=float, default=None,
                      help=f"sampling temperature to start with, 0 to {MAX_TEMPERATURE} (default 0.7; 0 = greedy; "
                           "/temp changes it)")
    chat.add_argument("--max-tokens", type=int, default=None,
                      help="longest answer, in tokens, to start with (default: as many as the context leaves; "
                           "/max_tokens changes it)")
    chat.add_argument("--format", metavar="text|json|SCHEMA",
                      help="hold every answer to JSON: 'json' for any JSON object, or a JSON schema (a file, or the "
                           "schema itself as JSON text); 'text' (the default): free text; /format changes it; "
                           "under a format the model is asked not to think")
    _add_engine_args(chat)


# What the engine in this process is built with: with --url the server's engine runs the model.
# Each defaults to None in chat, which no value given on the command line is (see _flags_given).
CHAT_ENGINE_ONLY = ("dtype", "gguf_mode", "memory_budget", "speculative", "draft_model", "draft_tokens")


def cmd_chat(args: argparse.Namespace) -> int:
    from .repl import run_chat

    if args.url is not None:
        unused = _flags_given(args, CHAT_ENGINE_ONLY)
        if unused:
            raise CLIError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with --url: "
                           f"the server's engine runs the model (give {'it' if len(unused) == 1 else 'them'} "
                           f"to `mlxserve serve`)")
    elif args.api_key is not None:  # the mirror case: a key the engine in this process never uses
        raise CLIError("--api-key is the key sent to --url: give --url too")
    return run_chat(args)


def _flags_given(args: argparse.Namespace, dests) -> list[str]:
    """The flags (--DEST) among `dests` that the command line gave, whatever their value
    (`--gguf-mode exact` too), in the order of `dests`. Each must default to None."""
    return ["--" + dest.replace("_", "-") for dest in dests if getattr(args, dest) is not None]


# ---- pull / models / doctor -----------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    from . import registry

    if args.list:
        if args.model is not None:
            raise CLIError(f"--list lists every alias; it takes no model (got {args.model!r})")
        for alias in registry.ALIASES.values():
            size = f"{alias.size_bytes / 1e6:.0f} MB" if alias.size_bytes else ""
            print(f"{alias.name:<20} {alias.format:<5} {size:>7}  {alias.description}")
            print(f"{'':<36}from {registry.alias_source(alias)}")
        return 0
    model = registry.DEFAULT_MODEL if args.model is None else args.model
    path = registry.pull(model, progress=True) if model in registry.ALIASES else registry.resolve(model, progress=True)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import registry

    models = registry.list_local_models()
    if args.json:
        print(json.dumps([
            {"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes, "format": m.format,
             "quantization": m.quantization, "source": m.source}
            for m in models
        ], indent=2))
        return 0
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    console = output_console()
    if not models:
        console.print("No local models yet. Try: mlxserve pull")
        return 0
    table = Table("name", "format", "quantization", "size", "source", "path")
    for column in (table.columns[0], table.columns[-1]):
        column.overflow = "fold"  # names and paths wrap, never cut short: they are copied from here
    for m in models:  # (Text, not markup: a name or path may hold "[")
        table.add_row(*(Text(value) for value in (m.name, m.format, m.quantization, _megabytes(m.size_bytes),
                                                  m.source, str(m.path))))
    natural = Measurement.get(console, console.options.update_width(10**6), table).maximum
    if natural <= console.width or not console.is_terminal:  # (off a terminal: wide, see output_console)
        console.print(table)
        return 0
    # A terminal narrower than the table (a model's path alone is some 70 columns, an 80-column
    # terminal the common case): the table folded each name and path over several lines between
    # box characters, so neither could be copied, and cut the narrow columns short ("Q4_…").
    # Each model as lines of its own instead, every one whole: the terminal wraps a long one.
    for m in models:
        console.print(Text(m.name, style="bold"), soft_wrap=True)
        console.print(Text(f"    {m.format}, {m.quantization}, {_megabytes(m.size_bytes)}, from {m.source}",
                           style="dim"), soft_wrap=True)
        console.print(Text("    " + str(m.path)), soft_wrap=True)
    return 0


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:,.0f} MB"


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.collect()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        doctor.render(report, output_console())
    if not report["ok"]:
        failed = [c for c in report["checks"] if not c["ok"]]
        for check in failed:
            print(f"mlxserve doctor: {check['name']}: {check['detail']}", file=sys.stderr)
        return 1
    return 0


# ---- bench --------------------------------------------------------------------------------
def _add_bench_parser(sub, default_model: str) -> None:
    bench = sub.add_parser(
        "bench", help="benchmark the engine (optionally against mlx-lm on the same weights)",
        description="Closed-loop benchmark: at each concurrency C, C requests of random prompt ids are "
                    "in flight until --requests are done (greedy, EOS ignored, exactly --gen-tokens each). "
                    "Prints a table of medians over --runs and optionally writes every figure as JSON.")
    _add_model_args(bench, default_model)
    _add_engine_args(bench)
    bench.add_argument("--random-weights", metavar="SHAPE", action=_NonEmpty,
                       help="ignore --model: real shapes with random weights (qwen3-0.6b, qwen3-4b, qwen3.5-0.8b, qwen3.5-4b, tiny, tiny-256, tiny-qwen3.5; bfloat16 unless --dtype)")
    bench.add_argument("--quantize", type=int, metavar="BITS", help="with --random-weights: quantize to 4 or 8 bits (MLX affine, group 64)")
    bench.add_argument("--random-gguf", choices=["Q4_K_M"], metavar="MIX",
                       help="with --random-weights qwen3-0.6b, qwen3-4b, tiny or tiny-256: random GGUF blocks in llama.cpp's MIX "
                            "(Q4_K_M: Q4_K, Q6_K for the output and some attn_v/ffn_down), loaded as a .gguf file is, "
                            "per --gguf-mode")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    bench.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    bench.add_argument("--concurrency", default="1,8,32,64", help="comma-separated requests in flight, each up to 4,096 (default 1,8,32,64)")
    bench.add_argument("--requests", type=int, help="requests per concurrency C, up to 65,536 (default 2×C, at least 4)")
    bench.add_argument("--shared-prefix-tokens", type=int, default=0, help="leading prompt tokens identical across a run's requests (default 0)")
    bench.add_argument("--long-prompt-tokens", type=int, metavar="L",
                       help="also measure streams' inter-token latency while an L-token prompt is admitted")
    bench.add_argument("--long-prompt-streams", type=int, default=8, help="streams decoding in that scenario, up to 4,096 (default 8)")
    bench.add_argument("--chat-history-tokens", type=int, metavar="H",
                       help="also measure a chat's second-turn time to first token after H tokens of history, "
                            "with the prefix cache and without")
    bench.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    bench.add_argument("--runs", type=int, default=3, help="measured runs; figures are their medians (default 3)")
    bench.add_argument("--compare", choices=["mlx-lm"], help="run the same workload through mlx-lm and print speedups")
    bench.add_argument("--json", metavar="FILE", action=_NonEmpty, help="write every figure and the configuration to FILE")
    bench.add_argument("--seed", type=int, default=0, help="seed of the prompts and random weights (default 0)")
    bench.add_argument("--max-batch-tokens", type=int, help="prefill tokens of a step in which no row decodes; decoding rows add one each (default: the engine's, 2048 on a GPU, 512 on the CPU)")
    bench.add_argument("--mixed-batch-tokens", type=int, help="prefill tokens of a step beside up to 32 decoding rows (at most --max-batch-tokens), growing in proportion beyond (default: the engine's)")
    bench.add_argument("--block-size", type=int, help="KV block size in tokens (default: the engine's)")


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


# ---- helpers ------------------------------------------------------------------------------
def engine_config(args: argparse.Namespace, **overrides):
    """EngineConfig from the flags a command has (--memory-budget), plus overrides."""
    from .engine import EngineConfig
    from .memory import parse_size

    budget = getattr(args, "memory_budget", None)
    if budget is not None:
        overrides["memory_budget_bytes"] = parse_size(budget)
        _warn_if_beyond_memory(budget, overrides["memory_budget_bytes"])
    if getattr(args, "speculative", None):
        overrides["speculative"] = args.speculative
    draft_model = getattr(args, "draft_model", None)
    if draft_model is not None and getattr(args, "speculative", None) != "dflash":
        raise CLIError("--draft-model needs --speculative dflash")
    if getattr(args, "speculative", None) == "dflash":
        if not draft_model:
            raise CLIError("--speculative dflash needs --draft-model: a DFlash draft trained for this model "
                           "(e.g. z-lab/Qwen3-4B-DFlash-b16 for Qwen3-4B)")
        overrides["draft_model"] = draft_model
    draft_tokens = getattr(args, "draft_tokens", None)
    if draft_tokens is not None:
        if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise CLIError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got {draft_tokens}")
        if not getattr(args, "speculative", None):
            raise CLIError("--draft-tokens needs --speculative")
        overrides["draft_tokens"] = draft_tokens
    return EngineConfig(**overrides)


def _warn_if_beyond_memory(flag: str, budget: int) -> None:
    """A --memory-budget beyond the device's memory limits nothing: memory runs out before the
    KV cache reaches it (an allocation failure, or the machine swapping), and the budget's own
    "raise --memory-budget" never comes. A warning, as for --dtype float16 on the CPU, not an
    error: the budget is a ceiling, not memory taken at start, and one given on purpose as
    "no limit" still works."""
    from rich.filesize import decimal as human_size

    from .memory import device_memory_bytes

    total = device_memory_bytes()
    if total is not None and budget > total:
        _status(f"warning: --memory-budget {flag} is more than this machine's {human_size(total)} of device "
                "memory: memory runs out before the KV cache reaches it")


PIPED_TABLE_WIDTH = 220  # a table's width off a terminal (rows of paths and names stay whole)


def output_console(stderr: bool = False):
    """A rich console on stdout (or stderr). Off a terminal (a pipe, a log file) rich knows no
    width and takes 80 columns, cutting every longer line in two; there it wraps no text (a
    line said stays one line, for grep and for whatever shows it later, which wraps it to its
    own width), and a table gets PIPED_TABLE_WIDTH columns to keep its rows whole; the spaces
    rich pads lines with to that width (Markdown, tables) are dropped. Strings are never read
    as rich markup: nothing here writes any, and the text shown (a model's name or path, a
    server's stat names, a usage "[on|off]") may hold "[", which markup dropped as a style or,
    as "[/x]", failed on with a MarkupError traceback. (A spinner's text is read as markup
    whatever the console says: give it a Text.)"""
    Console = _console_class()
    no_color = bool(os.environ.get("NO_COLOR"))
    console = Console(stderr=stderr, no_color=no_color, markup=False)
    if console.is_terminal:
        return console
    return Console(file=_PaddingDropped(stderr), no_color=no_color, width=max(console.width, PIPED_TABLE_WIDTH),
                   soft_wrap=True, markup=False)


@functools.cache
def _console_class():
    """rich's Console, whose reader going away (`mlxserve doctor | head -1`) is the
    BrokenPipeError that main() ends quietly, with status 0, as for what print() writes:
    rich's own on_broken_pipe exits with status 1, which for `doctor` says the machine is
    broken."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more is written to it (a spinner's last line on the way out)
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return _Console


class _PaddingDropped:
    """Standard output or error (looked up at each write, as tests replace them) without the
    spaces that end a line: rich fills each line of a Markdown block or a table to the
    console's width, some 200 spaces a line off a terminal."""

    def __init__(self, stderr: bool):
        self._stderr = stderr

    @property
    def _stream(self):
        return sys.stderr if self._stderr else sys.stdout

    def write(self, text: str) -> int:
        return self._stream.write(_LINE_PADDING.sub("\n", text))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


_LINE_PADDING = re.compile(r"[ \t]+\n")


def _status(message: str) -> None:
    print(message, file=sys.stderr)


def _round(x):
    return None if x is None else round(x, 4)


def _fmt(x, unit: str) -> str:
    return "n/a" if x is None else f"{x:.2f}{unit}"


if __name__ == "__main__":
    sys.exit(main())
