"""Every script in examples/ runs against a live server on a tiny model (and the tool-calling
one against a server whose model answers with a tool call)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from live_server import SCRIPT, LiveServer, ScriptedEngine
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


def run_example(name: str, url: str) -> subprocess.CompletedProcess:
    command = ["bash", str(EXAMPLES / name)] if name.endswith(".sh") else [sys.executable, str(EXAMPLES / name)]
    env = dict(os.environ, MLXSERVE_URL=url, MLXSERVE_MODEL=MODEL)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", ["curl_chat.sh", "curl_stream.sh", "openai_sync.py", "openai_stream.py", "openai_async.py"])
def test_example_runs(live, name):
    r = run_example(name, live.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    if name == "curl_stream.sh":
        assert r.stdout.rstrip().endswith("data: [DONE]")
    if name == "curl_chat.sh":
        assert '"object":"chat.completion"' in r.stdout.replace(" ", "")


def test_tools_example_runs_the_tool(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    server = LiveServer(create_app(ScriptedEngine(loaded, SCRIPT), MODEL))
    try:
        r = run_example("openai_tools.py", server.url)
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr
    assert "tool call: get_weather({'city': 'Paris'})" in r.stdout
