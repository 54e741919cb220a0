"""Constrained decoding: a request's answer held to a JSON schema (OpenAI's `response_format`).

At every step a constrained row may only sample tokens that keep its answer a prefix of some
text the grammar accepts. The grammar work is llguidance's (a Rust library, no dependencies):
`LLMatcher` follows the tokens a row commits and computes, per step, a bitmask over the
vocabulary (one bit per token id); `sampling.Sampler` sets every logit outside the mask to -inf
before sampling, with plain MLX operations. Once the grammar is complete its mask allows only
the end-of-turn tokens, and the scheduler finishes the row when the matcher stops.

Three parties:
- the front end turns `response_format` into a grammar string (`response_format_grammar`) and
  checks it against the model's vocabulary (`Grammars.check`, in a worker thread: the first
  call builds the vocabulary's index, ~0.4 s for 49k tokens);
- the scheduler builds a row's `Constraint` when the request arrives (`Grammars.constraint`)
  and reads each step of a constrained row back at once, so that its next mask is computed
  from every token it committed;
- the sampler applies the masks.

JSON is generated without optional whitespace (`{"a":1,"b":[2,3]}`): a small model allowed
it can fill its whole answer with whitespace.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from .chat_output import TOOL_CLOSE, TOOL_OPEN
from .paths import expand_user

# Compact separators, no optional whitespace (see the module docstring).
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response format or grammar that cannot be used (the message says why)."""


def _llguidance():
    import llguidance  # (on first use: plain requests never load it)

    return llguidance


# The integers llguidance reads in a schema: signed or unsigned 64-bit.
_SCHEMA_INTEGERS = (-(2**63), 2**64 - 1)


def check_schema_integers(schema: object, what: str = "the JSON schema", path: str = "$") -> None:
    """Raise GrammarError naming the first integer in a schema that llguidance cannot read
    (beyond 64 bits; it would say only "Value is not JSON serializable"). A walk with its own
    stack: a schema nested a thousand deep must get this answer, not a RecursionError. Each
    entry keeps its parent and key, and the path is spelled out only for the error."""
    low, high = _SCHEMA_INTEGERS
    stack = [((None, path), schema)]
    while stack:
        place, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((place, f".{key}"), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((place, f"[{i}]"), item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
            where = ""  # the path from its end, whole steps only, up to about 80 characters
            while place is not None and len(where) < 80:
                place, part = place
                where = (part if len(part) <= 40 else part[:39] + "…") + where
            if place is not None:
                where = "…" + where
            digits = str(value)
            shown = digits if len(digits) <= 30 else f"{digits[:12]}… ({len(digits)} digits)"
            raise GrammarError(f"{what} cannot be used: the integer at {where} ({shown}) does not fit in "
                               "64 bits (a bound can be written with an exponent, e.g. 1e30)")


def json_schema_grammar(schema: dict) -> str:
    """The grammar of JSON texts valid under `schema` (a JSON Schema)."""
    check_schema_integers(schema)
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError, RecursionError) as exc:
        raise GrammarError(f"the JSON schema cannot be used: {_one_line(str(exc))}") from None


def response_format_grammar(value: object) -> str | None:
    """OpenAI's `response_format` as a grammar: None for {"type": "text"} (or no value);
    any JSON object for {"type": "json_object"}; JSON valid under the schema for
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}."""
    schema = response_format_schema(value)
    return None if schema is None else json_schema_grammar(schema)


def response_format_schema(value: object) -> dict | None:
    """The JSON Schema that OpenAI's `response_format` holds the answer to, or None (text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GrammarError('response_format must be an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GrammarError('response_format json_schema needs "json_schema": {"name": …, "schema": {…}} '
                               "with the schema as a JSON object")
        return spec["schema"]
    raise GrammarError(f"response_format type must be 'text', 'json_object' or 'json_schema', got "
                       f"{json.dumps(kind)[:40]}")


def validate_schema(schema: dict) -> None:
    """Raise GrammarError if `schema` cannot be used, as far as that is known without a
    vocabulary (Grammars.check also knows what the model's tokens allow)."""
    problem = _llguidance().LLMatcher.validate_grammar(json_schema_grammar(schema))
    if problem:
        raise GrammarError(f"the grammar cannot be used: {_one_line(problem)}")


def read_schema(value: str) -> dict:
    """A JSON Schema as a user names it on the command line or in the terminal chat: 'json'
    (any JSON object), a file holding the schema, or the schema itself as JSON text."""
    if value.lower() == "json":
        return {"type": "object"}
    if not value.strip():
        raise GrammarError("give 'json', a JSON schema's file, or the schema itself as JSON text")
    text = value
    # JSON text, not a file's name: an object, an array (refused below, in JSON's terms), or
    # the boolean schemas true and false (they were looked for as files named so).
    if not (value.lstrip().startswith(("{", "[")) or value.strip() in ("true", "false")):
        try:
            path = expand_user(value)
        except ValueError as exc:  # ~user without a home folder
            raise GrammarError(f"cannot read the schema file {exc}") from None
        try:
            # UTF-8 whatever the locale, and a byte order mark before the text (which editors
            # on Windows write) left out, as piped text's is: json.loads refused the file
            # ("Unexpected UTF-8 BOM").
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise GrammarError(f"cannot read the schema file {value}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise GrammarError(f"cannot read the schema file {value}: it is not UTF-8 text") from None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (RecursionError: nested deeper than the parser goes)
        raise GrammarError(f"the schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):  # JSON Schema allows them; the server refuses them too (response_format_schema)
        raise GrammarError("a JSON schema must be a JSON object; for the boolean schema true (any JSON value) "
                           "give {}" if schema else
                           "a JSON schema must be a JSON object; the boolean schema false admits no answer at all")
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object")
    return schema


# A function declared without parameters takes none (as in OpenAI's API): its arguments are {}.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_grammar(tools: list[dict], tags: tuple[str, str], *, answer: dict | None = None,
                      one_call: bool = False, fields: list[str] | None = None,
                      what: str = "the tools' schemas") -> str:
    """The grammar of an answer made of tool calls, as Qwen-style chat templates write them:

        <tool_call>
        {"name": "get_weather", "arguments": {"city":"Paris"}}
        </tool_call>

    one call (`one_call`) or several, a newline apart, each naming one of `tools` (OpenAI's
    tool objects) with arguments valid under that function's `parameters`. With `answer` (a
    JSON Schema: the request's response_format) the answer may instead be JSON under it.
    `tags` are the two tags as grammar terms (`tool_tags`). The fixed text around the
    arguments is the grammar's; each JSON part is its own schema document, so a parameters
    schema's `$ref`s resolve as they would alone. `fields` name each tool's parameters in
    errors as the request gave them (by default tools[i].function.parameters, i its place in
    `tools`), and `what` names the schemas together (the deprecated `functions`' own)."""
    open_tag, close_tag = tags
    fields = fields or [f"tools[{i}].function.parameters" for i in range(len(tools))]
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        parameters = function.get("parameters")
        parameters = NO_PARAMETERS if parameters is None else parameters
        if parameters.get("type", "object") != "object":
            raise GrammarError(f"{fields[i]} must describe an object (type 'object'): a call's arguments are "
                               "a JSON object")
        check_schema_integers(parameters, what, fields[i])
        head = '\n{"name": ' + json.dumps(function["name"]) + ', "arguments": '
        rules.append(f"call{i}: {open_tag} {json.dumps(head)} args{i} " + json.dumps("}\n") + f" {close_tag}")
        rules.append(f"args{i}: %json {json.dumps(_compact({'type': 'object', **parameters}))}")
        names.append(f"call{i}")
    # A newline may follow the last call: models write one before their end-of-turn token,
    # and a grammar that took it for the start of another call would force one.
    calls = 'call "\\n"?' if one_call else 'call ("\\n" call)* "\\n"?'
    start = calls if answer is None else f"{calls} | answer"
    rules = [f"start: {start}", "call: " + " | ".join(names)] + rules
    if answer is not None:
        check_schema_integers(answer, "the JSON schema")
        rules.append(f"answer: %json {json.dumps(_compact(answer))}")
    try:
        return _llguidance().LLMatcher.grammar_from_lark("\n".join(rules))
    except (ValueError, TypeError, RecursionError) as exc:
        raise GrammarError(f"{what} cannot be used: {_one_line(str(exc))}") from None


def _compact(schema: dict) -> dict:
    """`schema` generating JSON without optional whitespace (the module docstring says why);
    its own `x-guidance` options, if an object, on top."""
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **(own if isinstance(own, dict) else {})}}


def tool_tags(tokenizer) -> tuple[str, str]:
    """<tool_call> and </tool_call> as grammar terms: the token that the model's vocabulary
    has for a tag, by id (llguidance keeps added tokens apart from text: it would not let the
    text "<tool_call>" be written with the tag's own token), else the tag as text."""
    terms = []
    for tag in (TOOL_OPEN, TOOL_CLOSE):
        token = tag_token(tokenizer, tag)
        terms.append(f"<[{token}]>" if token is not None else json.dumps(tag))
    return terms[0], terms[1]


def tag_token(tokenizer, tag: str) -> int | None:
    """The id of the token that the model's vocabulary has for `tag` as a whole, or None."""
    backend = getattr(tokenizer, "backend", None)
    return backend.token_to_id(tag) if backend is not None else None


class Grammars:
    """Grammars over one model's vocabulary. Thread-safe: front ends check grammars in their
    threads while the engine thread builds constraints."""

    # Compiled grammars kept for the next request with the same one (a schema is compiled
    # once in the front end's check, then only copied on the engine thread).
    KEPT = 32

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer  # a mlxserve.tokenizer.Tokenizer
        self._index = None  # the llguidance.LLTokenizer, built on first use
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar -> fresh LLMatcher
        self._lock = threading.Lock()

    def _vocabulary(self):
        with self._lock:
            if self._index is None:
                llg = _llguidance()
                try:
                    self._index = llg.LLTokenizer(self._tokenizer.backend.to_str(),
                                                  eos_token=sorted(self._tokenizer.eos_token_ids))
                except Exception as exc:  # (llguidance raises plain exceptions for tokenizers it cannot read)
                    raise GrammarError(f"constrained decoding cannot use this model's tokenizer: {exc}") from None
            return self._index

    def _matcher(self, grammar: str):
        """A fresh matcher of `grammar` (compiled once, then copied); GrammarError if the
        grammar cannot be used or admits no answer at all."""
        with self._lock:
            fresh = self._compiled.get(grammar)
            if fresh is not None:
                self._compiled.move_to_end(grammar)
        if fresh is None:
            fresh = _llguidance().LLMatcher(self._vocabulary(), grammar, log_level=0)
            if fresh.is_error():
                raise GrammarError(f"the grammar cannot be used: {_one_line(fresh.get_error())}")
            fresh.compute_bitmask()  # the first mask: only then is a grammar that admits nothing stopped
            if fresh.is_stopped():  # only an end-of-turn token could come: e.g. {"$ref": "#"}
                raise GrammarError("the grammar cannot be used: no text satisfies it")
            with self._lock:
                self._compiled[grammar] = fresh
                while len(self._compiled) > self.KEPT:
                    self._compiled.popitem(last=False)
        return fresh.deep_copy()

    def check(self, grammar: str) -> None:
        """Raise GrammarError if `grammar` cannot constrain this model's output."""
        self._matcher(grammar)

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self._matcher(grammar), self._vocabulary().vocab_size)


class Constraint:
    """One row's grammar state: which tokens may come next, given the tokens it committed."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.mask_words = (vocab_size + 31) // 32  # the mask's length in int32 words
        self.error: str | None = None  # set when a committed token was refused (see consume)

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into `out` (`mask_words` contiguous int32: one bit per
        token id, id i at bit i % 32 of word i // 32)."""
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def consume(self, token: int) -> None:
        """Follow a committed token. The mask allowed it, yet llguidance may still refuse it
        (a schema whose fixed text spells a special token such as "<|im_end|>", a pattern
        too large for its lexer): `error` then says so, and the row ends with that error
        (Scheduler._commit) while the others go on."""
        if self.error is None and not self._matcher.consume_token(token):
            self.error = f"{ANSWER_REFUSED} (token {token}: {_one_line(self._matcher.get_error())})"

    @property
    def finished(self) -> bool:
        """The answer is complete: nothing may follow (but an end-of-turn token)."""
        return self._matcher.is_stopped()


# The start of the error a row ends with when its grammar refused one of its tokens.
ANSWER_REFUSED = "the answer could not go on under its response_format"


def _one_line(message: str, limit: int = 300) -> str:
    """An llguidance error as one line: without the parser state it may dump after it
    (pages of it), at most `limit` characters."""
    line = " ".join(message.split("<state>", 1)[0].split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
