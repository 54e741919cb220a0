"""Checks of values read from model files (config.json, GGUF metadata), shared by the
loader, the tokenizer and quant/, and the sampling temperature's range, shared by the server
and the terminal's commands: importing nothing, it makes no import cycle (and `chat --url`
loads no MLX for it)."""

from __future__ import annotations

# The hottest sampling temperature, everywhere (the server, `run --temp`, `chat --temperature`,
# /temp): OpenAI's API's limit, so that what the chat takes the server takes too (`chat --url`).
MAX_TEMPERATURE = 2


def is_temperature(value: float) -> bool:
    """`value` is a temperature every front end takes: 0 (greedy) to MAX_TEMPERATURE (nan is not)."""
    return 0 <= value <= MAX_TEMPERATURE


def is_whole(value: object, minimum: int) -> bool:
    """`value` is a whole number >= `minimum`: an int, not a bool (an int to Python, true to
    JSON) and not a float or a string that reads as one."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def value_kind(value: object) -> str:
    """What a model file's value is, for an error that says it is the wrong type: "a string",
    "a list", "true/false", "the number 3" (cut to 40 characters), else the type's name."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r:.40}"
    return {list: "a list", str: "a string"}.get(type(value), type(value).__name__)
