"""How mlxserve is packaged: pyproject.toml, the sdist and wheel, the README's install commands,
the Homebrew formula and the hash-locked requirements it installs from.

The formula can only be installed on a Mac; here it is parsed by Debian's ruby, checked against
pyproject.toml, and the locks are checked against a fresh resolution for macOS arm64 from pip's
default index (the network tests: pip metadata only, no wheels of any size are installed). The
sdist and wheel are built offline with the installed setuptools, from a copy of the tree.
"""

from __future__ import annotations

import ast
import email.parser
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FORMULA = ROOT / "Formula" / "mlxserve.rb"
README = ROOT / "README.md"


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


def _version() -> str:
    """src/mlxserve/__init__.py's __version__, read as setuptools reads it (statically)."""
    tree = ast.parse((ROOT / "src" / "mlxserve" / "__init__.py").read_text())
    found = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
    assert len(found) == 1, "src/mlxserve/__init__.py must assign __version__ exactly once"
    return found[0]


def test_version_has_one_source():
    """pyproject takes the version from mlxserve.__version__; it writes none of its own."""
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mlxserve.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version())


def test_formula_version_is_the_package_version():
    formula = re.findall(r'^\s*version "([^"]+)"', FORMULA.read_text(), re.MULTILINE)
    assert formula == [_version()], f"Formula/mlxserve.rb says {formula}, mlxserve {_version()}"


def test_formula_passes_brew_audits_desc_and_homepage_rules():
    """The rules of Homebrew's desc and homepage cops (rubocops/shared/desc_helper.rb,
    rubocops/homepage.rb) that `brew audit` applies to this formula."""
    text = FORMULA.read_text()
    descs = re.findall(r'^  desc "([^"]*)"$', text, re.MULTILINE)
    assert len(descs) == 1, descs
    desc = descs[0]
    assert 0 < len(desc) <= 80, f"desc is {len(desc)} characters: {desc!r}"
    assert desc == desc.strip()
    assert not re.match(r"(the|an?)\s", desc, re.IGNORECASE), "desc starts with an article"
    assert desc[0].isupper(), "desc starts with a lower-case letter"
    assert not re.match(r"mlx[\s-]?serve\b", desc, re.IGNORECASE), "desc starts with the name"
    assert not desc.endswith("."), "desc ends with a full stop"
    assert not re.search(r"command ?line", desc, re.IGNORECASE)
    homepages = re.findall(r'^  homepage "([^"]*)"$', text, re.MULTILINE)
    assert len(homepages) == 1 and homepages[0].startswith("https://"), homepages


def test_formula_matches_the_project():
    text = FORMULA.read_text()
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
    """The only addresses in the formula are its homepage (which `brew audit` demands) and the
    tap's own clone, built at load time: nothing is downloaded from a host. The locks carry
    names, versions and hashes only."""
    text = FORMULA.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    addresses = re.findall(r"[a-z+]+://\S*", code)
    homepage = re.search(r'^  homepage "([^"]+)"$', code, re.MULTILINE).group(1)
    assert addresses == [f'{homepage}"', 'file://#{File.expand_path("..",'], addresses
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
    # Resolved for macOS, not for this machine: mlx's Darwin-only Metal library is in, the
    # Linux CPU build (pyproject's `cpu` extra, which the formula does not ask for) is not.
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


# ---- pyproject.toml: MLX's back-end, Python, the build backend

def _pyproject_requirements() -> list[Requirement]:
    """pyproject's dependencies as a wheel's Requires-Dist states them (extras as markers)."""
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, texts in project["optional-dependencies"].items():
        for text in texts:
            req = Requirement(text)
            marker = f"({req.marker}) and " if req.marker else ""
            reqs.append(Requirement(f"{str(req).split(';')[0]}; {marker}extra == '{extra}'"))
    return reqs


def _backends(sys_platform: str, extras: set[str], reqs: list[Requirement] | None = None) -> set[str]:
    """mlx's back-end extras (cpu, cuda13, ...) that `pip install ".[extras]"` asks for on
    `sys_platform`; every mlx requirement it acts on has a lower bound."""
    reqs = _pyproject_requirements() if reqs is None else reqs
    found = []
    for req in (r for r in reqs if r.name == "mlx"):
        envs = [{"sys_platform": sys_platform, "platform_system": sys_platform.title(), "extra": e}
                for e in ("", *sorted(extras))]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            found.append(req)
    assert found and all(r.specifier for r in found), found
    return set().union(*(r.extras for r in found))


def test_linux_backend_is_one_extra_or_the_other():
    """mlx[cpu] and mlx[cuda13] install the same mlx/lib/libmlx.so: the base dependencies must
    name neither, and each extra exactly one, so `.[cuda]` is CUDA and `.[cpu]` is the CPU."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert _backends("linux", set()) == set()
    assert _backends("linux", {"cpu"}) == {"cpu"}
    assert _backends("linux", {"cuda"}) == {"cuda13"}
    assert _backends("linux", {"cpu", "test"}) == {"cpu"}
    assert _backends("linux", {"cuda", "test"}) == {"cuda13"}
    # No other extra brings a back-end along (`.[cuda,test]` must stay CUDA only).
    for name in set(extras) - {"cpu", "cuda"}:
        assert _backends("linux", {name}) == set(), name


def test_macos_gets_plain_mlx_whatever_the_extras():
    """On a Mac MLX is Metal (mlx pulls mlx-metal); the Linux back-end extras add nothing."""
    for extras in (set(), {"cpu"}, {"cuda"}, {"cpu", "test"}):
        assert _backends("darwin", extras) == set(), extras


def _readme_commands() -> list[str]:
    block = re.search(r"## The two commands\n.*?```bash\n(.*?)```", README.read_text(), re.DOTALL)
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def _pip_extras(command: str) -> set[str]:
    found = re.findall(r'pip install (?:-q )?-e "\.\[([^\]]*)\]"', command)
    assert len(found) == 1, f"no editable install with extras in {command!r}"
    return {e.strip() for e in found[0].split(",")}


def test_readme_commands_choose_one_backend_and_ci_runs_the_test_command():
    run, test = _readme_commands()
    assert run.startswith("python3 -m venv .venv") and run.endswith('mlxserve run "Why is the sky blue?"')
    assert test.startswith("python3 -m venv .venv") and test.endswith("python -m pytest -q")
    for command in (run, test):
        assert _backends("linux", _pip_extras(command)) == {"cpu"}, command  # this CI machine
    assert "test" in _pip_extras(test)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run no longer runs the README's test command verbatim"


def test_requires_python_admits_no_python_a_dependency_refuses():
    """requires-python's floor is at least every installed dependency's (mlx-lm 0.32.2: 3.11),
    and the README names it."""
    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    floor = re.fullmatch(r">=(\d+\.\d+)", str(ours)).group(1)
    probes = [f"3.{minor}.0" for minor in range(8, 16)]
    names = [Requirement(r).name for r in PYPROJECT["project"]["dependencies"]]
    for name in names:
        theirs = importlib.metadata.metadata(name).get("Requires-Python")
        if theirs:
            bad = [v for v in probes if v in ours and v not in SpecifierSet(theirs)]
            assert not bad, f"requires-python {ours} admits {bad}, which {name} ({theirs}) refuses"
    assert Version(floor) >= Version("3.11")
    assert f"Python {floor} or later" in README.read_text()


def test_build_backend_reads_the_license_expression():
    """`license = "Apache-2.0"` (an SPDX string, PEP 639) needs setuptools 77 or later."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    setuptools = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                  if Requirement(r).name == "setuptools"]
    assert len(setuptools) == 1
    assert not setuptools[0].specifier.contains("76.9"), setuptools[0]
    assert setuptools[0].specifier.contains("77.0")


def test_readme_says_how_to_get_torchs_cpu_build():
    """The test extra's exact torch pin, installed first from PyTorch's CPU index (Linux's
    PyPI torch is the CUDA build), then the README's own test install."""
    pins = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]
            if Requirement(r).name == "torch"]
    assert len(pins) == 1 and str(pins[0].specifier).startswith("==")
    readme = README.read_text()
    cpu = re.search(r"pip install -q torch(\S+) --index-url https://download\.pytorch\.org/whl/cpu"
                    r" && (pip install -q -e \S+)", readme)
    assert cpu, "README no longer says how to install torch's CPU build"
    assert cpu.group(1) == str(pins[0].specifier), "README's torch pin differs from the test extra's"
    assert cpu.group(2) in _readme_commands()[1]


def test_readme_states_the_platform_floors():
    install = README.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    for fact in ("macOS 14", "Apple Silicon", "x86-64", "aarch64", "glibc 2.35", "manylinux_2_35",
                 "Python 3.11 or later"):
        assert fact in install, fact


# ---- the license, the sdist and the wheel

# SHA-256 of https://www.apache.org/licenses/LICENSE-2.0.txt as published.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_apache_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256


_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "devtmp", ".gpu", "build", "dist",
                                     "*.egg-info", "__pycache__", ".pytest_cache")


def _build(kind: str, source: Path, out: Path) -> Path:
    """setuptools' PEP 517 hook, as pip would call it, with the installed setuptools (offline)."""
    code = (f"import sys, setuptools.build_meta as b; print(b.build_{kind}(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """An sdist of a copy of this tree, unpacked, and a wheel built from that unpacked sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=_NOT_SOURCE)
    sdist = _build("sdist", tree, tmp)
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        # The "data" filter where this Python has it (3.11.4+ and security backports).
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "unpacked", **extra)
    unpacked = tmp / "unpacked" / names[0].split("/")[0]
    wheel = _build("wheel", unpacked, tmp / "wheel")
    return sdist, names, unpacked, wheel


def test_sdist_has_the_license_version_and_what_its_tests_read(dists):
    sdist, names, unpacked, _ = dists
    version = _version()
    top = f"mlxserve-{version}"
    assert sdist.name == f"{top}.tar.gz"
    files = {n.removeprefix(top + "/") for n in names}
    pkg_info = email.parser.Parser().parsestr((unpacked / "PKG-INFO").read_text())
    assert pkg_info["Version"] == version
    assert pkg_info["License-Expression"] == "Apache-2.0"
    assert (unpacked / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    # Every file of the tests, the examples they run and the docs they compare, and the files
    # test_distribution.py and test_config_reference.py open.
    needed = {"pyproject.toml", "README.md", "LICENSE", "Formula/mlxserve.rb",
              "scripts/lock_requirements.py", "scripts/gen_config_reference.py"}
    for folder in ("tests", "examples", "docs", "requirements"):
        needed |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert {"tests/conftest.py", "tests/tiny_models.py"} <= needed
    assert not needed - files, f"the sdist lacks {sorted(needed - files)}"
    assert not [f for f in files if f.startswith(("devtmp/", ".venv/", ".git/")) or "__pycache__" in f]


def test_sdist_test_suite_collects(dists):
    """The unpacked sdist's tests import: conftest.py and every helper module are there."""
    _, _, unpacked, _ = dists
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=unpacked, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert re.search(r"^\d+ tests collected", r.stdout, re.MULTILINE), r.stdout[-1000:]


def test_wheel_has_the_license_version_and_backend_extras(dists):
    *_, wheel = dists
    version = _version()
    assert wheel.name.startswith(f"mlxserve-{version}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"mlxserve-{version}.dist-info"
        assert zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    assert {"mlxserve/__init__.py", "mlxserve/py.typed"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert meta["Version"] == version
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    # The wheel's metadata says what pyproject says: one Linux back-end per extra, none in the
    # base dependencies, plain mlx on a Mac.
    for platform, extras, backends in (("linux", set(), set()), ("linux", {"cpu"}, {"cpu"}),
                                       ("linux", {"cuda", "test"}, {"cuda13"}),
                                       ("darwin", {"cpu"}, set())):
        assert _backends(platform, extras, requires) == backends, (platform, extras)
    assert {str(r) for r in requires} == {str(r) for r in _pyproject_requirements()}
