"""Every script in examples/ runs against a live server on a tiny model (and the tool-calling
one against a server whose model answers with a tool call)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import SCRIPT, LiveServer, ScriptedEngine

import mlxserve
from mlxserve.engine import Engine
from mlxserve.loader import load_model
from mlxserve.server import create_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = "tiny"


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded) as engine:
        server = LiveServer(create_app(engine, MODEL))
        yield server
        server.stop()


def run_example(name: str, url: str, model: str | None = MODEL) -> subprocess.CompletedProcess:
    command = ["bash", str(EXAMPLES / name)] if name.endswith(".sh") else [sys.executable, str(EXAMPLES / name)]
    env = {k: v for k, v in os.environ.items() if k != "MLXSERVE_MODEL"}
    env["MLXSERVE_URL"] = url
    if model is not None:
        env["MLXSERVE_MODEL"] = model
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", ["curl_chat.sh", "curl_stream.sh", "openai_sync.py", "openai_stream.py", "openai_async.py",
                                  "openai_structured.py", "openai_embeddings.py", "openai_responses.py",
                                  "openai_background.py"])
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
    # Each later turn starts with the whole previous prompt: at least its whole 64-token
    # blocks come from the cache, and the new question is computed.
    assert p1 < p2 < p3
    assert 64 * (p1 // 64) <= c2 < p2 and c2 % 64 == 0
    assert max(c2, 64 * (p2 // 64)) <= c3 < p3 and c3 % 64 == 0


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

