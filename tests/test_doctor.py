"""doctor: the report's shape and verdicts on this (CPU) machine, and failing checks."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mlxserve import doctor, registry


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_collect_on_this_machine(tmp_path):
    report = doctor.collect()
    assert set(report) == {"mlxserve", "python", "platform", "mlx", "mlx_lm", "backend", "device",
                           "memory", "cache_dir", "hf_cache_dir", "default_model", "checks", "ok"}
    assert report["backend"] == "cpu"
    assert report["device"].startswith("cpu")
    assert report["mlx"] and report["mlx_lm"]
    assert report["memory"]["total_bytes"] >= report["memory"]["available_bytes"] > 0
    assert report["cache_dir"] == str(tmp_path / "cache")
    assert report["hf_cache_dir"] == str(tmp_path / "hf" / "hub")
    # A fresh cache lacks the default model: reported, not a failure.
    filename = registry.ALIASES[registry.DEFAULT_MODEL].filename
    assert report["default_model"] == {"alias": registry.DEFAULT_MODEL, "present": False,
                                       "path": str(tmp_path / "cache" / "models" / filename)}
    assert [c["name"] for c in report["checks"]] == ["mlx", "mlx-lm", "cache dir writable"]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    assert report["ok"] is True


def test_unwritable_cache_fails_the_report(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLXSERVE_CACHE", str(blocker / "cache"))  # a folder under a file
    report = doctor.collect()
    check = next(c for c in report["checks"] if c["name"] == "cache dir writable")
    assert check["ok"] is False
    assert str(blocker / "cache") in check["detail"] and "MLXSERVE_CACHE" in check["detail"]
    assert report["ok"] is False


def test_a_cache_that_is_a_file_is_named_as_one(monkeypatch, tmp_path):
    """MLXSERVE_CACHE naming a file: the check says it is no folder; mkdir's reason alone read
    "cannot write to …/a-file: File exists"."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLXSERVE_CACHE", str(blocker))
    check = next(c for c in doctor.collect()["checks"] if c["name"] == "cache dir writable")
    assert check == {"name": "cache dir writable", "ok": False,
                     "detail": f"{blocker} is not a folder (set MLXSERVE_CACHE to a writable folder)"}


def test_a_crashing_check_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("no device")

    monkeypatch.setattr(doctor, "_check_mlx", broken)
    report = doctor.collect()
    assert report["checks"][0] == {"name": "mlx", "ok": False, "detail": "RuntimeError: no device"}
    assert report["ok"] is False


@pytest.mark.parametrize("version, machine, failing", [
    ("14.5", "arm64", []),
    ("15.0", "arm64", []),
    ("13.6.1", "arm64", ["macOS >= 14"]),
    ("14.5", "x86_64", ["Apple Silicon"]),
])
def test_macos_checks(monkeypatch, version, machine, failing):
    monkeypatch.setattr(doctor.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(doctor.platform, "mac_ver", lambda: (version, ("", "", ""), machine))
    monkeypatch.setattr(doctor.platform, "machine", lambda: machine)
    monkeypatch.setattr(doctor, "system_memory", lambda: {"total_bytes": 1, "available_bytes": 1})
    report = doctor.collect()
    assert [c["name"] for c in report["checks"] if not c["ok"]] == failing
    assert report["ok"] is (not failing)
    assert report["platform"]["macos"] == version


def test_parse_vm_stat():
    text = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n"
            "Pages free:                               10.\n"
            "Pages active:                            999.\n"
            "Pages inactive:                           20.\n"
            "Pages speculative:                         5.\n"
            "Pages wired down:                        999.\n")
    assert doctor._parse_vm_stat(text) == 35 * 16384
    assert doctor._parse_vm_stat("garbage") is None


def test_render_shows_facts_and_failures():
    report = doctor.collect()
    report["checks"].append({"name": "pretend", "ok": False, "detail": "a [bracketed] reason"})
    report["ok"] = False
    out = io.StringIO()
    doctor.render(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "cpu" in text and report["cache_dir"] in text
    assert "a [bracketed] reason" in text and "failed: pretend" in text
