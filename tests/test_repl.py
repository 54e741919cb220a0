"""`mlxserve chat`, driven for real in a pseudo-terminal (80x24, NO_COLOR) on a tiny model.

Two REPL processes serve the whole module, to keep it fast: `chat` (the engine in-process)
for most tests, then `url_chat` (`--url` against a live server), which starts after `chat`
has quit with Ctrl-D so that it can check that the input history survived the restart.
Every wait is on something the REPL prints: prompt_toolkit switches bracketed paste on
(ESC [?2004h) each time it shows a new prompt, which marks "ready for input".
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pexpect
import pytest
from live_server import SCRIPT, LiveServer, ScriptedEngine, free_port

from mlxserve.chat_backend import HTTPBackend, chat_prompt_ids, normalize_base_url
from mlxserve.chat_render import AnswerView, format_stats, printable
from mlxserve.chat_session import Settings
from mlxserve.engine import Engine
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.server import create_app

READY = "\x1b[?2004h"
API_KEY = "test-key"
# Long enough that a conversation's first prompt fills a 64-token prefix-cache block.
SYSTEM = "You are a careful assistant. Answer in full sentences and explain every step. " * 3
# Counts are written with thousands separators (figure() reads one).
STATS = re.compile(r"prompt\s+([\d,]+)\s+\(([\d,]+)\s+cached\)\s+·\s+TTFT\s+[\d.]+s\s+·\s+"
                   r"(?:[\d.]+\s+tok/s\s+·\s+)?([\d,]+)\s+generated(?:\s+\((max|cut)\))?")
URL_STATS = re.compile(r"(?:TTFT\s+[\d.]+s\s+·\s+)?(?:[\d.]+\s+tok/s\s+·\s+)?([\d,]+)\s+generated\s+\(cut\)")
ECHO = re.compile(r">>>|\.\.\. ")  # the prompt and its continuation, with what was typed
SPINNER = re.compile(r"\s*[\u2800-\u28ff]")  # rich's "dots" spinner frames are braille characters
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>]|\r")
COLOUR_PARAMS = {*range(30, 39), *range(40, 49), *range(90, 98), *range(100, 108)}
CANDIDATE_QUESTIONS = ["What is the capital of France?", "Tell me a long story.", "Count to one hundred.",
                       "Explain Rayleigh scattering.", "Write a poem about numbers."]


def figure(text: str) -> int:
    """A count of the figures line, e.g. 1,024."""
    return int(text.replace(",", ""))


def plain(text: str) -> str:
    return ESCAPES.sub("", text)


class Chat:
    """One `mlxserve chat` process in a pseudo-terminal."""

    def __init__(self, *args: str, home: Path, sigint_ignored: bool = False,
                 program: tuple[str, ...] = ("-m", "mlxserve"), env: dict | None = None):
        env = {**os.environ, "NO_COLOR": "1", "MLXSERVE_HOME": str(home), "TERM": "xterm-256color",
               "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "80", "LINES": "24", **(env or {})}
        env.pop("FORCE_COLOR", None)
        # sigint_ignored: started as by a parent that ignores SIGINT (children inherit that)
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.child = pexpect.spawn(sys.executable, [*program, "chat", *args], env=env,
                                   dimensions=(24, 80), encoding="utf-8", timeout=90, preexec_fn=ignore)
        self.transcript = io.StringIO()
        self.child.logfile_read = self.transcript
        self.last_line = None
        self.banner = self.ready()

    def ready(self) -> str:
        """Wait for the next prompt; return what was printed since the last one, as text."""
        self.child.expect_exact(READY)
        return plain(self.child.before)

    def run(self, line: str, raw: bool = False) -> str:
        """Type a line and Enter; return the output: its non-blank lines, without the echoed
        line and without spinner lines (transient: the terminal erases them)."""
        self.child.send(line + "\r")
        self.last_line = line or self.last_line
        out = self.ready()
        if raw:
            return out
        return "\n".join(x for x in out.splitlines() if x.strip() and not SPINNER.match(x) and not ECHO.match(x))

    def ask(self, question: str) -> re.Match:
        out = self.run(question)
        match = STATS.search(out)
        assert match, out
        return match

    def save(self, path: Path) -> dict:
        assert "Saved" in self.run(f"/save {path}")
        return json.loads(path.read_text())

    def interrupt_answer(self, question: str) -> str:
        """Ask, wait until the answer is streaming, press Ctrl-C; return the output."""
        self.child.send(question + "\r")
        self.child.expect(r"[1-9][\d,]* tokens? · Ctrl-C stops")
        self.child.sendintr()
        return self.ready()

    def quit_with_ctrl_d(self) -> int:
        if self.child.isalive():
            self.child.sendcontrol("d")
            self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def one_error_line(out: str, needle: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen3", "float32"))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlxserve-home")


@pytest.fixture(scope="module")
def served(tiny):
    """A live server on the tiny model (named "tiny", with an API key), and its engine."""
    loaded = load_model(tiny, progress=False)
    with Engine(loaded) as engine:
        server = LiveServer(create_app(engine, "tiny", api_key=API_KEY))
        yield server, engine
        server.stop()


@pytest.fixture(scope="module")
def long_question(served) -> str:
    """A question whose greedy answer does not end on its own for hundreds of tokens (the
    tiny model's weights are random), so that Ctrl-C surely lands mid-answer."""
    _, engine = served
    for question in CANDIDATE_QUESTIONS:
        ids = chat_prompt_ids(engine.tokenizer, [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": question}], think=True)
        final = engine.generate(ids, SamplingParams(max_tokens=600, temperature=0.0))[-1]
        if final.finish_reason == "length":
            return question
    raise AssertionError("no candidate question makes the tiny model talk for 600 tokens")


@pytest.fixture(scope="module")
def chat(tiny, home):
    chat = Chat("--model", tiny, "--system", SYSTEM, home=home)
    yield chat
    if chat.child.isalive():
        chat.child.terminate(force=True)


@pytest.fixture(scope="module")
def url_chat(chat, served, home):
    """Starts once `chat` has left (Ctrl-D), with the same history folder."""
    chat.exit_status = chat.quit_with_ctrl_d()
    server, _ = served
    # Started with SIGINT ignored: Ctrl-C must work all the same (test_url_mode_ctrl_c_then_quit).
    url_chat = Chat("--url", server.url, "--api-key", API_KEY, "--system", SYSTEM, "--no-think", home=home,
                    sigint_ignored=True)
    yield url_chat
    if url_chat.child.isalive():
        url_chat.child.terminate(force=True)


class TypedPrompt:
    """Stands in for the prompt_toolkit session: each prompt() returns the next of `lines`,
    then EOFError, as Ctrl-D."""

    def __init__(self, lines):
        self._lines = iter(lines)

    def prompt(self, _):
        line = next(self._lines, None)
        if line is None:
            raise EOFError
        return line


# ---- in-process engine ----------------------------------------------------------------------------

def test_banner_names_the_model(chat, tiny):
    assert f"mlxserve chat · {Path(tiny).name} (safetensors" in chat.banner
    assert "/help" in chat.banner


def test_second_turn_reuses_the_prefix_cache(chat):
    chat.run("/reset")
    chat.run("/temp 0")
    chat.run("/max_tokens 24")
    first = chat.ask("Hello there, how are you?")
    second = chat.ask("And what is the capital of France?")
    first_prompt, second_prompt, cached = figure(first[1]), figure(second[1]), figure(second[2])
    assert first_prompt >= 64
    assert second_prompt > first_prompt + 24  # the first turn is part of the second prompt
    # All of the first prompt at least, to the token: its whole blocks, then the kept slot's
    # tokens past them (the first answer's too, as far as its text tokenizes back the same).
    assert first_prompt <= cached < second_prompt


def test_ctrl_c_cuts_the_answer_and_the_chat_goes_on(chat, long_question, tmp_path):
    chat.run("/reset")
    chat.run("/temp 0")
    chat.run("/max_tokens auto")
    out = chat.interrupt_answer(long_question)
    match = STATS.search(out)
    assert match and match[4] == "cut", out
    assert figure(match[3]) < 600  # stopped long before the answer would have ended
    chat.run("/max_tokens 8")
    after = chat.ask("Thanks. Now a short one?")
    assert after[4] != "cut" and figure(after[2]) > 0  # the cut turn is still in the prefix cache
    saved = chat.save(tmp_path / "cut.json")
    roles = [(m["role"], m.get("cut", False)) for m in saved["messages"]]
    assert roles == [("user", False), ("assistant", True), ("user", False), ("assistant", False)]
    assert saved["messages"][0]["content"] == long_question


def test_ctrl_c_gives_the_prompt_back_while_the_engine_finishes_its_step(tiny, long_question, tmp_path):
    """Ctrl-C waited for the engine's step to end before the prompt came back: some 40 s for
    a 512-token prompt chunk on the CPU back-end. Here a step blocks until the test lets it
    go, so the prompt, the cut answer's line and the next question's wait all come while the
    step is still under way; the next answer comes once it has ended."""
    from test_cli import BLOCKING_STEP

    release = tmp_path / "release"
    os.mkfifo(release)
    chat = Chat("--model", tiny, "--system", SYSTEM, home=tmp_path, program=("-c", BLOCKING_STEP),
                env={"BLOCK_STEP": "12", "RELEASE_FIFO": str(release)})
    try:
        chat.run("/temp 0")
        chat.child.send(long_question + "\r")
        chat.child.expect_exact("[step blocked]")
        chat.child.sendintr()
        out = chat.ready()  # the prompt is back: the step has not ended (it cannot yet)
        assert "[step released]" not in out
        assert re.search(r"\d+ generated \(cut\)", out), out
        chat.run("/max_tokens 8")
        chat.child.send("Thanks. Now a short one?\r")
        chat.child.expect_exact("Stopping the previous answer")  # the next question waits, and says why
        assert "[step released]" not in chat.child.before
        release.write_text("x")  # the step ends; the cut request goes, then the question is answered
        out = chat.ready()
        assert out.index("[step released]") < STATS.search(out).start(), out
        saved = chat.save(tmp_path / "cut.json")
        roles = [(m["role"], m.get("cut", False)) for m in saved["messages"]]
        assert roles == [("user", False), ("assistant", True), ("user", False), ("assistant", False)]
        assert chat.quit_with_ctrl_d() == 0
    finally:
        if chat.child.isalive():
            chat.child.terminate(force=True)


def test_a_ctrl_c_while_leaving_quits_without_waiting_for_the_engine_step(tiny, long_question, tmp_path):
    """Ctrl-D after a cut answer waits for the engine's step (it says so); a Ctrl-C there
    quits at once, with Ctrl-C's status. The step here never ends."""
    from test_cli import BLOCKING_STEP

    chat = Chat("--model", tiny, home=tmp_path, program=("-c", BLOCKING_STEP), env={"BLOCK_STEP": "12"})
    try:
        chat.run("/temp 0")
        chat.child.send(long_question + "\r")
        chat.child.expect_exact("[step blocked]")
        chat.child.sendintr()
        chat.ready()
        chat.child.sendcontrol("d")
        chat.child.expect_exact("Stopping the previous answer")
        chat.child.sendintr()
        chat.child.expect(pexpect.EOF, timeout=60)
        chat.child.close()
        assert chat.child.exitstatus == 130
    finally:
        if chat.child.isalive():
            chat.child.terminate(force=True)


def test_ctrl_c_at_the_prompt_clears_the_line(chat, tmp_path):
    chat.run("/reset")
    chat.child.send("half a question")
    chat.child.expect_exact("half a question")
    chat.child.sendintr()
    chat.ready()
    shown = chat.run("/system")  # the line was empty again: this is a command, not "half a question/system"
    assert " ".join(shown.split()) == " ".join(f"System prompt: {SYSTEM}".split())
    assert chat.save(tmp_path / "empty.json")["messages"] == []


def test_help_lists_every_command(chat):
    out = chat.run("/help")
    for name in ("/help", "/reset", "/clear", "/system", "/temp", "/top_p", "/max_tokens", "/think", "/retry",
                 "/model", "/models", "/stats", "/save", "/load", "/export", "/quit", "/exit"):
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", out), name
    assert "Esc-Enter" in out and "Ctrl-D" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "/think [on|off]" in out and "/max_tokens [N|auto]" in out  # arguments are not taken for markup


def test_tab_completes_commands(chat):
    chat.child.send("/he\t")
    chat.child.expect_exact("/help")
    assert "/max_tokens" in chat.run("")


@pytest.mark.parametrize("line,answer", [
    ("/temp 0.5", "temperature: 0.5"),
    ("/temp", "temperature: 0.5"),
    ("/top_p 0.9", "top_p: 0.9"),
    ("/max_tokens 16", "max_tokens: 16"),
    ("/max_tokens auto", "max_tokens: auto"),
    ("/think off", "thinking: off"),
    ("/think on", "thinking: on"),
    ("/system Be brief.", "System prompt set."),
    ("/system", "System prompt: Be brief."),
    ("/system none", "System prompt: none, not even the chat template's default."),
    ("/system", "System prompt: none, not even the chat template's default."),
    ("/system default", "System prompt: the chat template's default, if any (/system TEXT sets one)."),
    ("/reset", "New conversation."),
    ("/clear", "New conversation."),
    ("/format json", "answers: json (any JSON object)"),
    ("/format", "answers: json (any JSON object)"),
    ("/format text", "answers: text"),
])
def test_settings_commands(chat, line, answer):
    assert chat.run(line).startswith(answer)


@pytest.mark.parametrize("line,needle", [
    ("/temp warm", "usage: /temp X"),
    ("/temp -1", "usage: /temp X"),
    ("/top_p 0", "usage: /top_p X"),
    ("/top_p 1.5", "usage: /top_p X"),
    ("/max_tokens 0", "usage: /max_tokens N"),
    ("/max_tokens lots", "usage: /max_tokens N"),
    ("/think maybe", "usage: /think on|off"),
    ("/save", "usage: /save FILE"),
    ("/load", "usage: /load FILE"),
    ("/export", "usage: /export FILE.md"),
    ("/load /no/such/chat.json", "cannot read /no/such/chat.json"),
    ("/save /dev/full", "cannot write /dev/full: No space left on device"),
    ("/export /dev/full", "cannot write /dev/full: No space left on device"),
    ("/model /no/such/model", "cannot switch to /no/such/model"),
    ("/frobnicate", "unknown command /frobnicate; /help lists them"),
    ("/reset everything", "usage: /reset (nothing after it)"),  # (it reset, the words unseen)
    ("/clear all", "usage: /clear (nothing after it)"),
    ("/stats now", "usage: /stats (nothing after it)"),
    ("/format /no/such/schema.json", "/format: cannot read the schema file /no/such/schema.json"),
    ('/format {"type": "foo"}', "/format: the grammar cannot be used: Invalid type: foo"),  # the engine's check
])
def test_bad_commands_get_one_line_of_help(chat, line, needle):
    one_error_line(chat.run(line), needle)


def test_load_checks_a_saved_format(chat, tmp_path):
    """A saved schema the engine cannot use is refused by /load as by /format: nothing changes."""
    path = tmp_path / "bad-format.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                "settings": {"schema": {"type": "nonsense"}}}))
    chat.run("/format text")
    one_error_line(chat.run(f"/load {path}"), "the grammar cannot be used: Invalid type: nonsense")
    assert chat.run("/format").startswith("answers: text")


def test_retry_with_nothing_to_retry(chat):
    chat.run("/reset")
    one_error_line(chat.run("/retry"), "nothing to retry")


def test_retry_replaces_the_last_answer(chat, tmp_path):
    chat.run("/reset")
    chat.run("/temp 1")
    chat.run("/max_tokens 8")
    chat.ask("Pick a random word.")
    retried = STATS.search(chat.run("/retry"))
    assert retried, "no answer after /retry"
    messages = chat.save(tmp_path / "retry.json")["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Pick a random word."


def test_model_stats_and_models(chat, tiny, tiny_model_dir):
    assert chat.run("/model").startswith(f"Model: {Path(tiny).name}")
    assert re.search(r"^\s*\*\s+" + re.escape(tiny), chat.run("/models"), re.MULTILINE)
    chat.run("/max_tokens 2")
    chat.ask("Count this prompt.")  # (run alone, the engine has prefilled nothing yet)
    stats = chat.run("/stats")
    assert re.search(r"prefill_tokens\s+[1-9]", stats) and "kv_bytes_budget" in stats
    other = str(tiny_model_dir("llama", "float32"))
    assert chat.run(f"/model {other}").startswith(f"Loaded {Path(other).name} (safetensors, float32")
    assert re.search(r"^\s*\*\s+" + re.escape(other), chat.run("/models"), re.MULTILINE)
    chat.run("/max_tokens 4")
    chat.ask("Does the new model answer?")
    assert chat.run(f"/model {tiny}").startswith("Loaded")


def test_a_pasted_code_block_keeps_its_first_line_indented(chat, tmp_path):
    """The first line's indentation was stripped with the blank lines around the message."""
    chat.run("/reset")
    chat.run("/max_tokens 1")
    chat.child.send("\x1b[200~\n    def f(self):\n        return 1\n\x1b[201~")
    chat.ask("")
    saved = chat.save(tmp_path / "code.json")
    assert saved["messages"][0]["content"] == "    def f(self):\n        return 1"


def test_save_load_and_export_restore_the_conversation(chat, tmp_path):
    chat.run("/reset")
    chat.run(f"/system {SYSTEM}")
    chat.run("/temp 0")
    chat.run("/max_tokens 12")
    chat.child.send("First line\x1b\rsecond line")  # Esc-Enter: a new line, not a send
    chat.ask("")
    chat.child.send("\x1b[200~pasted one\npasted two\x1b[201~")  # a bracketed paste of two lines
    last = chat.ask("")
    saved = chat.save(tmp_path / "saved.json")
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == [
        "First line\nsecond line", "pasted one\npasted two"]
    assert "Wrote" in chat.run(f"/export {tmp_path / 'before.md'}")

    chat.run("/reset")
    chat.run("/system none")
    chat.run(f"/export {tmp_path / 'empty.md'}")
    assert "## You" not in (tmp_path / "empty.md").read_text()

    out = chat.run(f"/load {tmp_path / 'saved.json'}", raw=True)
    assert "Loaded 4 messages, 2 questions" in out
    assert ">>> First line\n... second line" in out and ">>> pasted one\n... pasted two" in out  # shown again
    chat.run(f"/export {tmp_path / 'after.md'}")
    assert (tmp_path / "after.md").read_text() == (tmp_path / "before.md").read_text()
    follow_up = chat.ask("One more question?")
    assert figure(follow_up[1]) > figure(last[1])  # the loaded turns are in the prompt
    assert figure(follow_up[2]) >= 64  # and they are still in the prefix cache


def test_file_names_may_be_quoted_or_have_escaped_spaces(chat, tmp_path):
    """/save "my chat.json" wrote a file whose name held the quotes; a Mac's Terminal pastes a
    dragged file as my\\ chat.json. Both name my chat.json now, and so does the name unquoted."""
    folder = tmp_path / "two words"
    folder.mkdir()
    assert "Saved" in chat.run(f'/save "{folder}/my chat.json"')
    assert sorted(p.name for p in folder.iterdir()) == ["my chat.json"]
    assert "Loaded" in chat.run("/load " + str(folder / "my chat.json").replace(" ", "\\ "))
    assert "Loaded" in chat.run(f"/load {folder}/my chat.json")
    assert "Wrote" in chat.run(f"/export '{folder}/it''s.md'")  # (quotes as a shell joins them)
    assert sorted(p.name for p in folder.iterdir()) == ["its.md", "my chat.json"]
    # A short last line: test_ctrl_d_exits_and_history_survives_a_restart recalls the last one
    # typed, and a line wider than the terminal comes back wrapped.
    chat.run("/temp")


def test_an_unbalanced_quote_is_part_of_the_name():
    from mlxserve.repl import _path_arg

    assert _path_arg('"half.json', "usage") == '"half.json'
    assert _path_arg("plain name.json", "usage") == "plain name.json"
    assert _path_arg("a\\b.json", "usage") == "a\\b.json"  # a backslash without a space stays


def test_no_colour_under_no_color(chat):
    codes = re.findall(r"\x1b\[([0-9;]*)m", chat.transcript.getvalue())
    assert codes  # styles (bold, dim) are still used
    coloured = {c for c in codes if any(p.isdigit() and int(p) in COLOUR_PARAMS for p in c.split(";"))}
    assert not coloured


# ---- --url, after a restart ---------------------------------------------------------------------------
def test_ctrl_d_exits_and_history_survives_a_restart(chat, url_chat, home):
    assert chat.exit_status == 0
    assert chat.last_line in (home / "history").read_text()
    url_chat.child.send("\x1b[A")  # Up: the last line typed in the previous session
    url_chat.child.expect_exact(chat.last_line)
    url_chat.child.sendintr()
    url_chat.ready()


def test_url_mode_two_turns_reuse_the_server_cache(url_chat, served):
    server, _ = served
    assert f"mlxserve chat · tiny at {server.url}" in url_chat.banner
    url_chat.run("/temp 0")
    url_chat.run("/max_tokens 16")
    first = url_chat.ask("Hello there, how are you?")
    second = url_chat.ask("And what is the capital of France?")
    assert figure(second[1]) > figure(first[1]) and figure(second[2]) >= 64


def test_url_mode_commands(url_chat, tmp_path):
    assert url_chat.run("/think").startswith("thinking: off")  # --no-think
    assert url_chat.save(tmp_path / "url.json")["settings"]["think"] is False
    assert re.search(r"^\s*\*\s+tiny\s+2,048 context", url_chat.run("/models"), re.MULTILINE)
    assert re.search(r"prefill_tokens\s+[1-9]", url_chat.run("/stats"))
    assert "does not list it" in url_chat.run("/model other-model")
    one_error_line(url_chat.run("Is anyone there?"), "model 'other-model' does not exist")
    assert url_chat.run("/model tiny").startswith("Now asking")
    # A schema that cannot be used is refused here too, and the format before it stays.
    assert url_chat.run("/format json").startswith("answers: json")
    one_error_line(url_chat.run('/format {"type": "foo"}'), "/format: the grammar cannot be used: Invalid type: foo")
    assert url_chat.run("/format").startswith("answers: json")
    assert url_chat.run("/format TEXT").startswith("answers: text")


def test_url_mode_ctrl_c_then_quit(url_chat, long_question):
    url_chat.run("/reset")
    url_chat.run("/temp 0")
    url_chat.run("/max_tokens 1500")
    out = url_chat.interrupt_answer(long_question)
    assert URL_STATS.search(out), out
    url_chat.run("/max_tokens 4")
    assert url_chat.ask("Still there?")
    url_chat.child.send("/quit\r")
    url_chat.child.expect(pexpect.EOF)
    url_chat.child.close()
    assert url_chat.child.exitstatus == 0


# ---- pipes and errors ---------------------------------------------------------------------------------
def mlxserve(*args, stdin: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxserve", *args], check=False, input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_a_history_that_cannot_be_kept_is_said_once_and_the_chat_goes_on(tmp_path, monkeypatch):
    from prompt_toolkit.history import InMemoryHistory

    from mlxserve.repl import _prompt_session

    (tmp_path / "history").mkdir()  # a folder where the file would be
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    errors = []
    session = _prompt_session(types.SimpleNamespace(error=errors.append, screen=None))
    assert isinstance(session.history, InMemoryHistory)
    assert len(errors) == 1 and errors[0].startswith("history not kept: ") and "Is a directory" in errors[0]


def test_a_history_folder_that_is_a_file_is_said_to_be_no_folder(tmp_path, monkeypatch):
    """MLXSERVE_HOME naming a file: said so, where mkdir's words were "[Errno 17] File exists"."""
    from prompt_toolkit.history import InMemoryHistory

    from mlxserve.repl import _prompt_session

    (tmp_path / "home").write_text("")
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path / "home"))
    errors = []
    session = _prompt_session(types.SimpleNamespace(error=errors.append, screen=None))
    assert isinstance(session.history, InMemoryHistory)
    assert errors == [f"history not kept: {tmp_path / 'home'} is not a folder"]


def test_piped_question_prints_only_the_answer(tiny, tmp_path):
    # Greedy: a sampled answer of a random model may be all unfinished <think> (no answer text).
    r = mlxserve("chat", "--model", tiny, "--temperature", "0", stdin="What is the capital of France?\n",
                 env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "mlxserve chat" not in r.stdout and "generated" not in r.stdout and ">>>" not in r.stdout
    assert STATS.search(r.stderr), r.stderr  # the figures go to stderr
    assert not (tmp_path / "history").exists()  # nothing typed, nothing kept


def test_piped_answers_stop_at_max_tokens_in_process_and_over_http(tiny, served, tmp_path):
    """`chat --max-tokens N` bounds a piped answer (as a piped `/max_tokens N` line does), with
    the engine in this process and with --url; a bad value is one line."""
    server, _ = served
    for where in (("--model", tiny), ("--url", server.url, "--api-key", API_KEY)):
        answers = []
        for n in (2, 10):
            r = mlxserve("chat", *where, "--no-think", "--temperature", "0", "--max-tokens", str(n),
                         stdin="Tell me a long story.\n", env={"MLXSERVE_HOME": str(tmp_path)})
            assert r.returncode == 0, r.stderr
            generated = (STATS if where[0] == "--model" else re.compile(r"([\d,]+)\s+generated")).search(r.stderr)
            assert generated and figure(generated.groups()[-2 if where[0] == "--model" else 0]) == n, r.stderr
            answers.append(r.stdout.rstrip("\n"))
        assert answers[1].startswith(answers[0]) and len(answers[1]) > len(answers[0]), answers
    r = mlxserve("chat", "--model", tiny, "--max-tokens", "0", stdin="hi", env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stderr == "mlxserve: error: --max-tokens must be a whole number >= 1, got 0\n"


PET = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 30}},
       "required": ["name", "age"], "additionalProperties": False}


def test_piped_answers_follow_format_in_process_and_over_http(tiny, served, tmp_path):
    """`chat --format SCHEMA`: the answer is JSON under it, with the engine in this process and
    with --url (sent as response_format); a schema the engine cannot use is one line, exit 2."""
    server, _ = served
    path = tmp_path / "pet.json"
    path.write_text(json.dumps(PET))
    for where in (("--model", tiny), ("--url", server.url, "--api-key", API_KEY)):
        r = mlxserve("chat", *where, "--format", str(path), "--temperature", "1", stdin="Describe a pet.\n",
                     env={"MLXSERVE_HOME": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        pet = json.loads(r.stdout)
        assert set(pet) == {"name", "age"} and len(pet["name"]) <= 8 and 0 <= pet["age"] <= 30, r.stdout
    r = mlxserve("chat", "--model", tiny, "--format", '{"type": "foo"}', stdin="hi", env={"MLXSERVE_HOME": str(tmp_path)})
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0] == "mlxserve: error: --format: the grammar cannot be used: Invalid type: foo", r.stderr


def test_piped_commands_run_and_quit_ends_the_session(tiny, tmp_path):
    """The same as a process: a piped /quit is not a question, and the first failed command
    is one line, exit status 2."""
    r = mlxserve("chat", "--model", tiny, stdin="/temp 0\nWhat is the capital of France?\n/quit\nTell me a story.\n",
                 env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert len(STATS.findall(r.stderr)) == 1 and "temperature: 0" in r.stderr, r.stderr  # one answer
    assert r.stdout.strip() and "temperature" not in r.stdout
    r = mlxserve("chat", "--model", tiny, stdin="/exit\n", env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout == "" and not STATS.search(r.stderr), r.stderr
    r = mlxserve("chat", "--model", tiny, stdin="/max_tokens lots\nHi\n", env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == "" and not STATS.search(r.stderr), r.stderr
    assert r.stderr.splitlines()[-1] == "mlxserve: error: usage: /max_tokens N (a whole number >= 1, or auto)", r.stderr


def test_piped_answer_whose_reader_goes_away_is_no_error(tiny, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "mlxserve", "chat", "--model", tiny, "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MLXSERVE_HOME=str(tmp_path)))
    proc.stdout.close()  # like `| head -0`: the first text written meets a closed pipe
    _, err = proc.communicate("Tell me a long story.\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_piped_chat_whose_stderr_reader_goes_away_is_no_error(tiny, tmp_path):
    """What commands say goes to stderr; its reader gone (`2>&1 >answers.txt | head -1`) ends
    the chat quietly, status 0, as stdout's does: rich exited with status 1, or the command
    took the BrokenPipeError for its own failure (status 2, its message unwritable)."""
    proc = subprocess.Popen([sys.executable, "-m", "mlxserve", "chat", "--model", tiny],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MLXSERVE_HOME=str(tmp_path)))
    proc.stdin.write("/stats\n")  # the model loads once a line has come
    proc.stdin.flush()
    assert proc.stderr.readline().startswith("Loaded ")
    proc.stderr.close()  # what comes after this meets a closed pipe
    try:
        proc.stdin.write("/stats\nHi\n")
        proc.stdin.close()
    except BrokenPipeError:  # the first /stats met it already, and the chat has ended
        pass
    assert proc.wait(timeout=120) == 0
    assert proc.stdout.read() == ""


@pytest.mark.parametrize("make_args,needle", [
    (lambda url: ("--url", url, "--api-key", "wrong"), "server answered 401"),
    (lambda url: ("--url", f"http://127.0.0.1:{free_port()}"), "cannot reach"),
    (lambda url: ("--url", "ftp://example.com"), "--url must be an http(s) URL"),
])
def test_url_errors_are_one_line(served, make_args, needle):
    server, _ = served
    r = mlxserve("chat", *make_args(server.url), stdin="hi")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxserve: error: ") and needle in lines[0], r.stderr


def test_url_mode_refuses_engine_flags_and_keeps_those_that_matter(served, tmp_path):
    """With --url the server's engine runs the model: engine flags given are one line, exit 2,
    naming each (one given its default value too); the model name, system prompt, thinking,
    temperature and answer length still apply."""
    server, _ = served
    where = ("--url", server.url, "--api-key", API_KEY)
    r = mlxserve("chat", *where, "--gguf-mode", "exact", "--memory-budget", "8GB", "--speculative", "ngram",
                 stdin="Hi\n", env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == ("mlxserve: error: --gguf-mode, --memory-budget, --speculative have no effect with --url: "
                        "the server's engine runs the model (give them to `mlxserve serve`)\n")
    r = mlxserve("chat", *where, "--model", "tiny", "--system", "Be brief.", "--no-think", "--temperature", "0",
                 "--max-tokens", "3", stdin="Hi\n", env={"MLXSERVE_HOME": str(tmp_path)})
    assert r.returncode == 0 and re.search(r"\b3 generated \(max\)", r.stderr), r.stderr


def test_bare_mlxserve_starts_chat_in_a_terminal(monkeypatch, capsys):
    from mlxserve import cli, repl

    started = []
    monkeypatch.setattr(repl, "run_chat", lambda args: started.append(args) or 0)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    assert cli.main([]) == 0
    assert started and started[0].command == "chat" and started[0].model is None and started[0].url is None
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert cli.main([]) == 0 and len(started) == 1
    assert "usage: mlxserve" in capsys.readouterr().out


# ---- pieces -------------------------------------------------------------------------------------------
def test_http_backend_splits_reasoning(tiny):
    """Reasoning sent as reasoning_content is kept apart from the answer."""
    loaded = load_model(tiny, progress=False)
    server = LiveServer(create_app(ScriptedEngine(loaded, SCRIPT), "scripted"))
    try:
        backend = HTTPBackend(server.base)  # no /v1: added
        assert backend.model == "scripted"
        generation = backend.generate([{"role": "user", "content": "Weather?"}], Settings())
        deltas = list(generation)
    finally:
        server.stop()
    assert "".join(d.reasoning for d in deltas).strip() == "Check the weather."
    assert "".join(d.content for d in deltas).startswith("Let me look.")
    assert generation.stats.completion_tokens == len(SCRIPT)
    assert generation.stats.prompt_tokens > 0 and generation.stats.ttft_s is not None


def _serve_events(events: list, done: bool = True, kind: str = "text/event-stream"):
    """A server whose every chat answer streams `events` (JSON values), then [DONE] (unless
    not `done`: then the connection closes), as Content-Type `kind`; (server, backend)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Scripted(BaseHTTPRequestHandler):
        def do_GET(self):  # /v1/models
            self._send(b'{"object": "list", "data": [{"id": "m", "object": "model"}]}', "application/json")

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            self._send(body + (b"data: [DONE]\n\n" if done else b""), kind)

        def _send(self, body, kind):
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, HTTPBackend(f"http://127.0.0.1:{server.server_address[1]}/v1")


@pytest.mark.parametrize("event", [
    {"choices": [{"delta": {"content": 5}}]},
    [[1, 2]],
    {"choices": [5]},
    {"choices": {"delta": {}}},
    {"choices": [{"delta": "text"}]},
    {"choices": [{"delta": {"reasoning_content": 7}}]},
    {"choices": [{"delta": {"content": "x"}, "finish_reason": 3}]},
])
def test_a_malformed_event_from_the_server_is_an_error_not_a_traceback(event):
    from mlxserve.chat_backend import BackendError

    server, backend = _serve_events([event])
    try:
        with pytest.raises(BackendError, match="the server sent .*OpenAI-compatible"):
            list(backend.generate([{"role": "user", "content": "A story?"}], Settings()))
    finally:
        server.shutdown()


def test_usage_figures_of_the_wrong_kind_are_left_out():
    server, backend = _serve_events([
        {"choices": [{"delta": {"content": "Hi"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"completion_tokens": None, "prompt_tokens": "3",
                                  "prompt_tokens_details": {"cached_tokens": True}}}])
    try:
        generation = backend.generate([{"role": "user", "content": "A story?"}], Settings())
        assert "".join(d.content for d in generation) == "Hi"
        stats = generation.stats
        assert (stats.completion_tokens, stats.prompt_tokens, stats.cached_tokens) == (1, None, None)
    finally:
        server.shutdown()


def test_a_stream_cut_off_by_the_server_is_an_error_not_an_answer():
    """A server that dies mid-answer: the chat must not take the fragment for a whole answer."""
    from mlxserve.chat_backend import BackendError

    # One chunk, then the connection closes: no finish_reason, no [DONE].
    server, backend = _serve_events([{"choices": [{"index": 0, "delta": {"content": "Once upon"},
                                                   "finish_reason": None}]}], done=False)
    try:
        generation = backend.generate([{"role": "user", "content": "A story?"}], Settings())
        with pytest.raises(BackendError, match="broke before the answer was complete"):
            list(generation)
    finally:
        server.shutdown()


def test_an_in_process_answer_tells_how_far_its_own_prompt_is_read(tiny, monkeypatch):
    from mlxserve.chat_backend import EngineBackend
    from mlxserve.engine import Engine, EngineConfig

    asked = []
    monkeypatch.setattr(Engine, "prompt_progress", lambda self, request_id: asked.append(request_id) or (7, 9))
    backend = EngineBackend(load_model(tiny, progress=False), EngineConfig())
    try:
        generation = backend.generate([{"role": "user", "content": "Hi"}], Settings(max_tokens=2))
        assert generation.prompt_progress() == (7, 9)
        assert asked == [generation._stream.id]
        list(generation)
    finally:
        backend.close()


def test_a_message_longer_than_the_context_says_so(tiny):
    import dataclasses

    from mlxserve.chat_backend import BackendError, EngineBackend
    from mlxserve.engine import EngineConfig

    loaded = dataclasses.replace(load_model(tiny, progress=False), context_length=64)
    backend = EngineBackend(loaded, EngineConfig())
    try:
        with pytest.raises(BackendError, match="does not fit the model's context .*shorten it"):
            backend.generate([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "word " * 100}], Settings())
        with pytest.raises(BackendError, match="fills the model's context .*/reset"):
            backend.generate([{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok " * 30},
                              {"role": "user", "content": "more"}], Settings())
    finally:
        backend.close()


def test_a_conversation_beyond_the_kv_budget_says_so(tiny):
    from mlxserve.chat_backend import BackendError, EngineBackend
    from mlxserve.engine import EngineConfig

    loaded = load_model(tiny, progress=False)
    layers, heads, dim = loaded.model.kv_shape()
    budget = 32 * 2 * layers * heads * dim * 4  # one 32-token slot of float32 KV (blocks of 8)
    backend = EngineBackend(loaded, EngineConfig(block_size=8, memory_budget_bytes=budget))
    try:
        with pytest.raises(BackendError, match="KV memory budget .*shorten the message"):
            backend.generate([{"role": "user", "content": "word " * 40}], Settings())
        with pytest.raises(BackendError, match="KV memory budget .*/reset"):
            backend.generate([{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok " * 20},
                              {"role": "user", "content": "more"}], Settings())
    finally:
        backend.close()


def test_url_mode_max_tokens_beyond_the_context_is_a_cap(tiny):
    """/max_tokens caps the answer with --url as in-process: past what the context leaves, the
    answer gets what it leaves (the server refuses max_tokens beyond the context)."""
    import dataclasses

    from mlxserve.engine import EngineConfig

    loaded = dataclasses.replace(load_model(tiny, progress=False), context_length=64)
    with Engine(loaded, EngineConfig()) as engine:
        server = LiveServer(create_app(engine, "tiny"))
        try:
            backend = HTTPBackend(server.url)
            settings = Settings(temperature=0.0)
            settings.set("max_tokens", "1000")
            generation = backend.generate([{"role": "user", "content": "Hi"}], settings)
            list(generation)
        finally:
            server.stop()
    stats = generation.stats
    assert stats.prompt_tokens + stats.completion_tokens <= 64 and stats.completion_tokens > 0


def test_ctrl_c_before_the_first_token_drops_the_question():
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    class Interrupted:  # Ctrl-C arrives while waiting for the first token
        stats = None

        def __iter__(self):
            raise KeyboardInterrupt

        def cancel(self):
            pass

    class Backend:
        def generate(self, messages, settings):
            return Interrupted()

    session = ChatSession()
    Repl(Backend(), session, Console(file=io.StringIO())).ask("Write a long story.")
    assert session.messages == []  # as if never asked: the next question is answered, not this one


def test_what_is_sent_of_a_line_typed_or_pasted(tmp_path, monkeypatch):
    """Blank lines before and whitespace after a message go; its indentation stays. A line
    that starts, after blanks, with one / is a command; // sends a leading /."""
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl, message_text

    assert message_text(" \n\t\n    def f(self):\n        return 1  \n\n") == "    def f(self):\n        return 1"
    assert message_text("  x  ") == "  x"
    assert message_text(" \n \t\n ") == ""

    class Backend:
        def describe(self):
            return "fake"

    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    repl = Repl(Backend(), ChatSession(), Console(file=io.StringIO()))
    repl._prompt = TypedPrompt(["\n    indented\n  more\n", "  \n\t", "  /reset", "//etc/hosts?", "  //x"])
    sent = []
    monkeypatch.setattr(repl, "ask", lambda text: sent.append(("ask", text)))
    monkeypatch.setattr(repl, "command", lambda line: sent.append(("command", line)))
    assert repl.run() == 0
    assert sent == [("ask", "    indented\n  more"), ("command", "/reset"), ("ask", "/etc/hosts?"), ("ask", "  /x")]

    # A question piped in (`mlxserve chat < snippet.py`) is taken the same way, whole.
    piped = []
    _pipe_to_fake_chat(monkeypatch, piped)
    assert _piped_chat(monkeypatch, "\n    def f(self):\n        return 1\n") == 0
    assert piped == [([{"role": "user", "content": "    def f(self):\n        return 1"}], 0.7)]


def _pipe_to_fake_chat(monkeypatch, asked: list, answer: str = "ok") -> None:
    """run_chat's backend answers `answer` to everything, and records in `asked` the messages
    of each request with the temperature it was asked with."""
    from mlxserve import repl as repl_module
    from mlxserve.chat_backend import Delta, Stats

    class Generation:
        stats = Stats(1, "stop")

        def __iter__(self):
            yield Delta(content=answer, tokens=1)

        def cancel(self):
            pass

    class Backend:
        model = "fake"

        def generate(self, messages, settings):
            asked.append((messages, settings.temperature))
            return Generation()

        def close(self):
            pass

    monkeypatch.setattr(repl_module, "open_backend", lambda args: Backend())


def _piped_chat(monkeypatch, stdin, **flags) -> int:
    """run_chat with `stdin` (text, or a stream) piped, chat's flags at their defaults but `flags`."""
    from mlxserve.repl import run_chat

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    args = {"temperature": None, "no_think": False, "system": None, "format": None, "max_tokens": None, **flags}
    return run_chat(types.SimpleNamespace(**args))


def test_piped_commands_act_as_typed_and_quit_ends_the_session(monkeypatch, capsys):
    """A piped line that starts with a command's name is that command, as typed in the
    terminal: /quit and /exit end the session (what follows is never asked), /temp applies to
    the questions after it, /reset forgets. The lines between two commands are one question;
    other lines starting with / (code, paths) are text, and // sends a command's name."""
    from mlxserve.cli import CLIError

    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    for quit in ("/quit", "/exit", "  /EXIT "):
        assert _piped_chat(monkeypatch, f"{quit}\nWhat is 2+2?\n") == 0
        assert asked == [] and capsys.readouterr().out == ""
    stdin = "What is 2+2?\n/temp 0\nAnd 3+3?\n/reset\nFirst line,\n/* kept */\n//exit\n/quit\n/temp 1\nThe end?\n"
    assert _piped_chat(monkeypatch, stdin) == 0
    first = [{"role": "user", "content": "What is 2+2?"}]
    assert asked == [(first, 0.7),
                     (first + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "And 3+3?"}], 0),
                     ([{"role": "user", "content": "First line,\n/* kept */\n/exit"}], 0)]
    out = capsys.readouterr()
    assert out.out == "ok\nok\nok\n"  # only the answers: what commands say goes to stderr
    assert "temperature: 0" in out.err and "New conversation." in out.err
    # Nobody is there to type it again: a command that fails ends the session, before any question.
    asked.clear()
    with pytest.raises(CLIError, match=r"^usage: /temp X"):
        _piped_chat(monkeypatch, "/temp warm\nWhat is 2+2?\n")
    assert asked == []


def test_piped_input_that_quits_first_loads_no_model(monkeypatch):
    """Blank lines, then /quit: nothing to do, so no model is loaded for it (seconds, or a
    download, for nothing)."""
    from mlxserve import repl as repl_module

    opened = []
    monkeypatch.setattr(repl_module, "open_backend", lambda args: opened.append(args))
    for stdin in ("\n\n/quit\nWhat is 2+2?\n", "  /EXIT  \n"):
        assert _piped_chat(monkeypatch, stdin) == 0
    # A word after it is the usage error it is anywhere else in the input (it quit, status 0,
    # as the first line, and failed, status 2, after a question), still without a model.
    from mlxserve.cli import CLIError

    with pytest.raises(CLIError, match=r"^usage: /EXIT \(nothing after it\)$"):
        _piped_chat(monkeypatch, "  /EXIT now\nWhat is 2+2?\n")
    assert opened == []


def test_loading_a_plain_list_of_messages_keeps_the_settings_given(monkeypatch, tmp_path):
    """A plain list of OpenAI messages carries no settings: `/load` keeps those of the command
    line (and the system prompt, unless the list has a system message). A /save file brings
    its own."""
    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]))
    assert _piped_chat(monkeypatch, f"/load {plain}\nAnd then?\n", temperature=0.0, system="Be brief.") == 0
    assert asked == [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And then?"}], 0.0)]
    asked.clear()
    saved = tmp_path / "saved.json"
    assert _piped_chat(monkeypatch, f"/save {saved}\n", temperature=0.2, system="Be brief.") == 0
    assert _piped_chat(monkeypatch, f"/load {saved}\nAnd then?\n", temperature=0.0, system="Other.") == 0
    assert asked == [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And then?"}], 0.2)]


def test_an_empty_system_prompt_is_sent_so_that_the_template_adds_none(monkeypatch):
    """`chat --system ''` sends an empty system message, so that the chat template adds no
    default system prompt of its own (Qwen2.5's "You are Qwen, …"), as `/system none` does;
    `/system default` sends none, as without --system: the template's default applies."""
    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    assert _piped_chat(monkeypatch, "Hi\n/reset\n/system default\nHi\n/reset\n/system none\nHi\n", system="") == 0
    empty, user = {"role": "system", "content": ""}, {"role": "user", "content": "Hi"}
    assert [messages for messages, _ in asked] == [[empty, user], [user], [empty, user]]


def test_a_system_prompt_after_double_dash_is_taken_as_it_is(monkeypatch, capsys):
    """`/system none` and `/system default` are keywords; after `--` the text is the system
    prompt as it is, so that it can be one of those words (or start with `--`)."""
    from mlxserve.cli import CLIError

    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    stdin = "".join(f"/system {arg}\n/reset\nHi\n" for arg in ("-- none", "--  Default", "-- -- x", "--none"))
    assert _piped_chat(monkeypatch, stdin) == 0
    assert [messages[0]["content"] for messages, _ in asked] == ["none", "Default", "-- x", "--none"]
    assert capsys.readouterr().err.count("System prompt set.") == 4
    with pytest.raises(CLIError, match=r"^usage: /system -- TEXT"):
        _piped_chat(monkeypatch, "/system --\nHi\n")


def test_piped_lines_in_a_fenced_block_are_text(monkeypatch, capsys, tmp_path):
    """In pasted Markdown, a fenced block (``` or ~~~) is code, a shell session, a transcript:
    its lines are part of the question as they are, never commands (a `/export FILE` there
    wrote a file). A fence closes with the same mark, at least as long; one left open runs to
    the end of stdin; "```x```" on a line opens none."""
    monkeypatch.chdir(tmp_path)  # (where the /export would write)
    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    fenced = "Why does this fail?\n```sh\n$ mlxserve chat\n/export notes.md\n  /stats\n```\n" \
             "~~~~\n/temp 0\n```\n//reset\n~~~~"
    stdin = f"```inline```\n/temp 1\n{fenced}\n/temp 0\nAnd this?\n```\n/quit\n"
    assert _piped_chat(monkeypatch, stdin) == 0
    assert asked == [([{"role": "user", "content": "```inline```"}], 0.7),
                     ([{"role": "user", "content": "```inline```"}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": fenced}], 1),
                     ([{"role": "user", "content": "```inline```"}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": fenced}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": "And this?\n```\n/quit"}], 0)]
    assert capsys.readouterr().err.count("temperature") == 2 and not (tmp_path / "notes.md").exists()


def test_what_piped_chat_says_on_stderr_is_not_wrapped(monkeypatch, capsys):
    """Off a terminal rich cut every line at 80 columns: what commands say (a long system
    prompt shown, /help's rows and keys) stays one line each, for grep and for whatever shows
    it later; the answers on stdout too."""
    from mlxserve.repl import COMMANDS, KEYS_HELP

    long_answer = "The sky is blue because air scatters blue sunlight more than red. " * 3
    _pipe_to_fake_chat(monkeypatch, [], answer=long_answer)
    system = "Answer in full sentences and explain every step. " * 3
    assert _piped_chat(monkeypatch, f"/system {system}\n/system\n/help\nWhy is the sky blue?\n") == 0
    out = capsys.readouterr()
    err = out.err.splitlines()
    # nor padded: rich fills a table's lines with spaces up to the console's width
    assert not [line for line in err if line.endswith(" ")], err
    assert f"System prompt: {system.strip()}" in err and KEYS_HELP in err, err
    rows = [line for line in err if line.startswith("/")]
    assert len(rows) == len(COMMANDS), err
    assert next(row for row in rows if row.startswith("/format")).endswith("or inline JSON)"), err
    assert out.out == long_answer + "\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _typed_chat_with_stdout_a_file(monkeypatch, typed_lines, answer, reasoning=""):
    """run_chat typed in a terminal (stdin one; the lines `typed_lines`, then Ctrl-D) on a
    fake backend whose every answer is `answer` (after `reasoning`); stdout is capsys's (a
    file). Returns run_chat's exit status."""
    from mlxserve import repl as repl_module
    from mlxserve.chat_backend import Delta, Stats
    from mlxserve.repl import run_chat

    class Generation:
        stats = Stats(1, "stop")

        def __iter__(self):
            if reasoning:
                yield Delta(reasoning=reasoning, tokens=1)
            yield Delta(content=answer, tokens=1)

    class Backend:
        model = "fake"

        def describe(self):
            return "fake"

        def generate(self, messages, settings):
            return Generation()

        def close(self):
            pass

    monkeypatch.setattr(repl_module, "open_backend", lambda args: Backend())
    monkeypatch.setattr(repl_module, "_prompt_session", lambda repl: TypedPrompt(typed_lines))
    monkeypatch.setattr(repl_module.signal, "signal", lambda *args: None)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    args = {"temperature": None, "no_think": False, "system": None, "format": None, "max_tokens": None}
    return run_chat(types.SimpleNamespace(**args))


def test_a_chat_typed_in_a_terminal_with_stdout_a_file_writes_only_the_answers_there(monkeypatch, capsys):
    """`mlxserve chat > answers.txt` typed in a terminal: the file got the banner, the figures
    after each answer and what commands say, so that /help showed nothing on the screen. As
    piped chat does: the file gets only the answers' text, each as the model wrote it (not
    Markdown wrapped to 80 columns) ended by a newline, no thinking; all else is on the terminal
    (stderr here), the thinking included."""
    paragraph = ("The sky is blue because air scatters blue sunlight more than red. " * 4).strip()
    answer = f"# Sky\n\n{paragraph}\n\n**Blue** wins."
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    typed = ["/help", "/system be brief", "Why is the sky blue?", "/nonsense", "/system", "Again?"]
    assert _typed_chat_with_stdout_a_file(monkeypatch, typed, answer, reasoning="Rayleigh, I think.") == 0
    assert capsys.readouterr().out == f"{answer}\n{answer}\n"
    shown = plain(screen.getvalue())
    for said in ("mlxserve chat · fake", "this list", "System prompt set.", "Rayleigh, I think.",
                 "1 generated", "error: unknown command /nonsense", "System prompt: be brief"):
        assert said in shown, (said, shown)
    assert "blue sunlight" not in shown, shown


def test_a_chat_typed_with_no_terminal_to_write_to_writes_the_rest_unwrapped(monkeypatch, capsys):
    """stdout and stderr files, and no terminal to open (`chat > out 2> err` where /dev/tty
    fails): what is not an answer goes to stderr, as piped chat's, each line whole (rich took
    80 columns off a terminal and cut every longer line in two, padding the rest)."""
    from mlxserve import repl as repl_module

    paragraph = ("The sky is blue because air scatters blue sunlight more than red. " * 4).strip()
    monkeypatch.setattr(repl_module, "TERMINAL", "/nonexistent/tty")
    typed = ["Why is the sky blue?", "/system " + paragraph, "/system"]
    assert _typed_chat_with_stdout_a_file(monkeypatch, typed, "Scattering.") == 0
    out = capsys.readouterr()
    assert out.out == "Scattering.\n"
    lines = out.err.splitlines()
    assert not [line for line in lines if line.endswith(" ")], lines
    assert f"System prompt: {paragraph}" in lines, lines


def test_the_prompt_is_drawn_on_the_terminal_when_stdout_is_a_file(tiny, tmp_path):
    """`mlxserve chat > answers.txt` typed in a terminal: prompt_toolkit wrote its prompt,
    the line typed and carriage returns into the file (plain text, as stdout was not a
    terminal), and the banner, the figures and what commands say went there too (/help showed
    nothing). They are on the terminal (stderr here), and the file gets only the answer."""
    out = tmp_path / "out.txt"
    env = {**os.environ, "NO_COLOR": "1", "MLXSERVE_HOME": str(tmp_path), "TERM": "xterm-256color",
           "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "80", "LINES": "24"}
    # Greedy: a sampled answer from random weights can be only whitespace (CI drew one).
    command = f"exec {sys.executable} -m mlxserve chat --model {tiny} --temperature 0 > {out}"
    child = pexpect.spawn("/bin/sh", ["-c", command], env=env, dimensions=(24, 80), encoding="utf-8", timeout=30)
    shown = child.logfile_read = io.StringIO()
    try:
        child.expect_exact(READY)
        child.expect_exact(">>>")
        child.send("/sys")
        child.expect_exact("/sys")  # the line typed is drawn on the terminal
        child.send("\t")
        child.expect_exact("tem")  # and so is its completion (/system)
        child.send(" be brief\r")
        child.expect_exact("System prompt set.")
        child.expect_exact(READY)
        child.send("/help\r")
        child.expect_exact("this list")
        child.expect_exact(READY)
        child.send("Hi\r")
        child.expect(r"[\d,]+ generated")
        child.expect_exact(READY)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "mlxserve chat ·" in plain(shown.getvalue())  # the banner, on the terminal
    written = out.read_text()
    assert ">>>" not in written and "/system" not in written, repr(written)
    for said in ("mlxserve chat", "System prompt", "this list", "generated"):
        assert said not in written, repr(written)
    assert written.endswith("\n") and written.strip(), repr(written)  # the answer, and only it


def test_the_prompt_goes_to_the_terminal_itself_when_stdout_and_stderr_are_files(monkeypatch):
    """`mlxserve chat > out 2> err`: the prompt is drawn on /dev/tty, in neither file."""
    from prompt_toolkit.input import create_pipe_input

    from mlxserve import repl as repl_module

    master, slave = os.openpty()
    typed_at = os.fdopen(os.dup(slave), "r")  # stdin: the terminal
    try:
        monkeypatch.setattr(repl_module, "TERMINAL", os.ttyname(slave))
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        monkeypatch.setattr(sys, "stdin", typed_at)
        output = repl_module._prompt_output()
        with create_pipe_input() as typed:
            typed.send_text("hello\r")
            from prompt_toolkit import PromptSession

            assert PromptSession(input=typed, output=output).prompt(repl_module.PROMPT) == "hello"
        output.stdout.close()  # (the terminal, opened for the prompt)
        assert sys.stdout.getvalue() == sys.stderr.getvalue() == ""
        assert b">>>" in os.read(master, 65536)
    finally:
        typed_at.close()
        os.close(master)
        os.close(slave)


def test_models_keeps_each_name_whole_in_a_narrow_terminal():
    """/models in 40 columns cut a long name (a model's path) short with an ellipsis, so that
    it could not be copied into /model NAME: it stays one line (the terminal wraps it), its
    details beside it where every row fits, else under it."""
    from rich.console import Console

    from mlxserve.chat_backend import ModelInfo
    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    name = "/home/someone/.cache/mlxserve/models/SmolLM2-135M-Instruct.Q4_1.gguf"

    class Backend:
        model = name

        def models(self):
            return [ModelInfo(name, "gguf, Q4_1, 98 MB", current=True), ModelInfo("smollm2-135m", "SmolLM2 135M")]

    for width in (40, 80, 120):
        out = io.StringIO()
        Repl(Backend(), ChatSession(), Console(file=out, width=width), prompt=False).command("/models")
        lines = out.getvalue().splitlines()
        assert lines[0] == f" *  {name}" + ("  gguf, Q4_1, 98 MB" if width == 120 else ""), lines
        assert "…" not in out.getvalue() and len(lines) == (2 if width == 120 else 4), lines


def test_model_switch_names_a_path_with_brackets_as_it_is():
    """/model's "Loading NAME …" line is text, not rich markup: a path's "[red]" was taken for
    a style and dropped, and "[/x]" was rich's MarkupError, so the switch failed
    ("/model failed: MarkupError") before anything loaded."""
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    name = "/models/v[red]2[/x]/model.gguf"

    class Backend:
        model = "old"
        loads_models = True
        switched = None

        def switch_model(self, spec):
            Backend.switched = spec
            return f"Loaded {spec}"

    out = io.StringIO()
    Repl(Backend(), ChatSession(), Console(file=out, width=200, force_terminal=True), prompt=False).command(
        f"/model {name}")
    assert Backend.switched == name, out.getvalue()
    assert f"Loading {name} …" in out.getvalue() and f"Loaded {name}" in out.getvalue(), out.getvalue()


def test_stats_of_a_server_print_its_names_as_they_are(capsys):
    """/stats shows what a server (chat --url) sends: a stat's name holding "[/x]" was rich's
    MarkupError ("/stats failed"), and "[red]" was taken for a style and dropped. The CLI's
    consoles read no markup at all (cli.output_console)."""
    from mlxserve.chat_session import ChatSession
    from mlxserve.cli import output_console
    from mlxserve.repl import Repl

    class Backend:
        def stats(self):
            return {"odd[red]name[/x]": 3}

    Repl(Backend(), ChatSession(), output_console(), prompt=False).command("/stats")
    out = capsys.readouterr().out
    assert "odd[red]name[/x]" in out and "3" in out, out


def test_piped_bytes_that_are_not_text_come_as_replacement_characters():
    """Whatever the stream's errors (surrogateescape under a C locale: lone surrogates, which a
    server refused while the engine in the process took them; strict under a UTF-8 one: an
    error), bytes that are not UTF-8 come as U+FFFD, as from the command line."""
    from mlxserve.piped_input import read_pieces

    for errors in ("strict", "surrogateescape"):
        r, w = os.pipe()
        os.write(w, b"Hi \xff\xfe there\n")
        os.close(w)
        with open(r, encoding="utf-8", errors=errors) as stream:
            assert "".join(read_pieces(stream)) == "Hi \ufffd\ufffd there\n"


def test_a_fence_is_indented_three_spaces_at_most():
    """As in Markdown, a line indented four spaces or more is indented code, not a fence: it
    hid every later command, /quit included."""
    from mlxserve.repl import piped_messages

    lines = ["Code:", "    ```", "/stats", "   ```", "/stats", "    ```", "   ```", "/stats"]
    assert list(piped_messages(lines)) == [("ask", "Code:\n    ```"), ("command", "/stats"),
                                           ("ask", "   ```\n/stats\n    ```\n   ```"), ("command", "/stats")]


def test_an_answer_cut_by_ctrl_c_ends_its_line_on_stdout(capsys):
    """stdout holds the answers, one a line: one cut by Ctrl-C gets its newline there too (it
    went to stderr), so that a reader of lines gets what came of it."""
    from mlxserve.chat_backend import Delta
    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import PipedRepl

    class Generation:
        def __iter__(self):
            yield Delta(content="In twilight's hush,", tokens=4)
            raise KeyboardInterrupt

    class Backend:
        model = "fake"

        def generate(self, messages, settings):
            return Generation()

    with pytest.raises(KeyboardInterrupt):
        PipedRepl(Backend(), ChatSession(), iter([("ask", "Write a poem")])).run()
    assert capsys.readouterr().out == "In twilight's hush,\n"


class PipeOfPieces:
    """stdin as a pipe that hands out what was written to it one piece at a time, recording
    each read in `events`; after the pieces, `endless` again and again (if given), or the end."""

    def __init__(self, pieces: list[str], events: list, endless: str | None = None):
        self.pieces, self.events, self.endless = list(pieces), events, endless

    def isatty(self):
        return False

    def read(self, size=-1):
        assert size is not None and size > 0, "stdin was read to its end at once"
        piece = self.pieces.pop(0) if self.pieces else self.endless or ""
        self.events.append(("read", piece))
        return piece


def test_piped_input_is_taken_as_it_comes(monkeypatch, capsys):
    """Each command runs as soon as its line comes, and a question is answered as soon as its
    end is known (the next command, or the end of stdin): stdin was read to its end first, so
    a FIFO could not drive the chat line by line, and `yes '/temp 0' |` filled memory. /quit
    reads no more."""
    from mlxserve import repl as repl_module

    events = []
    _pipe_to_fake_chat(monkeypatch, events)  # (the questions asked go to `events` too)
    command = repl_module.Repl.command
    monkeypatch.setattr(repl_module.PipedRepl, "command", lambda self, line: events.append(("command", line))
                        or command(self, line))
    pieces = ["/temp 0\n", "What is", " 2+2?\n", "/reset\nAnd 3+3?\n"]
    assert _piped_chat(monkeypatch, PipeOfPieces(pieces, events)) == 0
    first, second = [{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "And 3+3?"}]
    assert events == [("read", "/temp 0\n"), ("command", "/temp 0"), ("read", "What is"), ("read", " 2+2?\n"),
                      ("read", "/reset\nAnd 3+3?\n"), (first, 0), ("command", "/reset"), ("read", ""), (second, 0)]
    assert capsys.readouterr().out == "ok\nok\n"

    events.clear()
    assert _piped_chat(monkeypatch, PipeOfPieces(["/temp 0\n/quit\n"], events, endless="/temp 1\n")) == 0
    assert events == [("read", "/temp 0\n/quit\n"), ("command", "/temp 0"), ("command", "/quit")]


def test_piped_text_from_windows_is_taken_as_typed(monkeypatch, tmp_path):
    """A byte order mark before the first line hid the command there; "\r\n" line ends left
    "\r" inside a question of several lines, also where a read ends between "\r" and "\n"."""
    asked = []
    _pipe_to_fake_chat(monkeypatch, asked)
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeff/temp 0\r\nFirst line,\r\nsecond line.\r\n/quit\r\n".encode())
    with open(path, encoding="utf-8") as stdin:
        assert _piped_chat(monkeypatch, stdin) == 0
    assert asked == [([{"role": "user", "content": "First line,\nsecond line."}], 0)]
    asked.clear()
    pieces = ["\ufeff/temp 0\r", "\nFirst line,\r", "\nsecond line.\r\n"]
    assert _piped_chat(monkeypatch, PipeOfPieces(pieces, [])) == 0
    assert asked == [([{"role": "user", "content": "First line,\nsecond line."}], 0)]


def test_a_piped_question_too_long_is_one_line_before_memory_fills(monkeypatch):
    """More text than MAX_PIPED_TEXT in one question (or one line) is an error as soon as it
    is seen, whatever keeps coming after it."""
    from mlxserve import piped_input

    monkeypatch.setattr(piped_input, "MAX_PIPED_TEXT", 100)
    _pipe_to_fake_chat(monkeypatch, asked := [])
    for endless, what in (("x" * 30 + "\n", "a question"), ("x" * 30, "a line")):
        reads = []
        with pytest.raises(piped_input.PipedTextTooLong) as failed:
            _piped_chat(monkeypatch, PipeOfPieces(["/temp 0\n"], reads, endless=endless))
        assert str(failed.value) == f"{what} on stdin has more than 100 characters, more than any model's context holds"
        assert len(reads) == 5 and asked == []  # the command, then 4 × 30 characters: past 100


def test_text_from_a_loaded_file_cannot_send_terminal_escapes(tmp_path):
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    class Backend:
        model = "tiny"

    path = tmp_path / "escapes.json"
    path.write_text(json.dumps({"system": "Be \x1b]0;PWNED\x07 \x1b[31mred\x1b[0m", "model": "other\x1b[2J",
                                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}))
    out = io.StringIO()
    repl = Repl(Backend(), ChatSession(), Console(file=out, width=80))
    repl.command(f"/load {path}")
    repl.command("/system")
    text = out.getvalue()
    assert "PWNED" in text and "red" in text and "saved with other" in text
    assert "\x1b" not in text


def test_save_and_load_count_in_the_singular_for_one(tmp_path):
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    class Backend:
        model = "tiny"

    out = io.StringIO()
    session = ChatSession()
    session.add_user("Hi")
    repl = Repl(Backend(), session, Console(file=out, width=200), prompt=False)
    repl.command(f"/save {tmp_path / 'one.json'}")
    session.add_answer("Hello")
    repl.command(f"/save {tmp_path / 'two.json'}")
    repl.command(f"/load {tmp_path / 'two.json'}")
    lines = out.getvalue().splitlines()
    assert lines[0] == f"Saved 1 message to {tmp_path / 'one.json'}"
    assert lines[-1] == "Loaded 2 messages, 1 question"


def test_a_bug_in_a_command_is_one_line_and_the_chat_goes_on(monkeypatch):
    from rich.console import Console

    from mlxserve import repl as repl_module
    from mlxserve.chat_session import ChatSession

    out = io.StringIO()
    repl = repl_module.Repl(object(), ChatSession(), Console(file=out, width=80))
    monkeypatch.setattr(repl_module, "_cmd_reset", lambda repl, arg: {}["a bug"])
    monkeypatch.setattr(repl_module, "_BY_NAME", {**repl_module._BY_NAME, "/reset": repl_module.Command(
        "/reset", "", "", repl_module._cmd_reset)})
    assert repl.command("/reset") is None
    assert out.getvalue().strip() == "error: /reset failed: KeyError: 'a bug'"


@pytest.mark.parametrize("url,base", [
    ("127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("http://host:1/v1/", "http://host:1/v1"),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1"),
    ("http://host/openai/v1", "http://host/openai/v1"),
])
def test_normalize_base_url(url, base):
    assert normalize_base_url(url) == base


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:99999/v1", "Port out of range 0-65535"),
    ("127.0.0.1:abc", "Port could not be cast to integer value as 'abc'"),
    ("http://[::1/v1", "Invalid IPv6 URL"),
])
def test_normalize_base_url_names_the_flag_of_a_malformed_url(url, why):
    """A port that is no port, or an unclosed IPv6 bracket: the error names --url and the URL
    (it was urllib's words alone, "mlxserve: error: Port out of range 0-65535")."""
    from mlxserve.chat_backend import BackendError

    with pytest.raises(BackendError) as err:
        normalize_base_url(url)
    shown = url if "://" in url else "http://" + url
    assert str(err.value) == f"--url must be an http(s) URL, got {shown!r} ({why})"


def test_answer_view_renders_markdown_and_thinking():
    from rich.console import Console

    from mlxserve.chat_backend import Delta

    for show_thinking in (True, False):
        out = io.StringIO()
        console = Console(file=out, width=80, force_terminal=False, no_color=True)
        with AnswerView(console, show_thinking=show_thinking) as view:
            view.add(Delta(reasoning="Let me think.", tokens=3))
            view.add(Delta(content="# Title\n\nSome **bold** text\x1b[31m.\n\n```python\nx = 1\n```", tokens=9))
        text = out.getvalue()
        assert ("Let me think." in text) == show_thinking
        assert "Title" in text and "Some bold text" in text and "**" not in text and "```" not in text
        assert "\x1b" not in text and "\ufffd[31m" in text  # the model's escape code is shown, not obeyed
        assert view.tokens == 12


def test_answer_view_shows_how_far_the_prompt_is_read_until_a_token_comes():
    from rich.console import Console

    from mlxserve.chat_backend import Delta

    read = [(1536, 4096)]
    view = AnswerView(Console(file=io.StringIO()), progress=lambda: read[0])
    assert view.footer_text() == "reading the prompt: 1,536 of 4,096 tokens (37%) · Ctrl-C stops"
    out = io.StringIO()
    Console(file=out, width=100).print(view._footer())  # the Live region renders it so
    assert "reading the prompt: 1,536 of 4,096 tokens (37%)" in out.getvalue()
    read[0] = None  # the engine has no figure (it has not taken the request in yet)
    assert view.footer_text() == "waiting · 0 tokens · Ctrl-C stops"
    read[0] = (4000, 4096)
    view.add(Delta(content="Hi", tokens=1))
    assert view.footer_text() == "writing · 1 token · Ctrl-C stops"  # one token, not "1 tokens"


def test_format_stats_fits_80_columns():
    from mlxserve.chat_backend import Stats

    line = format_stats(Stats(1300, "length", 15200, 14720, 0.12, 45.3))
    assert line == "prompt 15,200 (14,720 cached) · TTFT 0.12s · 45.3 tok/s · 1,300 generated (max)"
    assert len(line) <= 80
    assert format_stats(Stats(5, "cancelled", ttft_s=0.5), cut=True) == "TTFT 0.50s · 5 generated (cut)"
    assert printable("a\tb\nc\x07\x1b[2J\r\n") == "a\tb\nc\ufffd\ufffd[2J\n"


def test_help_is_readable_in_a_narrow_terminal():
    """/help in 30 columns gave the names' column all the width and cut every description to
    an ellipsis (a column of "…"): each description now goes under its command where the two
    do not fit side by side, every word of it shown."""
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import COMMANDS, Repl

    for width in (20, 30, 40, 80):
        out = io.StringIO()
        Repl(object(), ChatSession(), Console(file=out, width=width), prompt=False).command("/help")
        text = out.getvalue()
        assert "…" not in text, text
        words = text.split()
        for command in COMMANDS:
            assert command.name in words, (width, command.name, text)
            for word in command.help.split():
                assert word in words, (width, word, text)
        if width == 80:  # side by side where they fit
            assert any(line.startswith("/help ") and line.rstrip().endswith("this list") for line in text.splitlines())


def test_stats_keeps_each_name_whole_in_a_narrow_terminal():
    """/stats in 30 columns cut its figures' names short ("kv_bytes_in_u…"): each name stays
    whole, its value beside it where the table fits, else after it on its line."""
    from rich.console import Console

    from mlxserve.chat_session import ChatSession
    from mlxserve.repl import Repl

    stats = {"running": 0, "kv_bytes_budget": 15_050_000_000, "prefix_evicted_blocks": 12, "requests_in_progress": 1,
             "busy_seconds": 3.743}

    class Backend:
        def stats(self):
            return stats

    for width in (20, 30, 80):
        out = io.StringIO()
        Repl(Backend(), ChatSession(), Console(file=out, width=width), prompt=False).command("/stats")
        text = out.getvalue()
        assert "…" not in text, text
        lines = [line.split() for line in text.splitlines()]
        assert [line[0].rstrip(":") for line in lines] == list(stats), text
        assert lines[1][1:] == [f"{stats['kv_bytes_budget'] / 2**20:,.1f}", "MiB"] and lines[4][1:] == ["3.743"], text


@pytest.mark.parametrize("route", ["/models", "/chat/completions"])
def test_an_html_error_page_is_one_readable_line(route):
    """A URL that is a web server, not an OpenAI-compatible one (`python -m http.server`):
    its error page is named by its status, not by its markup's first line (<!DOCTYPE HTML>)."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from mlxserve.chat_backend import BackendError

    class Plain(SimpleHTTPRequestHandler):  # http.server's own error pages; /v1/models listed
        def do_GET(self):
            if route == "/models":
                self.send_error(404)
                return
            body = b'{"data": [{"id": "m"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Plain)  # (POST: http.server's 501 page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BackendError) as caught:
            backend = HTTPBackend(f"http://127.0.0.1:{server.server_address[1]}")
            backend.generate([{"role": "user", "content": "Hi"}], Settings())
    finally:
        server.shutdown()
    status = "404: Not Found" if route == "/models" else "501: Not Implemented"
    assert str(caught.value) == f"server answered {status} (a web page, not an OpenAI-compatible answer)"


def test_stats_of_a_server_gone_away_say_it_cannot_be_reached():
    """/stats once the server has gone: that it cannot be reached, not that it has no stats."""
    server, backend = _serve_events([])
    server.shutdown()
    server.server_close()
    from mlxserve.chat_backend import BackendError

    with pytest.raises(BackendError) as caught:
        backend.stats()
    assert str(caught.value) == f"cannot reach {backend.base_url}: connection refused"


def test_https_to_a_plain_http_server_is_one_readable_line():
    """https:// to a plain-http port: said as such, not as OpenSSL's '[SSL: …] (_ssl.c:N)'."""
    from mlxserve.chat_backend import BackendError

    server, backend = _serve_events([])
    try:
        with pytest.raises(BackendError) as caught:
            HTTPBackend(backend.base_url.replace("http://", "https://"))
    finally:
        server.shutdown()
    message = str(caught.value)
    assert message.startswith(f"cannot reach https://127.0.0.1:{server.server_address[1]}/v1: the TLS handshake failed")
    assert message.endswith("is it an http:// server?") and "_ssl.c" not in message, message


def test_an_answer_that_is_not_a_stream_of_events_is_said_so():
    """A server that answers the chat request 200 with a whole JSON object (it does not
    stream): that, not that the connection broke before the answer was complete."""
    from mlxserve.chat_backend import BackendError

    server, backend = _serve_events([], done=False, kind="application/json")
    try:
        with pytest.raises(BackendError) as caught:
            list(backend.generate([{"role": "user", "content": "A story?"}], Settings()))
    finally:
        server.shutdown()
    assert str(caught.value) == ("the server sent 'application/json' instead of a stream of events: "
                                 "is it an OpenAI-compatible server?")
