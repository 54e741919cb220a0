"""The `mlxserve` command, run as a real subprocess."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import types
from contextlib import contextmanager

import pytest


def mlxserve(*args, env=None, stdin=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "mlxserve", *args],
        capture_output=True, text=True, env=full_env, input=stdin, timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("qwen3", "float32"))


# `python -c BLOCKING_STEP ARGS...` is `mlxserve ARGS...` whose engine blocks in one step, as if
# that step were a long prompt chunk on the CPU back-end: the BLOCK_STEP-th step after the first
# request is submitted prints "[step blocked]" on stderr, then waits until a byte is written to
# the FIFO named by RELEASE_FIFO (without it: for ever), then prints "[step released]".
# Before it says so it lets MLX finish the work already queued: MLX's CPU back-end builds new
# kernels with the C++ compiler through system(), which ignores SIGINT (process-wide) while
# it runs, so a Ctrl-C sent then would be lost.
# With CTRL_C_IN_SUBMIT set, Engine.submit does not return before a Ctrl-C (once the step is
# blocked): it comes before the caller has begun to read the stream.
BLOCKING_STEP = r"""
import os, sys, threading
import mlx.core as mx
from mlxserve import cli, engine, scheduler

block_at, release = int(os.environ["BLOCK_STEP"]), os.environ.get("RELEASE_FIFO")
submitted, blocked, steps = threading.Event(), threading.Event(), []
_submit, _step = engine.Engine.submit, scheduler.Scheduler.step

def submit(self, *args, **kwargs):
    submitted.set()
    stream = _submit(self, *args, **kwargs)
    if os.environ.get("CTRL_C_IN_SUBMIT"):
        blocked.wait()
        threading.Event().wait()
    return stream

def step(self):
    if submitted.is_set():
        steps.append(None)
        if len(steps) == block_at:
            mx.synchronize()
            os.write(2, b"[step blocked]\n")
            blocked.set()
            if release:
                with open(release) as fifo:
                    fifo.read(1)
            else:
                threading.Event().wait()
            os.write(2, b"[step released]\n")
    return _step(self)

engine.Engine.submit, scheduler.Scheduler.step = submit, step
if os.environ.get("MAX_BATCH_TOKENS"):  # (`run` has no flag for it)
    _engine_config = cli.engine_config
    cli.engine_config = lambda args, **o: _engine_config(args, max_batch_tokens=int(os.environ["MAX_BATCH_TOKENS"]), **o)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("block_step,in_submit", [
    (1, False),  # during the prompt's prefill
    (4, False),  # during a step after some text came
    (2, True),  # before `run` reads the stream: CI once caught the Ctrl-C there (it then hung)
])
def test_ctrl_c_in_run_exits_without_waiting_for_the_engine_step(tiny, block_step, in_submit):
    """Ctrl-C waited for the engine's step to end: some 40 s for a 512-token chunk on the CPU.
    Here the step never ends, so the process can only exit if it does not wait for it."""
    env = dict(os.environ, BLOCK_STEP=str(block_step), **({"CTRL_C_IN_SUBMIT": "1"} if in_submit else {}))
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_STEP, "run", "--model", tiny, "--no-chat",
                             "--ignore-eos", "--max-tokens", "100", "Once upon a time"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        before = []
        for line in proc.stderr:
            before.append(line)
            if line == "[step blocked]\n":
                break
        assert before[-1:] == ["[step blocked]\n"], before
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # a bound for a failing test, not a wait for anything
    finally:
        proc.kill()  # (the blocked step never ends: a process that waits for it is left behind)
        proc.wait()
    assert proc.returncode == 130, err
    assert err == "\n"  # the usual newline after ^C, nothing else: no traceback, no stats, no abort
    if block_step == 1 or in_submit:
        assert out == ""  # nothing generated yet, or nothing read


def _until_line(proc, wanted: str) -> list[str]:
    """The child's stderr lines up to `wanted` (which must come)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(wanted):
            break
    assert lines[-1:] and lines[-1].startswith(wanted), lines
    return lines


# `python -c CTRL_C_TO_ANOTHER_THREAD ARGS...` is `mlxserve ARGS...` whose main thread blocks
# SIGINT, so that the kernel hands a Ctrl-C to another thread, as it may while the engine runs:
# the main thread, which reads stdin, sees it only when it runs Python code. It prints
# "[reading stdin]" on stderr when it begins to read what is piped.
CTRL_C_TO_ANOTHER_THREAD = r"""
import signal, sys, threading
from mlxserve import cli, piped_input

threading.Thread(target=threading.Event().wait, daemon=True).start()  # (SIGINT not blocked there)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
_read_pieces = piped_input.read_pieces

def read_pieces(stream):
    print("[reading stdin]", file=sys.stderr, flush=True)
    yield from _read_pieces(stream)

piped_input.read_pieces = read_pieces
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command,piped,waiting", [
    ("run", "", "[reading stdin]"),  # `(sleep 30) | mlxserve run`
    ("chat", "/temp 0\n", "temperature: 0"),  # a FIFO driving the chat: the engine runs meanwhile
])
def test_ctrl_c_while_piped_input_is_awaited_exits_at_once(tiny, command, piped, waiting):
    """A Ctrl-C while stdin is an open pipe with nothing more in it ends the process at once,
    as any other: exit status 130, a newline on stderr. Here it goes to another thread than
    the one that waits for stdin, which would wait on (for ever: stdin is never closed)."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_TO_ANOTHER_THREAD, command, "--model", tiny],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bound = threading.Timer(120, proc.kill)  # a bound for a failing test, not a wait for anything
    bound.start()
    try:
        proc.stdin.write(piped)
        proc.stdin.flush()  # (and left open: an end of stdin would end the process too)
        _until_line(proc, waiting)
        proc.send_signal(signal.SIGINT)
        proc.wait()
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        bound.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and (out, err) == ("", "\n"), err


def test_ctrl_c_while_the_engine_module_loads_is_quiet(tiny, monkeypatch, capsys):
    """A Ctrl-C in the first seconds of `run` (MLX being imported) ends it like any other
    Ctrl-C: exit status 130, no traceback."""
    import mlxserve
    from mlxserve import cli

    class CtrlCOnImport:  # a finder that answers the engine's import with a Ctrl-C
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "mlxserve.engine":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "mlxserve.engine", raising=False)
    monkeypatch.delattr(mlxserve, "engine", raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport, *sys.meta_path])
    try:
        code = cli.main(["run", "--model", tiny, "hi"])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped main (a traceback on the command line)")
    assert code == 130 and capsys.readouterr().err == "\n"


def test_ctrl_c_in_piped_chat_exits_without_waiting_for_the_engine_step(tiny):
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_STEP, "chat", "--model", tiny],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BLOCK_STEP="1"))
    try:
        proc.stdin.write("Hello there")
        proc.stdin.close()
        proc.stdin = None  # (communicate then leaves it alone)
        _until_line(proc, "[step blocked]")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # a bound for a failing test, not a wait for anything
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and (out, err) == ("", "\n"), err


def test_bench_reports_on_ctrl_c_and_a_second_ctrl_c_quits_without_waiting(tiny):
    """The first Ctrl-C waits for the engine's step to report what was measured, and says
    so; a second one quits at once. The step here never ends."""
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_STEP, "bench", "--model", tiny, "--concurrency", "1",
                             "--prompt-tokens", "16", "--gen-tokens", "4", "--runs", "1", "--warmup", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BLOCK_STEP="1"))
    try:
        _until_line(proc, "[step blocked]")
        proc.send_signal(signal.SIGINT)
        _until_line(proc, "bench: stopping once the engine's step in flight ends")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)  # a bound for a failing test, not a wait for anything
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130


def test_serve_stopping_says_what_it_waits_for_and_a_second_ctrl_c_quits_at_once(tiny):
    """Ctrl-C ends the server's requests (503), then the engine finishes its step in flight:
    minutes for a long prompt on the CPU, said in one line. A second Ctrl-C went to the handler
    that takes uvicorn's re-raised signal, which ignores it: the process waited for the step
    (here it never ends). Now it quits at once."""
    import urllib.error
    import urllib.request

    from live_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_STEP, "serve", "--model", tiny, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BLOCK_STEP="1", PYTHONUNBUFFERED="1"))
    answers = []
    # (A bound for a failing test, not a wait for anything: such a process waits for ever, and
    # the lines below wait for its stderr.)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()

    def ask():
        body = json.dumps({"prompt": "Hello", "max_tokens": 5}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body), timeout=120)
        except urllib.error.HTTPError as exc:
            answers.append(exc.code)

    try:
        assert "serving" in proc.stdout.readline()
        asking = threading.Thread(target=ask)
        asking.start()
        _until_line(proc, "[step blocked]")
        proc.send_signal(signal.SIGINT)
        asking.join()
        assert answers == [503]
        _until_line(proc, "mlxserve: stopping once the engine's step in flight ends (Ctrl-C again quits at once)")
        proc.send_signal(signal.SIGINT)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr.read()


# `python -c LOADING_FOR_EVER ARGS...` is `mlxserve ARGS...` whose model never finishes loading,
# as a large one takes minutes: it prints "[loading]" on stderr, then waits (waking as
# interrupts.wait_for does, so that a signal's handler runs in the main thread).
LOADING_FOR_EVER = r"""
import os, sys, threading
from mlxserve import cli, interrupts, loader

def load_model(*args, **kwargs):
    os.write(2, b"[loading]\n")
    interrupts.wait_for(threading.Event())

loader.load_model = load_model
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_serve_loads_the_model_says_so(tiny):
    """SIGTERM (a service manager stopping the server) while the model loads ended the
    process without a word: its log showed nothing of why it went. Now one line says so, and
    the process still ends by the signal, which service managers take for a stop asked for
    (systemd counts an exit with status 143 as a failure)."""
    from live_server import free_port

    proc = subprocess.Popen([sys.executable, "-c", LOADING_FOR_EVER, "serve", "--model", tiny,
                             "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until_line(proc, "[loading]")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)  # a bound for a failing test, not a wait for anything
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM and (out, err) == ("", "mlxserve: stopped by SIGTERM while loading the model\n"), err


@pytest.mark.parametrize("command", [("models",), ("models", "--json"), ("doctor",), ("pull", "--list"), ("--help",),
                                     ("run", "--help"), ("--version",), ("run", "hi"), ("run", "--json", "hi"),
                                     ("chat",)])
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(tiny, command):
    args = [*command, "--model", tiny, "--max-tokens", "3"] if command[-1] in ("hi", "chat") else list(command)
    with open("/dev/full", "w") as full:  # every write fails: "No space left on device"
        r = subprocess.run([sys.executable, "-m", "mlxserve", *args], stdout=full, stderr=subprocess.PIPE,
                           input="hi\n" if command == ("chat",) else None, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("Loaded ")]
    assert r.returncode == 2 and lines == ["mlxserve: error: cannot write to standard output: No space left on device"], r.stderr


def test_a_bench_whose_table_cannot_be_written_still_writes_its_json(tiny, tmp_path):
    out = tmp_path / "bench.json"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "mlxserve", "bench", "--model", tiny, "--concurrency", "1",
                            "--prompt-tokens", "8", "--gen-tokens", "2", "--runs", "1", "--warmup", "0",
                            "--json", str(out)], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "mlxserve: error: cannot write to standard output: No space left on device"), r.stderr
    assert "Traceback" not in r.stderr and json.loads(out.read_text())["results"]["mlxserve"]["concurrency"][0]["runs"]


@pytest.mark.parametrize("command", [("run", "--model", "/proc/self/mem", "hi"), ("pull", "/proc/self/mem")])
def test_a_model_file_that_cannot_be_read_is_named(command):
    r = mlxserve(*command)  # /proc/self/mem opens; its first read fails: "[Errno 5] Input/output error"
    assert r.returncode == 2 and re.fullmatch(r"mlxserve: error: \[Errno 5\] Input/output error: '/proc/\d+/mem'",
                                              r.stderr.strip()), r.stderr


def test_a_closed_standard_output_is_as_if_sent_nowhere(tiny):
    r = subprocess.run(["bash", "-c", 'exec "$@" >&-', "-", sys.executable, "-m", "mlxserve", "run", "--model", tiny,
                        "--max-tokens", "3", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "generated" in r.stderr, r.stderr


@pytest.mark.parametrize("command,says", [("run", "no prompt: give one as an argument"),
                                          ("chat", "no question on stdin")])
def test_a_closed_standard_input_is_as_if_empty(tiny, command, says):
    r = subprocess.run(["bash", "-c", 'exec "$@" <&-', "-", sys.executable, "-m", "mlxserve", command, "--model", tiny],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"mlxserve: error: {says}"), r.stderr


def test_half_precision_on_the_cpu_is_warned_of(tiny):
    r = mlxserve("run", "--model", tiny, "--dtype", "float16", "--max-tokens", "1", "hi")
    assert r.returncode == 0, r.stderr
    assert "warning: MLX's CPU back-end runs float16 matrix products far slower than float32" in r.stderr
    r = mlxserve("run", "--model", tiny, "--dtype", "float32", "--max-tokens", "1", "hi")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_bench_seed_out_of_range_is_one_line():
    for seed in ("-1", str(2**64)):
        r = mlxserve("bench", "--random-weights", "tiny", "--seed", seed)
        assert r.returncode == 2 and r.stderr == "mlxserve: error: --seed must be a whole number from 0 to 2**64 - 1\n"


@contextmanager
def _run_in_a_terminal_with_a_blocked_step(tiny, tmp_path, prompt: str, block_step: int, **env):
    """`run PROMPT` in a pseudo-terminal whose engine blocks in its `block_step`-th step: yields
    the pexpect child while that step is blocked, then lets it end and checks the exit."""
    import pexpect

    release = tmp_path / "release"
    os.mkfifo(release)
    child = pexpect.spawn(sys.executable, ["-c", BLOCKING_STEP, "run", "--model", tiny, "--no-chat", "--max-tokens", "3",
                                           prompt], encoding="utf-8", timeout=120,
                          env={**os.environ, "BLOCK_STEP": str(block_step), "RELEASE_FIFO": str(release),
                               "TERM": "xterm", **env})
    try:
        yield child
        release.write_text("x")  # (waits for the step to open the FIFO, then lets it end)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_run_in_a_terminal_says_it_reads_the_prompt_until_the_first_token(tiny, tmp_path):
    with _run_in_a_terminal_with_a_blocked_step(tiny, tmp_path, "Once upon a time", 1) as child:
        child.expect(r"Reading the prompt \(\d+ tokens\)")  # (the prompt's step cannot end yet)


def test_run_in_a_terminal_shows_how_far_it_has_read_a_long_prompt(tiny, tmp_path):
    # Chunks of 64 tokens: the third step blocks with two of them computed, the second not yet
    # counted (no step has waited for it yet).
    with _run_in_a_terminal_with_a_blocked_step(tiny, tmp_path, "word " * 300, 3, MAX_BATCH_TOKENS="64") as child:
        child.expect(r"Reading the prompt: ([\d,]+) of ([\d,]+) tokens \((\d+)%\)")
        read, total, percent = (int(g.replace(",", "")) for g in child.match.groups())
        assert read == 64 and total > read and percent == 100 * read // total


def test_run_json(tiny):
    r = mlxserve("run", "--model", tiny, "--prompt", "Hello", "--json", "--temperature", "0", "--max-tokens", "6", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "timings"}
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == len(out["token_ids"]) == 6
    assert out["prompt_tokens"] > 0
    assert set(out["timings"]) == {"ttft_s", "decode_tok_s"}
    assert out["timings"]["ttft_s"] > 0


def test_run_streams_text_and_is_seeded(tiny):
    args = ("run", "--model", tiny, "Once upon a time", "--max-tokens", "12", "--seed", "7", "--temperature", "1.0", "--no-chat")
    first, second = mlxserve(*args), mlxserve(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "generated" in first.stderr  # the stats line


def test_run_writes_token_counts_as_its_spinner_does(tiny):
    """The line after the text writes the prompt's tokens as the spinner does ("Reading the
    prompt (1,051 tokens)"), thousands separated, and one as one token."""
    for prompt, says in (("x", r"1 prompt token, 1 generated, "),
                         ("The sky is blue. " * 150, r"1,\d\d\d prompt tokens, 1 generated, ")):
        r = mlxserve("run", "--model", tiny, "--no-chat", "--max-tokens", "1", prompt)
        assert r.returncode == 0 and re.match(says, r.stderr.splitlines()[-1]), r.stderr


def test_run_reads_prompt_from_stdin(tiny):
    r = mlxserve("run", "--model", tiny, "--json", "--temperature", "0", "--max-tokens", "3", stdin="Hello there")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 0


@pytest.mark.parametrize("args,needle", [
    (("run", "--model", "/no/such/model", "--prompt", "hi"), "no such file"),
    (("run", "--model", "not-a-known-alias", "--prompt", "hi"), "not-a-known-alias"),
    (("run", "--temperature", "-1", "--prompt", "hi"), "temperature"),
    # run's flags named as chat's are, in the same words (the server's messages name the API's fields)
    (("run", "--max-tokens", "0", "--prompt", "hi"), "--max-tokens must be a whole number >= 1, got 0"),
    (("chat", "--max-tokens", "0"), "--max-tokens must be a whole number >= 1, got 0"),
    (("run", "--top-p", "1.5", "--prompt", "hi"), "--top-p must be in (0, 1], got 1.5"),
    (("run", "--top-k", "-1", "--prompt", "hi"), "--top-k must be an integer >= 0 (0 disables it), got -1"),
    (("run", "--prompt", "hi", "there"), "give the prompt once"),
    (("run", "--temp", "3", "--prompt", "hi"), "--temperature must be a number from 0 to 2 (0 = greedy), got 3"),
    (("chat", "--temperature", "-3"), "--temperature must be a number from 0 to 2 (0 = greedy), got -3"),
    (("chat", "--temperature", "nan"), "--temperature must be a number from 0 to 2"),
    (("chat", "--temperature", "2.5"), "--temperature must be a number from 0 to 2 (0 = greedy), got 2.5"),
    (("run", "--memory-budget", "1e400", "hi"), "'1e400' is not a finite size"),
    (("run", "--memory-budget", "-5GB", "hi"), "--memory-budget: must be positive, got '-5GB'"),
    # An empty path, URL, model, host or key is an error, never as if the flag were left out
    # (bench wrote no file, chat ran in-process, serve listened on every interface). Each line
    # would fail later otherwise, with another message (--port 0, /no/such/model).
    (("run", "--model", "", "hi"), "argument --model: expected a value, got ''"),
    (("run", "-m", " ", "hi"), "argument -m: expected a value, got ' '"),
    (("bench", "--json", "", "--model", "/no/such/model"), "argument --json: expected a value, got ''"),
    (("bench", "--random-weights", "", "--model", "/no/such/model"), "argument --random-weights: expected a value"),
    (("chat", "--url", "", "--model", "/no/such/model"), "argument --url: expected a value, got ''"),
    (("chat", "--api-key", "", "--url", "http://127.0.0.1:9"), "argument --api-key: expected a value, got ''"),
    (("serve", "--host", "", "--port", "0"), "argument --host: expected a value, got ''"),
    (("serve", "--api-key", "", "--port", "0"), "argument --api-key: expected a value, got ''"),
    (("serve", "--served-model-name", "", "--port", "0"), "argument --served-model-name: expected a value"),
    (("serve", "--cors", "http://a.example", "--cors", "", "--port", "0"), "argument --cors: expected a value"),
    # an origin the server's string comparison would never match (it was accepted)
    (("serve", "--cors", "notanorigin", "--port", "9"), "--cors: 'notanorigin' is not an origin: give it as a browser"),
    (("serve", "--cors", "http://localhost:3000/", "--port", "9"), "--cors: 'http://localhost:3000/' is not an origin"),
    (("serve", "--cors", "*", "--cors", "localhost:3000", "--port", "9"), "--cors: 'localhost:3000' is not an origin"),
    (("serve", "--cors", "http://localhost:99999", "--port", "9"), "--cors: 'http://localhost:99999' is not an origin"),
    # written otherwise than a browser writes it: never matched, as above
    (("serve", "--cors", "HTTP://LocalHost:3000", "--port", "9"),
     "--cors: a browser sends 'HTTP://LocalHost:3000' as 'http://localhost:3000', and origins are compared as text"),
    (("serve", "--cors", "https://app.example:443", "--port", "9"), "as 'https://app.example', and origins"),
    (("serve", "--cors", "http://user@app.example", "--port", "9"), "as 'http://app.example', and origins"),
    # a key no HTTP header carries as it is: curl sent its UTF-8 and got 401 for ever (and
    # see test_an_api_key_that_no_header_carries_is_refused_by_chat_too)
    (("serve", "--api-key", "clé", "--port", "9"), "--api-key must be printable ASCII (it is sent in an HTTP header"),
    (("serve", "--api-key", " key", "--port", "9"), "--api-key must not start or end with a space"),
    (("run", "--draft-model", "", "hi"), "argument --draft-model: expected a value, got ''"),
    # With --url the server's engine runs the model: the engine's flags would do nothing.
    (("chat", "--url", "http://127.0.0.1:9", "--dtype", "float32"),
     "--dtype has no effect with --url: the server's engine runs the model (give it to `mlxserve serve`)"),
    (("chat", "--url", "http://127.0.0.1:9", "--gguf-mode", "exact"), "--gguf-mode has no effect with --url"),  # the default
    (("chat", "--url", "http://127.0.0.1:9", "--draft-tokens", "2", "--speculative", "dflash", "--draft-model", "x",
      "--memory-budget", "8GB", "--gguf-mode", "native-q4"),
     "--gguf-mode, --memory-budget, --speculative, --draft-model, --draft-tokens have no effect with --url"),
    (("chat", "--api-key", "KEY", "--model", "/no/such/model"), "--api-key is the key sent to --url: give --url too"),
    (("run", "--no-chat", "--system", "Be brief.", "hi"), "--system needs the chat template"),
    # both of a --x/--no-x pair: the last one given won
    (("run", "--chat", "--no-chat", "hi"), "argument --no-chat: not allowed with argument --chat"),
    (("run", "--no-chat", "--chat", "hi"), "argument --chat: not allowed with argument --no-chat"),
    (("pull", " "), "no model named"),
    (("pull", "--list", "qwen3-4b"), "--list lists every alias; it takes no model (got 'qwen3-4b')"),
    (("run", "--stop", "", "hi"), '--stop: stop strings must be non-empty strings, got [""]'),
    (("run", "--gguf-mode", "bogus", "hi"), "invalid choice: 'bogus'"),
    (("no-such-command",), "invalid choice: 'no-such-command'"),
    # an unknown option points at the command's own help, which lists its options
    (("run", "--no-such-flag", "hi"), "unrecognized arguments: --no-such-flag (`mlxserve run --help` lists"),
    (("bench", "--random-weights", "tiny", "extra"), "unrecognized arguments: extra (`mlxserve bench --help` lists"),
    (("--no-such-flag",), "unrecognized arguments: --no-such-flag (`mlxserve --help` lists"),
    # a home folder nobody has (pathlib raises RuntimeError: it was a traceback)
    (("run", "--model", "~mlxserve-no-such-user/m.gguf", "hi"),
     "~mlxserve-no-such-user/m.gguf: no home folder is known for ~mlxserve-no-such-user"),
    # JSON Schema's boolean schemas are JSON, not a file's name (and refused, as by the server)
    (("run", "--format", "true", "hi"), "--format: a JSON schema must be a JSON object; for the boolean schema true"),
    (("run", "--format", "~mlxserve-no-such-user/s.json", "hi"),
     "--format: cannot read the schema file ~mlxserve-no-such-user/s.json: no home folder is known"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = mlxserve(*args, stdin="")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxserve: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_an_api_key_that_no_header_carries_is_refused_by_chat_too():
    """`chat --url` failed in a codec's words ("'latin-1' codec can't encode characters in
    position 7-8") or in http.client's ("Invalid header value b'Bearer a\\nb'")."""
    r = mlxserve("chat", "--url", "http://127.0.0.1:9", "--api-key", "日本", stdin="hi\n")
    assert r.returncode == 2
    assert r.stderr.strip() == ("mlxserve: error: --api-key must be printable ASCII (it is sent in an HTTP "
                                "header, 'Authorization: Bearer KEY'), but holds '日'")
    r = mlxserve("chat", "--url", "http://127.0.0.1:9", env={"MLXSERVE_API_KEY": "a\nb"}, stdin="hi\n")
    assert r.returncode == 2
    assert r.stderr.strip() == ("mlxserve: error: MLXSERVE_API_KEY must be printable ASCII (it is sent in an HTTP "
                                "header, 'Authorization: Bearer KEY'), but holds '\\n'")


def test_every_flag_and_its_no_flag_together_are_refused(capsys):
    """Every --x/--no-x pair of every command (`run --chat --no-chat` took the last one); one
    flag given twice is no contradiction."""
    from mlxserve.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    pairs = [(name, flag, "--no-" + flag[2:]) for name, parser in commands.items()
             for flag in parser._option_string_actions if "--no-" + flag[2:] in parser._option_string_actions]
    assert ("run", "--chat", "--no-chat") in pairs
    for name, flag, no_flag in pairs:
        for given in ([flag, no_flag], [no_flag, flag]):
            with pytest.raises(SystemExit) as exited:
                build_parser().parse_args([name, *given])
            assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err, (name, given)
        build_parser().parse_args([name, no_flag, no_flag])


def test_chat_engine_flags_given_are_those_not_none():
    """chat tells the engine flags given (refused with --url) by their value: each defaults to
    None, and one given is named whatever its value, its default too."""
    from mlxserve.cli import CHAT_ENGINE_ONLY, _flags_given, build_parser

    parser = build_parser()
    assert all(getattr(parser.parse_args(["chat"]), dest) is None for dest in CHAT_ENGINE_ONLY)
    args = parser.parse_args(["chat", "--draft-tokens", "3", "--gguf-mode", "exact"])
    assert _flags_given(args, CHAT_ENGINE_ONLY) == ["--gguf-mode", "--draft-tokens"]


def test_chat_model_help_says_the_default_with_url_is_the_servers_first_model():
    """`chat --url` without --model chats with the server's first model (HTTPBackend), not
    the default model that --help named alone."""
    from mlxserve.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "with --url: the server's first model" in commands["chat"]._option_string_actions["--model"].help
    assert "--url" not in commands["run"]._option_string_actions["--model"].help


def test_serve_on_a_taken_port_fails_at_once_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist either: the port is checked first, before any loading.
        r = mlxserve("serve", "--model", "/no/such/model", "--port", str(port))
    assert r.returncode == 2 and "serving" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxserve: error: cannot listen on 127.0.0.1:"), r.stderr
    r = mlxserve("serve", "--model", "/no/such/model", "--host", "no-such-host.invalid")
    assert r.returncode == 2 and "cannot listen on no-such-host.invalid" in r.stderr


@pytest.mark.parametrize("where,says", [("missing", "does not exist"), ("/proc/version", "not writable")])
def test_bench_json_that_cannot_be_written_fails_before_the_run(tmp_path, where, says):
    """(/proc/version: os.access lets root write it; opening it for writing fails.)"""
    path = str(tmp_path / "no" / "b.json") if where == "missing" else where
    r = mlxserve("bench", "--random-weights", "tiny", "--json", path)
    assert r.returncode == 2 and "bench:" not in r.stderr  # nothing was loaded or run
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr


def test_bench_json_check_leaves_files_as_they_were(tmp_path):
    from mlxserve.bench import check_writable

    kept = tmp_path / "kept.json"
    kept.write_text("earlier results")
    check_writable(str(kept))
    check_writable(str(tmp_path / "new.json"))
    assert kept.read_text() == "earlier results" and not (tmp_path / "new.json").exists()


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    env = {"MLXSERVE_CACHE": str(tmp_path / "a-file" / "cache")}
    for args in (("pull", "smollm2-135m"), ("run", "--model", "smollm2-135m", "hi")):
        r = mlxserve(*args, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("mlxserve: error: cannot make the model folder")
        assert "MLXSERVE_CACHE" in r.stderr


def test_no_prompt_is_an_error(tiny):
    """No prompt at all is "no prompt"; one given that is empty or blank says so (a blank
    argument was told to give one as an argument)."""
    r = mlxserve("run", "--model", tiny, stdin="")
    assert r.returncode == 2 and "no prompt: give one as an argument" in r.stderr
    for args, says in [(("   ",), "the prompt is blank (only whitespace)"), (("--prompt", ""), "the prompt is empty"),
                       (("",), "the prompt is empty")]:
        r = mlxserve("run", "--model", tiny, *args)
        assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"mlxserve: error: {says}"), r.stderr
    r = mlxserve("run", "--model", tiny, stdin=" \n\t\n")
    assert r.returncode == 2 and "the prompt on stdin is blank (only whitespace)" in r.stderr, r.stderr


def test_a_piped_prompt_too_long_is_one_line(monkeypatch, capsys, tmp_path):
    """`yes | mlxserve run` read on until memory ran out: past MAX_PIPED_TEXT characters a
    piped prompt is refused in one line, as soon as it is seen (before the model loads)."""
    from mlxserve import cli, piped_input

    monkeypatch.setattr(piped_input, "MAX_PIPED_TEXT", 100)
    path = tmp_path / "prompt.txt"
    path.write_text("y\n" * 51)
    with open(path) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert cli.main(["run", "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err == ("mlxserve: error: the prompt on stdin has more than 100 characters, more than "
                                       "any model's context holds\n")


def test_a_piped_prompt_from_windows_is_taken_as_typed(monkeypatch, tmp_path):
    """A byte order mark before a piped prompt, and "\r" in its "\r\n" line ends, are not
    part of the prompt."""
    from mlxserve import cli

    prompts = []

    def prompt_ids(tokenizer, prompt, *args, **kwargs):
        prompts.append(prompt)
        raise cli.CLIError("seen")

    monkeypatch.setattr(cli, "_load", lambda *args: types.SimpleNamespace(tokenizer=None))
    monkeypatch.setattr(cli, "_prompt_ids", prompt_ids)
    path = tmp_path / "prompt.txt"
    path.write_bytes("\ufeffFirst line,\r\nsecond line.\r\n".encode())
    with open(path, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert cli.main(["run", "--model", "tiny"]) == 2
    assert prompts == ["First line,\nsecond line.\n"]


def test_a_prompt_longer_than_the_context_is_one_line(tiny):
    r = mlxserve("run", "--model", tiny, "--no-chat", stdin="hello world " * 3000, timeout=120)
    assert r.returncode == 2, r.stderr
    # counts with thousands separators, as the CLI writes them elsewhere
    assert re.match(r"mlxserve: error: the prompt has \d{1,3}(,\d{3})+ tokens, more than the model's context "
                    r"of 2,048$", r.stderr.strip().splitlines()[-1]), r.stderr
    assert "Traceback" not in r.stderr


def test_a_listing_whose_reader_goes_away_is_no_error():
    proc = subprocess.Popen([sys.executable, "-m", "mlxserve", "pull", "--list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.stdout.close()  # like `| head -0`: the first line written meets a closed pipe
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("command", [("models",), ("models", "--json"), ("doctor",)])
def test_a_table_whose_reader_goes_away_is_no_error(command, tmp_path):
    """What rich prints (the models table, doctor's report) meeting a closed pipe ends quietly
    with status 0, as print()'s listing does: rich's own handling exited with status 1, which
    for `mlxserve doctor | head -1` said that something was broken."""
    proc = subprocess.Popen([sys.executable, "-m", "mlxserve", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MLXSERVE_CACHE=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub")))
    proc.stdout.close()  # like `| head -0`: the first line written meets a closed pipe
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == ""


def test_a_reader_that_goes_away_is_no_error(tiny):
    proc = subprocess.Popen([sys.executable, "-m", "mlxserve", "run", "--model", tiny, "Once upon a time",
                             "--max-tokens", "500", "--ignore-eos", "--no-chat"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(1)  # generation has begun
    proc.stdout.close()  # like `| head -c 1`
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in proc.stderr.read()


def test_help_and_version():
    r = mlxserve("--help")
    assert r.returncode == 0
    for command in ("run", "serve", "chat", "bench", "pull", "models", "doctor"):
        assert command in r.stdout
    r = mlxserve("--version")
    from mlxserve import __version__

    assert r.returncode == 0 and r.stdout == f"mlxserve {__version__}\n"


def test_models_lists_cache_and_hf_cache(tmp_path, tiny, smollm2_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2_path.name).symlink_to(smollm2_path)
    r = mlxserve("models", "--json", env={"MLXSERVE_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)
    gguf_entries = [m for m in models if m["format"] == "gguf"]
    assert gguf_entries and gguf_entries[0]["quantization"] == "Q4_1"
    assert gguf_entries[0]["size_bytes"] > 90_000_000
    # The table, piped: each model's name and whole path on one line, to be copied from there.
    r = mlxserve("models", env={"MLXSERVE_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    assert any("smollm2-135m" in line and str(cache / "models" / smollm2_path.name) in line
               for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize("width", [40, 80])
def test_models_in_a_narrow_terminal_keeps_names_and_paths_whole(monkeypatch, tmp_path, width):
    """A terminal narrower than the table (80 columns: a path is some 70 of them) gets each
    model as lines of its own, the name and the path each whole on one line (the table folded
    both between box characters, and cut the quantization to 'Q4_…'); a wide one the table."""
    import io

    from rich.console import Console

    from mlxserve import cli, registry

    path = tmp_path / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    models = [registry.LocalModel("qwen2.5-coder-0.5b", path, 491_400_064, "gguf", "Q4_K_M", "mlxserve")]
    monkeypatch.setattr(registry, "list_local_models", lambda: models)
    for columns in (width, 300):
        out = io.StringIO()
        monkeypatch.setattr(cli, "output_console", lambda: Console(file=out, width=columns, force_terminal=True,
                                                                   no_color=True, _environ={}))
        assert cli.main(["models"]) == 0
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in out.getvalue().splitlines()]
        if columns == 300:
            assert any(line.startswith("│ qwen2.5-coder-0.5b ") for line in lines), lines
            continue
        assert lines == ["qwen2.5-coder-0.5b", "gguf, Q4_K_M, 491 MB, from mlxserve", str(path)]


def test_models_and_loading_print_names_and_paths_with_brackets_as_they_are(monkeypatch, tmp_path, tiny):
    """A model's name or path is text, not rich markup: "[red]" was taken for a style and
    dropped, and "[/x]" was rich's MarkupError, a traceback (`mlxserve models`, and the
    "Loading PATH …" line of run and chat in a terminal)."""
    import io

    from rich.console import Console

    from mlxserve import cli, registry

    (tmp_path / "v[red]2[").mkdir()
    model = tmp_path / "v[red]2[" / "x]"
    model.symlink_to(tiny, target_is_directory=True)
    out = io.StringIO()
    monkeypatch.setattr(cli, "output_console", lambda stderr=False: Console(
        file=out, width=300, force_terminal=True, no_color=True, _environ={}))
    assert cli._load(str(model), None).name == str(model)
    assert f"Loading {model} …" in out.getvalue()
    listed = [registry.LocalModel("m[red]x[/x]", model, 1_000_000, "mlx", "float32", "mlxserve")]
    monkeypatch.setattr(registry, "list_local_models", lambda: listed)
    for width in (300, 40):  # the table, and a model's lines of its own
        out.seek(0), out.truncate()
        monkeypatch.setattr(cli, "output_console", lambda: Console(file=out, width=width, force_terminal=True,
                                                                   no_color=True, _environ={}))
        assert cli.main(["models"]) == 0
        assert "m[red]x[/x]" in out.getvalue() and str(model) in out.getvalue(), out.getvalue()


def test_doctor_json():
    r = mlxserve("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["backend"] in ("cpu", "cuda", "metal")
    for key in ("mlx", "mlx_lm", "mlxserve", "memory", "cache_dir", "default_model", "checks"):
        assert key in report


def test_pull_without_a_model_pulls_the_default(tmp_path, smollm2_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / smollm2_path.name).symlink_to(smollm2_path)
    r = mlxserve("pull", env={"MLXSERVE_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "models" / smollm2_path.name)


def test_pull_list():
    r = mlxserve("pull", "--list")
    assert r.returncode == 0
    assert "smollm2-135m" in r.stdout


def test_memory_budget_flag(tiny):
    r = mlxserve("run", "--model", tiny, "--prompt", "Hello", "--json", "--temperature", "0", "--max-tokens", "4",
                 "--memory-budget", "2MiB")
    assert r.returncode == 0, r.stderr
    r = mlxserve("run", "--model", tiny, "--prompt", "Hello", "--memory-budget", "lots")
    assert r.returncode == 2 and "--memory-budget" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("run", "hi"), ("serve",), ("chat",), ("bench",)])
def test_a_memory_budget_beyond_the_machines_memory_is_a_warning(command, monkeypatch, capsys):
    """A --memory-budget of more memory than the machine has limits nothing: it was taken
    without a word. It is said in one line at start, before the model loads (here none
    does: the model is missing, which is the error that follows); a budget within memory
    says nothing."""
    import io

    from live_server import free_port
    from mlxserve import cli, memory

    if command == ("serve",):
        command += ("--port", str(free_port()))  # (serve takes its port before it loads the model)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 24 * 2**30)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # (chat's question)
    args = [*command, "--model", "/no/such/model"]
    assert cli.main([*args, "--memory-budget", "500GiB"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "warning: --memory-budget 500GiB is more than this machine's 25.8 GB of device memory: memory runs out "
        "before the KV cache reaches it",
        "mlxserve: error: no such file or folder: /no/such/model (check the path)"]
    assert cli.main([*args, "--memory-budget", "20GiB"]) == 2
    assert "warning" not in capsys.readouterr().err


def test_parse_size():
    from mlxserve.memory import parse_size

    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5gib") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    for bad in ("", "GB", "-1GB", "8XB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("command", ["run", "serve", "bench"])
def test_an_engine_that_fails_to_start_is_one_line(tiny, command):
    """The engine's RuntimeError("engine failed to start: ...") — here a KV budget smaller than
    one slot — is the command's one-line error, not a traceback."""
    import socket

    with socket.socket() as s:  # a port free a moment ago
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = {"run": ("run", "--model", tiny, "hi"),
            "serve": ("serve", "--model", tiny, "--port", port),
            "bench": ("bench", "--model", tiny, "--concurrency", "1", "--prompt-tokens", "8",
                      "--gen-tokens", "2", "--runs", "1", "--warmup", "0")}[command]
    r = mlxserve(*args, "--memory-budget", "1KB")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxserve: error: engine failed to start: the KV memory budget"), r.stderr
    assert last.endswith("raise --memory-budget")


def test_mlx_without_a_back_end_library_is_one_line_naming_the_extras(monkeypatch, capsys):
    """On Linux the mlx wheel alone has no back-end (mlxserve installed without an extra):
    importing mlx.core fails on libmlx.so, which is said in one line with what to install:
    MLX's back-end package for the mlx installed, or mlxserve again from its clone with the
    extra. Never `pip install mlxserve[...]`: mlxserve is not on PyPI, so that would fetch
    whatever a package index has under the name."""
    from importlib.metadata import version

    from mlxserve import cli

    def no_back_end(args):
        raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cli, "cmd_models", no_back_end)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "libmlx.so" in err
    assert f"pip install 'mlx[cpu]=={version('mlx')}'" in err and f"'mlx[cuda13]=={version('mlx')}'" in err
    assert "mlxserve[" not in err and "the extra cpu or cuda" in err


def test_run_no_think_reaches_the_chat_template(tiny_model_dir, tmp_path):
    """`--no-think` sets the template's enable_thinking to false, as Qwen3's template reads it."""
    import shutil

    folder = tmp_path / "thinker"
    shutil.copytree(tiny_model_dir("qwen3", "float32"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] += "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    counts = []
    for extra in ([], ["--no-think"]):
        r = mlxserve("run", "hi", "--model", str(folder), "--max-tokens", "1", "--json", *extra)
        assert r.returncode == 0, r.stderr
        counts.append(json.loads(r.stdout)["prompt_tokens"])
    assert counts[1] > counts[0]
    r = mlxserve("run", "hi", "--model", str(folder), "--no-chat", "--no-think")
    assert r.returncode != 0 and "--no-think needs the chat template" in r.stderr


def test_run_system_empty_leaves_the_templates_default_out(tiny_model_dir, tmp_path):
    """`run --system ''` sends an empty system message, as `chat --system ''` does (and as the
    server takes one from a client): the chat template then adds no default system prompt of
    its own, as Qwen2.5's does ("You are Qwen, …"). Without --system it does."""
    import shutil

    from mlxserve.cli import _prompt_ids
    from mlxserve.openai_api import _chat_prompt
    from mlxserve.tokenizer import Tokenizer

    folder = tmp_path / "defaulter"
    shutil.copytree(tiny_model_dir("qwen3", "float32"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDEFAULT SYSTEM<|im_end|>\n"
                               "{% endif %}" + config["chat_template"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_folder(folder)
    assert "DEFAULT SYSTEM" in tokenizer.decode(_prompt_ids(tokenizer, "hi", None, None))
    empty = _prompt_ids(tokenizer, "hi", None, "")
    assert "DEFAULT SYSTEM" not in tokenizer.decode(empty)
    assert empty == _chat_prompt({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]},
                                 tokenizer, None)


def test_run_format_holds_the_answer_to_a_schema(tiny_model_dir, tmp_path):
    """`run --format SCHEMA`: the answer is JSON of that schema, and the chat template is asked
    to leave thinking out, as with --no-think; a schema that cannot be used is one line."""
    import shutil

    folder = tmp_path / "thinker"
    shutil.copytree(tiny_model_dir("qwen3", "float32"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] += "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                   "ok": {"type": "boolean"}},
                                  "required": ["n", "ok"], "additionalProperties": False}))
    runs = []
    for extra in (["--no-think"], ["--format", str(schema)]):
        r = mlxserve("run", "hi", "--model", str(folder), "--max-tokens", "30", "--temperature", "0", "--json", *extra)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    assert runs[1]["prompt_tokens"] == runs[0]["prompt_tokens"]
    answer = json.loads(runs[1]["text"])
    assert set(answer) == {"n", "ok"} and answer["n"] in range(10) and isinstance(answer["ok"], bool)
    assert runs[1]["finish_reason"] == "stop"
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's JSON parser goes
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes([0xCB, 0x80, 0xFF]) * 100)
    for value, says in [('{"type": "foo"}', "--format: the grammar cannot be used: Invalid type: foo"),
                        (str(binary), f"--format: cannot read the schema file {binary}: it is not UTF-8 text"),
                        (str(tmp_path / "missing.json"), "--format: cannot read the schema file"),
                        ("[1, 2]", "--format: a JSON schema must be a JSON object"),
                        (str(deep), "--format: the schema is not valid JSON"),
                        ("", "--format: give 'json', a JSON schema's file, or the schema itself")]:
        r = mlxserve("run", "hi", "--model", str(folder), "--format", value)
        assert r.returncode == 2 and says in r.stderr and r.stderr.strip().count("\n") <= 1, r.stderr
