#!/usr/bin/env python3
"""Write the hash-locked requirements that Formula/mlxserve.rb installs, or check them.

    python scripts/lock_requirements.py           # rewrite requirements/macos-arm64*.lock
    python scripts/lock_requirements.py --check   # exit 1, saying why, if they are stale

requirements/macos-arm64.lock holds the runtime dependency closure of pyproject's
[project].dependencies as a macOS arm64 CPython (the version the formula depends on) would
install it; requirements/macos-arm64-build.lock holds [build-system].requires. Every entry is
`name==version` with the SHA-256 of each wheel such a machine would pick: pip is asked once per
macOS version that MLX publishes wheels for (MACOS_PLATFORMS), and the hashes are pooled.

The resolution is pip's own (`pip install --dry-run --report`), run against pip's default index
with this machine's pip configuration switched off, so local wheel folders or constraint files
never leak into the lock. pip evaluates environment markers (`sys_platform == 'darwin'`, mlx's
`platform_system == "Darwin"` dependency on mlx-metal, ...) against the interpreter running it,
not the target platform, so the pip process here gets a macOS arm64 marker environment.

`--check` compares each lock's header (the dependency list and Python it was made from) with
pyproject.toml and the formula, then resolves again with the lock's pins as constraints: the
resolution must succeed, name exactly the locked packages and versions, and pick files whose
hashes are locked. So a dependency added, removed or raised in pyproject.toml without
regenerating fails the check, while new releases on the index do not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
FORMULA = ROOT / "Formula" / "mlxserve.rb"
RUNTIME_LOCK = ROOT / "requirements" / "macos-arm64.lock"
BUILD_LOCK = ROOT / "requirements" / "macos-arm64-build.lock"

# macOS versions MLX publishes arm64 wheels for (mlx and mlx-metal: 14, 15 and 26). A Mac picks
# the newest one not newer than itself, so each of them gets its own resolution.
MACOS_PLATFORMS = ("macosx_14_0_arm64", "macosx_15_0_arm64", "macosx_26_0_arm64")
# Darwin kernel release per macOS version, for the `platform_release` marker.
_DARWIN_RELEASE = {"14": "23.0.0", "15": "24.0.0", "26": "25.0.0"}

# pip settings kept from the environment (certificates, proxies, timeouts); everything else that
# could change what is resolved (indexes, find-links, constraints) is dropped.
_PIP_ENV_KEPT = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES",
                 "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR"}

# Runs pip in a child process with the target's marker environment in place of this machine's.
_PIP_WITH_MARKERS = """
import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(target)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


class LockError(RuntimeError):
    """Resolution failed or produced something that cannot be locked; the message says what."""


@dataclass
class Pin:
    name: str  # canonical (PEP 503) name
    version: str
    hashes: set[str] = field(default_factory=set)  # sha256 hex digests
    files: set[str] = field(default_factory=set)  # wheel file names, for the comment


@dataclass
class Lock:
    path: Path
    title: str
    python: str
    platforms: tuple[str, ...]
    requirements: list[str]  # what was resolved (from pyproject.toml)
    pins: dict[str, Pin]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- inputs

def _pyproject() -> dict:
    if tomllib is None:
        raise LockError("this script needs Python 3.11 or later (tomllib)")
    return tomllib.loads(PYPROJECT.read_text())


def runtime_requirements() -> list[str]:
    return list(_pyproject()["project"]["dependencies"])


def build_requirements() -> list[str]:
    return list(_pyproject()["build-system"]["requires"])


def formula_python(text: str | None = None) -> str:
    """The X.Y of the formula's `depends_on "python@X.Y"`."""
    text = FORMULA.read_text() if text is None else text
    found = re.findall(r'^\s*depends_on\s+"python@(\d+\.\d+)"', text, re.MULTILINE)
    if len(found) != 1:
        raise LockError(f"{FORMULA.relative_to(ROOT)} must have exactly one "
                        f'`depends_on "python@X.Y"` (found {found})')
    return found[0]


def marker_environment(python: str, platform: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython `python` on macOS arm64 `platform`."""
    macos_major = platform.split("_")[1]
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": "arm64",
        "platform_python_implementation": "CPython",
        "platform_release": _DARWIN_RELEASE[macos_major],
        "platform_system": "Darwin",
        "platform_version": f"Darwin Kernel Version {_DARWIN_RELEASE[macos_major]}",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "darwin",
    }


# --------------------------------------------------------------------------- resolution

def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in _PIP_ENV_KEPT}
    env["PIP_CONFIG_FILE"] = os.devnull  # no global, user or site pip.conf
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip_report(pip_args: list[str], *, python: str, platform: str) -> dict:
    """`pip install --dry-run --report` as CPython `python` on `platform` would run it, against
    pip's default index; returns pip's installation report."""
    with tempfile.TemporaryDirectory(prefix="mlxserve-lock-") as tmp:
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--no-color",
                "--report", "-", "--only-binary=:all:", "--platform", platform,
                "--python-version", python, "--implementation", "cp",
                "--abi", "cp" + python.replace(".", ""),
                # Older pips (23.x, what `python3 -m venv` may bring) accept platform options
                # only with --target; with --dry-run nothing is written there.
                "--target", str(Path(tmp) / "target")]
        cmd = [sys.executable, "-c", _PIP_WITH_MARKERS,
               json.dumps(marker_environment(python, platform)), *args, *pip_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), cwd=tmp,
                              stdin=subprocess.DEVNULL, timeout=600, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln] or lines[-3:]
        raise LockError(f"pip failed for {platform} (CPython {python}): "
                        + " | ".join(e.strip() for e in errors))
    return json.loads(proc.stdout)


def report_pins(report: dict) -> dict[str, Pin]:
    """One Pin per package pip would install, with the hash of the file it picks."""
    pins: dict[str, Pin] = {}
    for item in report["install"]:
        name = canonical(item["metadata"]["name"])
        info = item["download_info"]
        archive = info.get("archive_info") or {}
        digest = archive.get("hashes", {}).get("sha256")
        if not digest and str(archive.get("hash", "")).startswith("sha256="):  # older reports
            digest = archive["hash"].removeprefix("sha256=")
        if not digest:
            raise LockError(f"the index gave no sha256 for {name} ({info.get('url', '?')})")
        filename = info["url"].rsplit("/", 1)[-1].split("#", 1)[0]
        pins[name] = Pin(name, item["metadata"]["version"], {digest}, {filename})
    return pins


def resolve(requirements: Iterable[str], *, python: str, platform: str,
            constraints: Iterable[str] = ()) -> dict[str, Pin]:
    """What pip would install for `requirements` on (CPython `python`, `platform`)."""
    requirements, constraints = list(requirements), list(constraints)
    with tempfile.TemporaryDirectory(prefix="mlxserve-constraints-") as tmp:
        args = []
        if constraints:
            path = Path(tmp) / "constraints.txt"
            path.write_text("\n".join(constraints) + "\n")
            args += ["--constraint", str(path)]
        return report_pins(pip_report([*args, *requirements], python=python, platform=platform))


def resolve_all(requirements: list[str], *, python: str, platforms: Iterable[str],
                constraints: Iterable[str] = ()) -> dict[str, dict[str, Pin]]:
    """resolve() for each platform, in parallel (the work is waiting on the index)."""
    platforms, constraints = list(platforms), list(constraints)
    with ThreadPoolExecutor(len(platforms)) as pool:
        results = pool.map(lambda p: resolve(requirements, python=python, platform=p,
                                             constraints=constraints), platforms)
        return dict(zip(platforms, results))


def merge(per_platform: dict[str, dict[str, Pin]]) -> dict[str, Pin]:
    """One pin per package with every platform's file; the platforms must agree on versions."""
    merged: dict[str, Pin] = {}
    for platform, pins in per_platform.items():
        for name, pin in pins.items():
            have = merged.setdefault(name, Pin(name, pin.version))
            if have.version != pin.version:
                raise LockError(f"{name}: {platform} resolves {pin.version}, another macOS "
                                f"version {have.version}; pin it in pyproject.toml")
            have.hashes |= pin.hashes
            have.files |= pin.files
    names = [set(p) for p in per_platform.values()]
    if any(n != names[0] for n in names):
        raise LockError("the macOS versions resolve different package sets: "
                        + "; ".join(f"{p}: {sorted(set(pins))}" for p, pins in per_platform.items()))
    return dict(sorted(merged.items()))


# --------------------------------------------------------------------------- lock files

def render(lock: Lock) -> str:
    lines = [
        f"# {lock.title}",
        "# Generated by scripts/lock_requirements.py; do not edit by hand. Installed by",
        "# Formula/mlxserve.rb with `pip install --require-hashes --no-deps --only-binary=:all: -r`.",
        f"# python: {lock.python}",
        f"# platforms: {' '.join(lock.platforms)}",
        "# resolved from pyproject.toml:",
        *(f"#   {req}" for req in lock.requirements),
    ]
    for pin in lock.pins.values():
        lines.append(f"{pin.name}=={pin.version} \\")
        hashes = sorted(pin.hashes)
        lines += [f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "")
                  for i, h in enumerate(hashes)]
        lines.append(f"    # {', '.join(sorted(pin.files))}")
    return "\n".join(lines) + "\n"


def parse(path: Path) -> Lock:
    """Read a lock written by render(); raises LockError on anything else."""
    return parse_text(path.read_text(), path)


def parse_text(text: str, path: Path) -> Lock:
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    title = header[0][2:] if header else ""
    python = platforms = None
    requirements: list[str] = []
    in_reqs = False
    for ln in header:
        if ln.startswith("# python: "):
            python = ln.removeprefix("# python: ").strip()
        elif ln.startswith("# platforms: "):
            platforms = tuple(ln.removeprefix("# platforms: ").split())
        elif ln == "# resolved from pyproject.toml:":
            in_reqs = True
        elif in_reqs and ln.startswith("#   "):
            requirements.append(ln[4:])
        else:
            in_reqs = False
    if python is None or platforms is None:
        raise LockError(f"{path.relative_to(ROOT)} has no python / platforms header")
    pins: dict[str, Pin] = {}
    for entry in logical_lines(text):
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)",
                         entry)
        if not m:
            raise LockError(f"{path.relative_to(ROOT)}: not `name==version --hash=sha256:…`: "
                            f"{entry!r}")
        name = canonical(m.group(1))
        if name in pins:
            raise LockError(f"{path.relative_to(ROOT)}: {name} is listed twice")
        pins[name] = Pin(name, m.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", m.group(3))))
    return Lock(path, title, python, platforms, requirements, pins)


def logical_lines(text: str) -> list[str]:
    """Requirement entries: comments dropped, backslash continuations joined."""
    entries, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        entries.append((current + line.strip()).strip())
        current = ""
    if current.strip():
        entries.append(current.strip())
    return entries


def build_lock(kind: str) -> Lock:
    python = formula_python()
    if kind == "runtime":
        reqs, path = runtime_requirements(), RUNTIME_LOCK
        title = (f"mlxserve's runtime dependencies on macOS arm64, CPython {python}: the closure "
                 f"of pyproject's [project].dependencies.")
    else:
        reqs, path = build_requirements(), BUILD_LOCK
        title = (f"mlxserve's build backend on macOS arm64, CPython {python}: pyproject's "
                 f"[build-system].requires.")
    pins = merge(resolve_all(reqs, python=python, platforms=MACOS_PLATFORMS))
    return Lock(path, title, python, MACOS_PLATFORMS, reqs, pins)


# --------------------------------------------------------------------------- checking

def check_header(lock: Lock, requirements: list[str], python: str) -> list[str]:
    """Problems that need no network: the lock was made from other inputs than today's."""
    name = lock.path.relative_to(ROOT)
    problems = []
    if lock.requirements != requirements:
        problems.append(f"{name} was resolved from {lock.requirements}, but pyproject.toml now "
                        f"says {requirements}")
    if lock.python != python:
        problems.append(f"{name} is for CPython {lock.python}, but the formula depends on "
                        f"python@{python}")
    if lock.platforms != MACOS_PLATFORMS:
        problems.append(f"{name} covers {list(lock.platforms)}, the script {list(MACOS_PLATFORMS)}")
    return problems


def check_resolution(lock: Lock, requirements: list[str]) -> list[str]:
    """Resolve `requirements` again, held to the lock's versions: every platform must land on
    exactly the locked set, on files whose hashes are locked."""
    name = lock.path.relative_to(ROOT)
    pins = [f"{p.name}=={p.version}" for p in lock.pins.values()]
    try:
        per_platform = resolve_all(requirements, python=lock.python, platforms=lock.platforms,
                                   constraints=pins)
    except LockError as e:
        return [f"{name}: resolving pyproject.toml again, held to the locked versions, failed: {e}"]
    problems = []
    for platform, resolved in per_platform.items():
        missing = sorted(set(resolved) - set(lock.pins))
        extra = sorted(set(lock.pins) - set(resolved))
        if missing:
            problems.append(f"{name}: {platform} also needs {missing}, which the lock lacks")
        if extra:
            problems.append(f"{name}: locks {extra}, which {platform} no longer needs")
        for pkg, pin in resolved.items():
            locked = lock.pins.get(pkg)
            if locked is None:
                continue
            if pin.version != locked.version:
                problems.append(f"{name}: {platform} resolves {pkg} {pin.version}, "
                                f"the lock {locked.version}")
            elif not pin.hashes <= locked.hashes:
                problems.append(f"{name}: {platform} picks {sorted(pin.files)} for {pkg}, "
                                f"whose sha256 is not in the lock")
    return problems


def check(*, network: bool = True) -> list[str]:
    python = formula_python()
    problems = []
    for path, requirements in ((RUNTIME_LOCK, runtime_requirements()),
                               (BUILD_LOCK, build_requirements())):
        if not path.is_file():
            problems.append(f"{path.relative_to(ROOT)} is missing")
            continue
        try:
            lock = parse(path)
        except LockError as e:
            problems.append(str(e))
            continue
        header = check_header(lock, requirements, python)
        problems += header
        if network and not header:
            problems += check_resolution(lock, requirements)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="don't write; exit 1 if the locks do not match pyproject.toml")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check()
            for p in problems:
                print(p, file=sys.stderr)
            if problems:
                print("run: python scripts/lock_requirements.py", file=sys.stderr)
                return 1
            print("locks match pyproject.toml and the formula's Python")
            return 0
        for kind in ("runtime", "build"):
            lock = build_lock(kind)
            lock.path.parent.mkdir(exist_ok=True)
            lock.path.write_text(render(lock))
            print(f"wrote {lock.path.relative_to(ROOT)}: {len(lock.pins)} packages, "
                  f"{sum(len(p.hashes) for p in lock.pins.values())} hashes")
        return 0
    except LockError as e:
        print(f"lock_requirements: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
