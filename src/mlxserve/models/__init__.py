"""Model architectures, one file per family. `get_model_class(model_type)` picks one."""

from __future__ import annotations

from . import llama, qwen3_5, qwen3_moe

_FAMILIES = {arch: family for family in (llama, qwen3_5, qwen3_moe) for arch in family.ARCHITECTURES}


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str):
    """Return the module implementing `model_type` (it has ModelArgs and Model)."""
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture '{model_type}' "
            f"(supported: {', '.join(supported_architectures())})"
        ) from None
