"""Paths as a user types them (`--model ~/models/x.gguf`, `/save ~/chat.json`)."""

from __future__ import annotations

from pathlib import Path


def expand_user(path: str | Path) -> Path:
    """`path` with a leading `~` or `~user` made that home folder. Where no home folder is
    known (`~nosuchuser/x`), a ValueError that names the path: pathlib raises a RuntimeError,
    which reached the user as a traceback."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise ValueError(f"{path}: no home folder is known for {user}") from None
