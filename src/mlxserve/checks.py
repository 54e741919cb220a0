"""Checks of values read from model files (config.json, GGUF metadata), shared by the
loader, the tokenizer and quant/: importing nothing, it makes no import cycle."""

from __future__ import annotations


def is_whole(value: object, minimum: int) -> bool:
    """`value` is a whole number >= `minimum`: an int, not a bool (an int to Python, true to
    JSON) and not a float or a string that reads as one."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
