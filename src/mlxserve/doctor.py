"""`mlxserve doctor`: what this machine offers mlxserve, and whether anything stops it running."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.filesize import decimal as human_size
from rich.table import Table
from rich.text import Text

from mlxserve import __version__, registry


class CheckFailed(Exception):
    """A check's failure; the message is the detail shown to the user."""


def collect() -> dict:
    """The environment report (plain data: the CLI prints it as a table or as JSON)."""
    mx = _import_mlx()
    info = _device_info(mx) if mx else {}
    backend = _backend(mx) if mx else None
    memory = system_memory()
    if "max_recommended_working_set_size" in info:  # Metal: what the GPU may keep resident
        memory["recommended_working_set_bytes"] = int(info["max_recommended_working_set_size"])

    alias = registry.ALIASES[registry.DEFAULT_MODEL]
    try:
        default_path = registry.resolve(alias.name, pull_if_missing=False, progress=False)
        present = True
    except registry.ModelNotFound:
        default_path, present = registry.cache_dir() / "models" / alias.filename, False

    checks = [_run_check("mlx", _check_mlx), _run_check("mlx-lm", _check_mlx_lm),
              _run_check("cache dir writable", _check_cache_dir)]
    if platform.system() == "Darwin":
        checks += [_run_check("macOS >= 14", _check_macos_version),
                   _run_check("Apple Silicon", _check_apple_silicon)]

    return {
        "mlxserve": __version__,
        "python": platform.python_version(),
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(),
                     **({"macos": platform.mac_ver()[0]} if platform.system() == "Darwin" else {})},
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "backend": backend,
        "device": _device_name(mx, info) if mx else None,
        "memory": memory,
        "cache_dir": str(registry.cache_dir()),
        "hf_cache_dir": str(registry.hf_cache_dir()),
        "default_model": {"alias": alias.name, "present": present, "path": str(default_path)},
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def render(report: dict, console: Console) -> None:
    """Print the report as tables: facts, then checks with their verdicts."""
    mem = report["memory"]
    facts = [
        ("mlxserve", report["mlxserve"]),
        ("python", f"{report['python']} ({sys.executable})"),
        ("platform", " ".join(str(v) for v in report["platform"].values())),
        ("mlx / mlx-lm", f"{report['mlx'] or 'missing'} / {report['mlx_lm'] or 'missing'}"),
        ("backend", report["backend"] or "none"),
        ("device", report["device"] or "none"),
        ("memory", ", ".join(f"{_size(mem.get(k))} {label}" for k, label in (
            ("total_bytes", "total"), ("available_bytes", "available"),
            ("recommended_working_set_bytes", "GPU working set")) if k in mem)),
        ("cache", report["cache_dir"]),
        ("hf cache", report["hf_cache_dir"]),
        ("default model", f"{report['default_model']['alias']}: "
                          + ("present" if report["default_model"]["present"]
                             else "not downloaded yet (pulled on first run)")
                          + f" ({report['default_model']['path']})"),
    ]
    table = Table(title="mlxserve doctor", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths wrap, never cut short with an ellipsis
    for key, value in facts:
        table.add_row(key, Text(str(value)))  # Text: paths may hold "[", which markup would eat
    console.print(table)

    checks = Table(show_header=True, title_justify="left")
    checks.add_column("")
    checks.add_column("check", style="bold")
    checks.add_column("detail", overflow="fold")
    for c in report["checks"]:
        checks.add_row(Text("✓", style="green") if c["ok"] else Text("✗", style="red"),
                       c["name"], Text(c["detail"]))
    console.print(checks)
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    console.print(Text("all checks passed", style="green") if not failed
                  else Text(f"failed: {', '.join(failed)}", style="bold red"))


def _size(n: int | None) -> str:
    return "?" if n is None else human_size(n)


# ---- checks: each returns a detail on success and raises on failure

def _run_check(name: str, check: Callable[[], str]) -> dict[str, Any]:
    try:
        return {"name": name, "ok": True, "detail": check()}
    except Exception as e:  # noqa: BLE001 - a check must report, never crash the report
        detail = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        return {"name": name, "ok": False, "detail": detail}


def _check_mlx() -> str:
    import mlx.core as mx

    a = mx.array([[1.0, 2.0], [3.0, 4.0]])
    got = (a @ a).tolist()  # .tolist() evaluates on the default device
    if got != [[7.0, 10.0], [15.0, 22.0]]:
        raise CheckFailed(f"a 2x2 matmul on {mx.default_device()} returned {got}")
    return f"a 2x2 matmul evaluates correctly on {mx.default_device()}"


def _check_mlx_lm() -> str:
    importlib.import_module("mlx_lm")
    return f"mlx-lm {_version('mlx-lm')} imports"


def _check_cache_dir() -> str:
    path = registry.cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except FileExistsError:  # a file there (mkdir's own reason, "File exists", said nothing of what was wrong)
        raise CheckFailed(f"{path} is not a folder (set MLXSERVE_CACHE to a writable folder)") from None
    except OSError as e:
        raise CheckFailed(f"cannot write to {path}: {e.strerror or e} (set MLXSERVE_CACHE to a "
                          f"writable folder)") from None
    return str(path)


def _check_macos_version() -> str:
    version = platform.mac_ver()[0]
    major = int(version.split(".")[0]) if version else 0
    if major < 14:
        raise CheckFailed(f"macOS {version or '?'}: MLX needs macOS 14 (Sonoma) or newer")
    return f"macOS {version}"


def _check_apple_silicon() -> str:
    machine = platform.machine()
    if machine != "arm64":
        raise CheckFailed(f"this Python runs as {machine} (an Intel Mac, or Rosetta): MLX needs "
                          f"a native arm64 Python on Apple Silicon")
    return machine


# ---- facts

def _import_mlx() -> Any:
    try:
        import mlx.core as mx
    except ImportError:
        return None  # the "mlx" check reports why
    return mx


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backend(mx: Any) -> str:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)  # MLX builds before the CUDA back-end have no mx.cuda
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def _device_info(mx: Any) -> dict[str, Any]:
    # mx.device_info() is the current API; older MLX only had mx.metal.device_info().
    if hasattr(mx, "device_info"):
        return dict(mx.device_info())
    return dict(mx.metal.device_info()) if mx.metal.is_available() else {}


def _device_name(mx: Any, info: dict[str, Any]) -> str:
    device = mx.default_device().type.name  # "cpu" | "gpu"
    name = info.get("device_name")
    return f"{device} ({name})" if name else device


def system_memory() -> dict[str, int | None]:
    """Total and available RAM in bytes (None where the system doesn't say)."""
    total = available = None
    if platform.system() == "Darwin":
        memsize = (_run(["sysctl", "-n", "hw.memsize"]) or "").strip()
        total = int(memsize) if memsize.isdigit() else None
        vm_stat = _run(["vm_stat"])
        available = _parse_vm_stat(vm_stat) if vm_stat else None
    else:
        try:
            with open("/proc/meminfo") as f:
                meminfo = {k: int(v.split()[0]) * 1024 for k, v in
                           (line.split(":", 1) for line in f if ":" in line)}
            total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
        except OSError:
            pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return {"total_bytes": total, "available_bytes": available}


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _parse_vm_stat(text: str) -> int | None:
    """Free + inactive + speculative pages (what macOS can hand out without swapping), in bytes."""
    page = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r"^Pages (free|inactive|speculative):\s+(\d+)", text, re.MULTILINE))
    if not page or not pages:
        return None
    return int(page.group(1)) * sum(int(v) for v in pages.values())
