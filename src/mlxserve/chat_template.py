"""Render Hugging Face chat templates (Jinja) the way transformers does.

A model's chat template is a Jinja program that turns a list of messages into the prompt text the
model was trained on. transformers defines the dialect these templates are written for, so we
reproduce its environment: a sandbox whose objects are immutable, `trim_blocks` and
`lstrip_blocks`, loop controls (`break` / `continue`), and three additions of its own:
`raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that writes plain JSON.
Templates are untrusted code (a GGUF file carries its own), so `namespace()` and `dict` are
narrowed the way transformers narrows them.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template failed to compile or to render, or raised an error on purpose."""


def render_chat_template(template: str, messages: list[dict], *, tools: list | None = None,
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render `template` for `messages`.

    The template sees `messages`, `tools`, `documents` (None unless given),
    `add_generation_prompt` and every other keyword given (transformers passes `bos_token` /
    `eos_token` and the caller's extras, e.g. `enable_thinking=False`, the same way). An assistant
    message's reasoning given as any of `reasoning_content`, `thinking` or `reasoning` is visible
    under the first two names, which is what templates read (Qwen3: `reasoning_content`, gpt-oss:
    `thinking`).
    """
    compiled = _compile(template)
    variables.setdefault("documents", None)
    try:
        return compiled.render(messages=_alias_reasoning(messages), tools=tools,
                               add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except Exception as exc:
        # A template written for other inputs fails in many ways (undefined attribute, `str + None`
        # on a message without content, ...); the front end reports all of them as a bad request.
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Copies of the messages with reasoning under every name templates read (callers' lists
    are left alone)."""
    aliased = []
    for message in messages:
        if isinstance(message, dict):
            reasoning = next((message[field] for field in _REASONING_FIELDS
                              if message.get(field) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _raise_exception(message: str) -> None:
    # Said where the template's own words came from: alone ("no", "System message must be
    # first") a chat or an HTTP client could not tell what refused its conversation.
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own `tojson` escapes <, >, & and ' for HTML; templates expect JSON as a model sees it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for transformers'
    training masks. Some templates use it; for rendering, the block is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)  # the `generation` name itself
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _check_namespace_key(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not store underscore names on a namespace ({name!r})")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore names, which reach into Python's internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Like jinja's own: `self` is taken positionally so that `namespace(self=1)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_key(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_key(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _DictConstructor:
    """`dict` inside templates: builds dicts without handing the template the builtin type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


_ENVIRONMENT = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                             extensions=[loopcontrols, _GenerationBlock])
_ENVIRONMENT.filters["tojson"] = _tojson
_ENVIRONMENT.globals["raise_exception"] = _raise_exception
_ENVIRONMENT.globals["strftime_now"] = _strftime_now
_ENVIRONMENT.globals["namespace"] = _Namespace
_ENVIRONMENT.globals["dict"] = _DictConstructor()
