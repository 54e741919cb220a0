"""Every script in examples/ runs against a live server on a tiny model (and the tool-calling
one against a server whose model answers with a tool call)."""

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from live_server import SCRIPT, LiveServer, ScriptedEngine

import mlxserve
from mlxserve.engine import Engine
from mlxserve.loader import load_model
from mlxserve.server import create_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = "tiny"


class Recorder:
    """An ASGI app in front of another that keeps every HTTP exchange it passes on, as a dict:
    path, request and response (the bodies' bytes, a stream's events all together), so that a
    test can hold a client's output against exactly what the server sent it. While `barrier`
    is set (a threading.Barrier), each chat request waits at it before the app has it: a test
    can check that a client had that many requests in flight at once."""

    def __init__(self, app):
        self.app, self.exchanges, self.barrier = app, [], None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = {"path": scope["path"], "request": b"", "response": b""}
        self.exchanges.append(exchange)
        if self.barrier is not None and scope["path"] == "/v1/chat/completions":
            await asyncio.to_thread(self.barrier.wait)  # (BrokenBarrierError once its timeout passes)

        async def receive_kept():
            message = await receive()
            if message["type"] == "http.request":
                exchange["request"] += message.get("body", b"")
            return message

        async def send_kept(message):
            if message["type"] == "http.response.body":
                exchange["response"] += message.get("body", b"")
            await send(message)

        await self.app(scope, receive_kept, send_kept)


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded) as engine:
        recorder = Recorder(create_app(engine, MODEL))
        server = LiveServer(recorder)
        server.recorder = recorder
        yield server
        server.stop()


def chat_exchanges(live, since: int) -> list[dict]:
    """The chat-completion exchanges the live server has had since `since` (an index into
    its recorder's exchanges), each with its request parsed."""
    return [dict(e, body=json.loads(e["request"])) for e in live.recorder.exchanges[since:]
            if e["path"] == "/v1/chat/completions"]


def as_read(text: str) -> str:
    """Text as run_example's output holds it once printed: read in text mode, a \\r\\n or \\r
    (which a random model writes) becomes \\n."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def stream_events(response: bytes) -> list:
    """A server-sent event stream's data, each event's JSON parsed ("[DONE]" as is)."""
    data = [line[len("data: "):] for line in response.decode().splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def run_example(name: str, url: str, model: str | None = MODEL) -> subprocess.CompletedProcess:
    command = ["bash", str(EXAMPLES / name)] if name.endswith(".sh") else [sys.executable, str(EXAMPLES / name)]
    env = {k: v for k, v in os.environ.items() if k != "MLXSERVE_MODEL"}
    env["MLXSERVE_URL"] = url
    if model is not None:
        env["MLXSERVE_MODEL"] = model
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", ["curl_chat.sh", "curl_stream.sh", "openai_structured.py", "openai_embeddings.py",
                                  "openai_responses.py", "openai_background.py"])
def test_example_runs(live, name):
    r = run_example(name, live.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    if name == "curl_stream.sh":
        assert r.stdout.rstrip().endswith("data: [DONE]")
    if name == "curl_chat.sh":
        assert '"object":"chat.completion"' in r.stdout.replace(" ", "")
    if name == "openai_structured.py":
        assert r.stdout.startswith("City(name=") and "population" in r.stdout
    if name == "openai_responses.py":
        assert re.search(r"\[\d+ input tokens, \d+ from the prefix cache\]", r.stdout), r.stdout
    if name == "openai_background.py":  # (the second one may have ended before the cancel: then as it ended)
        assert re.search(r"\[(completed|incomplete), \d+ tokens\]\n\[cancelled: (cancelled|completed|incomplete)\]$",
                         r.stdout), r.stdout
    if name == "openai_embeddings.py":
        *ranked, figures = r.stdout.splitlines()
        assert len(ranked) == 3 and figures.endswith("64 dimensions]")  # the tiny model's hidden size


def test_sync_example_prints_the_answer_and_its_token_counts(live):
    since = len(live.recorder.exchanges)
    r = run_example("openai_sync.py", live.url)
    assert r.returncode == 0, r.stderr
    [exchange] = chat_exchanges(live, since)
    assert [m["role"] for m in exchange["body"]["messages"]] == ["system", "user"]
    assert exchange["body"]["model"] == MODEL and not exchange["body"].get("stream")
    reply = json.loads(exchange["response"])
    answer, usage = reply["choices"][0]["message"]["content"], reply["usage"]
    # (Not that the answer has text: a random model may end it at once.)
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 64  # its max_tokens
    # The answer as the server sent it, then the server's token counts.
    counts = f"[{usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated]"
    assert r.stdout == as_read(f"{answer}\n{counts}\n")


def test_stream_example_prints_the_streamed_text_as_one(live):
    since = len(live.recorder.exchanges)
    r = run_example("openai_stream.py", live.url)
    assert r.returncode == 0, r.stderr
    [exchange] = chat_exchanges(live, since)
    assert exchange["body"]["stream"] is True
    events = stream_events(exchange["response"])
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
    pieces = [p for p in pieces if p]
    # (Not how many pieces had text: a random model may end its answer at once.)
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # Every piece, in order, on one line.
    assert r.stdout == as_read("".join(pieces) + "\n")


def test_async_example_asks_its_questions_at_once_and_prints_each_answer(live):
    since = len(live.recorder.exchanges)
    # The server takes in no question until all four have come: they were asked at once.
    live.recorder.barrier = threading.Barrier(4, timeout=30)
    try:
        r = run_example("openai_async.py", live.url)
    finally:
        live.recorder.barrier = None
    assert r.returncode == 0, r.stderr
    exchanges = chat_exchanges(live, since)
    answers = {}
    for e in exchanges:
        [message] = e["body"]["messages"]
        answers[message["content"]] = json.loads(e["response"])["choices"][0]["message"]["content"]
    assert len(answers) == len(exchanges) == 4
    # One line a question, each with the server's answer to that question.
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    printed = dict(line.split(" -> ", 1) for line in lines)
    assert printed == {question: repr(answer) for question, answer in answers.items()}


def test_tools_example_runs_the_tool(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    server = LiveServer(create_app(ScriptedEngine(loaded, SCRIPT), MODEL))
    try:
        runs = [run_example("openai_tools.py", server.url),
                run_example("openai_tools.py", server.url, model=None)]  # the server's model by default
    finally:
        server.stop()
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "tool call: get_weather({'city': 'Paris'})" in r.stdout


def test_the_tools_example_makes_a_call_with_a_real_engine(live):
    """tool_choice "required" makes even a random tiny model call the tool, with a city."""
    r = run_example("openai_tools.py", live.url)
    assert r.returncode == 0, r.stderr
    # (The arguments' repr: a city with a ' in it is quoted with ", as the random model may write.)
    assert re.search(r"tool call: get_weather\(\{'city': ['\"]", r.stdout), r.stdout


def test_multi_turn_chat_reuses_the_prefix(live):
    r = run_example("multi_turn_chat.py", live.url)
    assert r.returncode == 0, r.stderr
    figures = [tuple(map(int, m)) for m in
               re.findall(r"\[prompt (\d+) tokens, (\d+) from the prefix cache", r.stdout)]
    assert len(figures) == 3, r.stdout
    (p1, c1), (p2, c2), (p3, c3) = figures
    assert c1 == 0  # nothing of this conversation was seen before
    # Each later turn starts with the whole previous prompt and answer: they come from the
    # cache, to the token, and only the new question is computed.
    assert p1 < p2 < p3
    assert p1 <= c2 < p2 and p2 <= c3 < p3


def _cli_env(tmp_path) -> dict:
    """An environment whose `mlxserve` on PATH is this interpreter's package (the scripts
    call the command)."""
    shim = tmp_path / "bin" / "mlxserve"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mlxserve "$@"\n')
    shim.chmod(0o755)
    package_root = str(Path(mlxserve.__file__).resolve().parent.parent)  # installed or src/
    return dict(os.environ, PATH=f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("script,drafter", [("speculative.sh", "ngram"), ("dflash.sh", "dflash")])
def test_speculative_examples_print_both_runs_and_the_same_text(tmp_path, tiny_model_dir, script, drafter):
    folder = tiny_model_dir("qwen3", "float32")
    env = dict(_cli_env(tmp_path), MLXSERVE_MODEL=str(folder))
    if drafter == "dflash":
        from tiny_models import make_tiny_dflash_draft

        draft = make_tiny_dflash_draft(tmp_path / "draft", load_model(str(folder), progress=False).model)
        env["MLXSERVE_DRAFT_MODEL"] = str(draft)
    r = subprocess.run(["bash", str(EXAMPLES / script), "--max-tokens", "40", "--ignore-eos"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    *answer, plain, speculative, same = r.stdout.rstrip("\n").splitlines()
    assert plain.startswith("plain ") and "40 tokens" in plain and "draft" not in plain
    assert speculative.startswith(f"--speculative {drafter}") and "40 tokens" in speculative
    assert re.search(r"\d+ of \d+ draft tokens accepted", speculative)
    assert same == "same text: yes"


def test_bench_example(tmp_path):
    env = _cli_env(tmp_path)
    # An extra flag is passed on and wins over the script's own --gen-tokens 16.
    r = subprocess.run(["bash", str(EXAMPLES / "bench.sh"), "--gen-tokens", "8"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "speedup" in r.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["config"]["random_weights"] == "tiny"
    assert data["config"]["gen_tokens"] == 8
    for engine in ("mlxserve", "mlx-lm"):
        levels = data["results"][engine]["concurrency"]
        assert [level["concurrency"] for level in levels] == [1, 4]
        for level in levels:
            assert level["median"]["generated_tokens"] == 8 * level["requests"]
            assert level["median"]["total_tok_s"] > 0
    reuse = data["results"]["mlxserve"]["prefix_reuse"]["median"]
    assert reuse["cached_tokens"] >= 256 - 64

