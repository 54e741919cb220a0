"""Read a GGUF file's key/value metadata as plain Python values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file read-only (tensor data stays memory-mapped)."""
    return gguf.GGUFReader(str(path), "r")


def read_gguf_metadata(source: str | Path | gguf.GGUFReader) -> dict[str, Any]:
    """Return every metadata field as str / int / float / bool / list of those.

    Accepts a path or an already opened reader, so a loader that needs both the
    tensors and the metadata parses the file once.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
