"""The Homebrew formula and the hash-locked requirements it installs from.

The formula can only be installed on a Mac; here it is parsed by Debian's ruby, checked against
pyproject.toml, and the locks are checked against a fresh resolution for macOS arm64 from pip's
default index (the network tests: pip metadata only, no wheels of any size are installed).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMULA = ROOT / "Formula" / "mlxserve.rb"


def _load_script():
    spec = importlib.util.spec_from_file_location("lock_requirements",
                                                  ROOT / "scripts" / "lock_requirements.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


L = _load_script()
LOCKS = {"runtime": L.RUNTIME_LOCK, "build": L.BUILD_LOCK}
PYPROJECT = L._pyproject()


@pytest.fixture(scope="module")
def runtime_lock():
    return L.parse(L.RUNTIME_LOCK)


# ---- the formula

def test_formula_parses_with_ruby():
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.fail("ruby is not installed, so the Homebrew formula cannot be checked: "
                    "`apt-get install -y ruby` (.ci/run does this on a machine without it)")
    r = subprocess.run([ruby, "-wc", str(FORMULA)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Syntax OK"
    assert r.stderr == "", f"ruby warns: {r.stderr}"


def test_formula_matches_the_project():
    text = FORMULA.read_text()
    assert re.search(r'^\s*version "([^"]+)"', text, re.MULTILINE).group(1) == PYPROJECT["project"]["version"]
    assert re.search(r'^\s*license "([^"]+)"', text, re.MULTILINE).group(1) == PYPROJECT["project"]["license"]
    python = L.formula_python(text)
    # The interpreter the formula builds its virtualenv with is the one it depends on.
    assert f'Formula["python@{python}"].opt_bin/"python{python}"' in text
    # It installs exactly the two locks, hash-checked and without dependency resolution, then
    # the package itself without dependencies or an index.
    assert set(re.findall(r'buildpath/"(requirements/[^"]+)"', text)) == {
        str(p.relative_to(ROOT)) for p in LOCKS.values()}
    locked = re.search(r"locked = \[(.*?)\]", text).group(1)
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:", "-r"):
        assert f'"{flag}"' in locked
    assert re.search(r'"install", "--no-deps", "--no-build-isolation", "--no-index", buildpath', text)
    # Apple-Silicon macOS only, with a message for everyone else.
    assert "depends_on AppleSiliconMacRequirement" in text
    assert re.search(r"satisfy\(build_env: false\) \{ OS\.mac\? && Hardware::CPU\.arm\?", text)
    assert "fatal true" in text and "On Linux" in text
    test_block = text[text.index("test do"):]
    assert '#{bin}/mlxserve --version' in test_block
    assert '#{bin}/mlxserve doctor --json' in test_block


def test_no_index_or_host_urls():
    """The only address in the formula is the tap's own clone, built at load time; the locks
    carry names, versions and hashes only."""
    text = FORMULA.read_text()
    addresses = re.findall(r"[a-z+]+://\S*", text)
    assert addresses == ['file://#{File.expand_path("..",'], addresses
    for path in LOCKS.values():
        lock_text = path.read_text()
        assert "://" not in lock_text and not re.search(r"--(extra-)?index-url|--find-links|-f ",
                                                        lock_text)


# ---- the locks, without the network

@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_every_lock_entry_is_pinned_with_a_sha256(kind):
    text = LOCKS[kind].read_text()
    entries = L.logical_lines(text)
    assert entries, "empty lock"
    for entry in entries:
        name_version, *options = entry.split()
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*==[0-9][^=\s]*", name_version), entry
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o) for o in options), entry
    names = [e.split("==")[0] for e in entries]
    assert len(names) == len(set(names)) == len(L.parse(LOCKS[kind]).pins)


def test_lock_headers_match_pyproject_and_formula():
    assert L.check(network=False) == []


def test_header_check_notices_changed_inputs(runtime_lock):
    reqs = list(PYPROJECT["project"]["dependencies"])
    python = L.formula_python()
    assert L.check_header(runtime_lock, reqs, python) == []
    changed = L.check_header(runtime_lock, [*reqs, "pexpect>=4.8"], python)
    assert len(changed) == 1 and "pexpect>=4.8" in changed[0]
    assert "CPython" in L.check_header(runtime_lock, reqs, "3.99")[0]


def test_render_and_parse_round_trip(runtime_lock):
    again = L.parse_text(L.render(runtime_lock), L.RUNTIME_LOCK)
    assert again.requirements == runtime_lock.requirements
    assert {n: (p.version, p.hashes) for n, p in again.pins.items()} == \
        {n: (p.version, p.hashes) for n, p in runtime_lock.pins.items()}


# ---- the locks against a fresh resolution (pip's default index)

def test_locks_are_the_macos_arm64_closure(runtime_lock):
    """Resolving pyproject.toml again for each macOS arm64 platform, held to the locked versions,
    lands on exactly the locked packages, on files whose hashes are locked."""
    for kind, path in LOCKS.items():
        reqs = L.runtime_requirements() if kind == "runtime" else L.build_requirements()
        assert L.check_resolution(L.parse(path), reqs) == []
    # Resolved for macOS, not for this machine: mlx's Darwin-only Metal library is in,
    # the Linux CPU build that pyproject asks for on Linux is not.
    assert "mlx-metal" in runtime_lock.pins and "mlx-cpu" not in runtime_lock.pins


def test_stale_locks_fail_the_check(runtime_lock):
    one_platform = L.Lock(runtime_lock.path, runtime_lock.title, runtime_lock.python,
                          runtime_lock.platforms[:1], runtime_lock.requirements, runtime_lock.pins)
    reqs = list(runtime_lock.requirements)
    # A dependency added to pyproject.toml and another dropped, without regenerating.
    changed = [r for r in reqs if not r.startswith("prompt_toolkit")] + ["pexpect>=4.8"]
    problems = L.check_resolution(one_platform, changed)
    assert any("also needs" in p and "'pexpect'" in p for p in problems), problems
    assert any("no longer needs" in p and "'prompt-toolkit'" in p for p in problems), problems
    # A lower bound raised past the locked version.
    raised = [r for r in reqs if not r.startswith("numpy")] + ["numpy>=999"]
    problems = L.check_resolution(one_platform, raised)
    assert len(problems) == 1 and "failed" in problems[0], problems


def test_formula_pip_command_accepts_the_lock(runtime_lock):
    """The formula's own `pip install --require-hashes --no-deps -r LOCK`, dry-run as a macOS
    arm64 CPython would run it: pip checks each picked file against the locked hashes."""
    args = ["--require-hashes", "--no-deps", "-r", str(L.RUNTIME_LOCK)]

    def run(platform):
        return L.report_pins(L.pip_report(args, python=runtime_lock.python, platform=platform))

    with ThreadPoolExecutor(len(runtime_lock.platforms)) as pool:
        results = list(pool.map(run, runtime_lock.platforms))
    for pins in results:
        assert {n: p.version for n, p in pins.items()} == \
            {n: p.version for n, p in runtime_lock.pins.items()}
    # Each macOS version picks its own mlx wheel, and the lock holds all of them.
    mlx_files = set().union(*(pins["mlx"].files for pins in results))
    assert len(mlx_files) == len(runtime_lock.platforms)
    assert set().union(*(pins["mlx"].hashes for pins in results)) == runtime_lock.pins["mlx"].hashes
