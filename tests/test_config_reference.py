"""docs/configuration.md is what scripts/gen_config_reference.py writes from the CLI parser and
the environment variables the code reads, and the generator misses neither."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from mlxserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


G = _load_script()


def test_committed_reference_is_current():
    committed = G.OUTPUT.read_text() if G.OUTPUT.is_file() else ""
    assert committed == G.generate(), (
        "docs/configuration.md is out of date: run python scripts/gen_config_reference.py")


def test_every_command_and_option_is_in_the_reference():
    text = G.generate()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "`--version`" in text
    for name, command in sub.choices.items():
        section = text.split(f"### mlxserve {name}\n", 1)[1].split("\n### ", 1)[0]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section, (name, option)
            if action.help and "%(" not in action.help and "%%" not in action.help:
                assert " ".join(action.help.split()).replace("|", "\\|") in section, (name, action.dest)


def test_environment_reads_are_found(tmp_path, monkeypatch):
    source = tmp_path / "m.py"
    source.write_text(
        "import os\nfrom os import environ, getenv\n"
        "a = os.environ.get('A_VAR')\nb = os.getenv('B_VAR', 'x')\nc = os.environ['C_VAR']\n"
        "d = 'D_VAR' in os.environ\ne = environ.get('E_VAR')\nf = getenv('F_VAR')\n"
        "os.environ['SET_ONLY'] = '1'\ng = dict(os.environ, H_NOT_READ='1')\n")
    monkeypatch.setattr(G, "ROOT", tmp_path)  # file names in the result are relative to it
    found = G.python_env_reads([source])
    assert set(found) == {"A_VAR", "B_VAR", "C_VAR", "D_VAR", "E_VAR", "F_VAR"}


def test_code_variables_are_all_described():
    code = G.python_env_reads(sorted(G.SRC.rglob("*.py")))
    assert {"MLXSERVE_CACHE", "MLXSERVE_HOME", "HF_HUB_OFFLINE"} <= set(code)
    assert set(code) == set(G.ENV_DESCRIPTIONS)
    text = G.generate()
    for name in code:
        assert f"| `{name}` |" in text


def test_an_undescribed_variable_stops_the_generator(monkeypatch):
    monkeypatch.delitem(G.ENV_DESCRIPTIONS, "MLXSERVE_CACHE")
    with pytest.raises(G.ReferenceError_, match="MLXSERVE_CACHE read in src/mlxserve"):
        G.generate()
    monkeypatch.setitem(G.ENV_DESCRIPTIONS, "MLXSERVE_CACHE", "restored")
    monkeypatch.setitem(G.ENV_DESCRIPTIONS, "MLXSERVE_GONE", "nothing reads this")
    with pytest.raises(G.ReferenceError_, match="MLXSERVE_GONE .* no longer read"):
        G.generate()
