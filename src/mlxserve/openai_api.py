"""OpenAI's wire format, in and out: request JSON -> (prompt ids, SamplingParams), engine
events -> response JSON and stream chunks. The only place that knows the wire format."""

from __future__ import annotations

import base64
import codecs
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .chat_output import TOOL_CLOSE, TOOL_OPEN
from .grammar import (GrammarError, Grammars, json_schema_grammar, response_format_schema, tag_token, tool_call_grammar,
                      tool_tags)
from .sampling import MAX_TOP_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """One parsed request: what to generate and how to answer."""

    kind: str  # "chat" | "text"
    prompts: list[list[int]]  # one per choice: each prompt n times in a row
    params: SamplingParams  # the first choice's (see choice_params)
    stream: bool
    include_usage: bool
    model: str
    tools_enabled: bool = False  # parse tool calls out of the answer
    echo: bool = False  # /v1/completions: the answer starts with the prompt (and its logprobs)
    score_only: bool = False  # echo with max_tokens 0: score the prompt, generate nothing
    # When the answer was made: the same in every chunk of a stream, as OpenAI's `created`.
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1  # choices per prompt
    calls_constrained: bool = False  # the answer's grammar writes tool calls (see _grammar)
    calls_only: bool = False  # ... and nothing else: tool_choice "required" or a named function
    legacy_functions: bool = False  # asked with the deprecated `functions`: the call comes as `function_call`

    def counts_prompt(self, index: int) -> bool:
        """Whether choice `index`'s prompt tokens count in the usage: a prompt counts once,
        however many choices it has (as OpenAI counts it)."""
        return index % self.n == 0

    def choice_params(self, index: int) -> SamplingParams:
        """Choice `index`'s parameters: with a seed, the i-th choice of a prompt draws with
        seed + i * 2**32, so that n choices differ, the same request gives the same n answers,
        and requests with nearby seeds (s, s + 1, ...) share none."""
        i = index % self.n
        if not i or self.params.seed is None:
            return self.params
        return replace(self.params, seed=self.params.seed + i * CHOICE_SEED_STRIDE)


CHOICE_SEED_STRIDE = 2**32  # see Completion.choice_params

# Choices one request may ask for (`n`): each is a request of its own in the engine, and at
# most this many let one client's request take only a quarter of the 64 rows that run at once.
MAX_CHOICES = 16

_FIELD_TYPES = {
    "model": str, "max_tokens": int, "max_completion_tokens": int, "temperature": (int, float),
    "top_p": (int, float), "top_k": int, "min_p": (int, float), "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "repetition_penalty": (int, float), "seed": int, "n": int,
    "stream": bool, "logprobs": (bool, int), "top_logprobs": int, "user": str, "stream_options": dict,
    "chat_template_kwargs": dict, "ignore_eos": bool, "tools": list, "echo": bool,
    "response_format": dict, "logit_bias": dict, "suffix": str, "best_of": int,
    "parallel_tool_calls": bool, "functions": list, "function_call": (str, dict),
}


def parse_request(body: object, kind: str, tokenizer, context_length: int, served_model: str,
                  grammars: Grammars | None = None) -> Completion:
    """Validate an /v1/chat/completions (kind "chat") or /v1/completions ("text") body.
    `grammars` (the engine's) checks the answer's grammar (response_format, enforced tool
    calls: see _grammar) against the model's vocabulary; without it, only its form is
    checked."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    # An explicit null means "the default", as in OpenAI's API (its SDKs send them).
    body = {key: value for key, value in body.items() if value is not None}
    for name, types in _FIELD_TYPES.items():
        value = body.get(name)
        # (true is an int to Python: only a field that takes a bool takes one, not "temperature": true)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in
                                                                   (types if isinstance(types, tuple) else (types,)))):
            raise APIError(400, f"'{name}' has the wrong type", param=name)
    model = _model(body, served_model)
    _check_stream_options(body)
    n = body.get("n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be from 1 to {MAX_CHOICES}, got {_short(n)}", param="n")
    if body.get("best_of", n) != n:  # (best_of == n: every answer made is returned, none chosen)
        raise APIError(400, "best_of (returning the best n of more answers) is not supported: leave it out or "
                            "make it equal to n", param="best_of")
    if body.get("suffix"):
        raise APIError(400, "suffix (text to follow the completion, for insertion) is not supported by this "
                            "server", param="suffix")
    schema = _response_format(body.get("response_format"))
    tools, shown, choice, grammar = None, None, "auto", None
    legacy = kind == "chat" and "functions" in body
    if kind == "chat":
        body = _legacy_functions(body)
        shown, choice = _tools(body, legacy)
        # tool_choice "none": the model is shown the tools (as OpenAI's are: the prompt is the
        # one "auto" gives, which the prefix cache shares) but makes no calls (_no_call_bias).
        tools = None if choice == "none" else shown
        grammar = _grammar(body, tokenizer, tools, choice, schema, grammars, legacy)
        prompts = [_chat_prompt(body, tokenizer, shown, think=grammar is None)]
        top_logprobs = body.get("top_logprobs") or 0
        if not isinstance(body.get("logprobs", False), bool):  # (an int is /v1/completions' form)
            raise APIError(400, f"'logprobs' of /v1/chat/completions is true or false (top_logprobs asks for "
                                f"alternatives), got {_short(body['logprobs'])}", param="logprobs")
        logprobs = body.get("logprobs", False)
    else:
        grammar = _grammar(body, tokenizer, None, "auto", schema, grammars)
        prompts = _text_prompts(body, tokenizer)
        # /v1/completions: `logprobs` is the number of top alternatives (0..5 in OpenAI's API;
        # up to 20 here, as chat's top_logprobs), or null for none.
        raw = body.get("logprobs")
        if raw is not None and (isinstance(raw, bool) or not 0 <= raw <= MAX_TOP_LOGPROBS):
            raise APIError(400, f"'logprobs' of /v1/completions is the number of top alternatives to return, "
                                f"an integer from 0 to {MAX_TOP_LOGPROBS} (or null for none), got {_short(raw)}",
                           param="logprobs")
        logprobs = raw is not None
        top_logprobs = raw or 0

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    # The field the limit came from, as errors name it (OpenAI's newer name, where given).
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        # Not asked for: as many as the context leaves after the longest prompt (OpenAI's
        # default). The row's KV grows with what it generates, so this reserves nothing.
        room = context_length - max(len(p) for p in prompts)
        if room < 1:
            raise APIError(400, f"this model's context length is {context_length} tokens; the prompt has "
                                f"{max(len(p) for p in prompts)}, which leaves no room for an answer",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        max_tokens = room
    echo = kind == "text" and bool(body.get("echo"))
    if echo and body.get("stream"):
        raise APIError(400, "echo is not supported with stream", param="echo")
    score_only = echo and max_tokens == 0
    if score_only:
        max_tokens = 1  # nothing is generated; 1 only satisfies the sampling checks
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    stop = tuple(s for s in stop if s)  # (an empty string stops nothing: ignored, as OpenAI ignores it)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=body.get("top_k", 0),
        min_p=_float(body, "min_p", 0.0),
        presence_penalty=_float(body, "presence_penalty", 0.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
        seed=body.get("seed"),
        stop=stop,
        stop_token_ids=_one_call_stop(body, tokenizer, tools, grammar),
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=_no_call_bias(_logit_bias(body.get("logit_bias"), tokenizer.vocab_size), tokenizer,
                                 choice == "none" and shown is not None),
        grammar=grammar,
    )
    try:
        params.validate()
    except ValueError as exc:
        field, _, reason = str(exc).partition(":")
        if field == "max_tokens":
            raise APIError(400, max_name + ":" + reason, param=max_name) from None
        raise APIError(400, str(exc), param=field) from None
    for prompt in prompts:
        if len(prompt) + (0 if score_only else params.max_tokens) > context_length:
            raise APIError(400, f"this model's context length is {context_length} tokens; the prompt has "
                                f"{len(prompt)} and {max_name} asks for {_short(params.max_tokens)}",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    options = body.get("stream_options") or {}
    prompts = [prompt for prompt in prompts for _ in range(n)]
    return Completion(kind, prompts, params, bool(body.get("stream", False)),
                      bool(options.get("include_usage")), model, bool(tools), echo, score_only, n=n,
                      calls_constrained=bool(tools) and grammar is not None,
                      calls_only=bool(tools) and choice in ("required", "named"), legacy_functions=legacy)


def _check_stream_options(body: dict) -> None:
    """stream_options only beside stream: true, as OpenAI has it (else the client thinks it
    asked for usage chunks that a whole answer never sends)."""
    options = body.get("stream_options")
    if options is None:
        return
    if body.get("stream") is not True:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise APIError(400, f"stream_options.include_usage must be true or false, got {_short(include)}",
                       param="stream_options")


def _model(body: dict, served_model: str) -> str:
    model = body.get("model") or served_model
    if not isinstance(model, str):
        raise APIError(400, "'model' has the wrong type", param="model")
    if model != served_model:
        raise model_not_found(model, served_model)
    return model


def model_not_found(name: str, served_model: str) -> APIError:
    """The 404 for a model id other than the served one (a request's `model`, GET /v1/models/{id})."""
    return APIError(404, f"model '{_cut(name, 100)}' does not exist (this server serves '{served_model}')",
                    type="invalid_request_error", param="model", code="model_not_found")


def _response_format(value: dict | None) -> dict | None:
    """The JSON Schema that `response_format` holds the answer to (grammar.py), or None."""
    try:
        return response_format_schema(value)
    except GrammarError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format") from None


def _grammar(body: dict, tokenizer, tools: list | None, choice: str, schema: dict | None,
             grammars: Grammars | None, legacy: bool = False) -> str | None:
    """The grammar the answer is held to, or None. With tools, tool_choice "required" or a
    named function makes the answer tool calls (one, for a named function or
    parallel_tool_calls false), and a response_format under "auto" makes it either calls or
    JSON under that format; otherwise the response_format alone, if any. `grammars` (the
    engine's) checks it against the model's vocabulary. `legacy`: the tools came as
    `functions`, as errors name them."""
    try:
        format_grammar = json_schema_grammar(schema) if schema is not None else None
        if format_grammar is not None and grammars is not None:
            grammars.check(format_grammar)
    except GrammarError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format") from None
    if not tools or (choice == "auto" and schema is None):
        return format_grammar
    one_call = choice == "named" or body.get("parallel_tool_calls") is False
    # Errors name a tool by its place in the request: a named choice leaves only that function in `tools`.
    place = {id(tool): i for i, tool in enumerate(body["tools"])}
    fields = [_tool_field(place[id(tool)], "parameters", legacy) for tool in tools]
    try:
        grammar = tool_call_grammar(tools, tool_tags(tokenizer), answer=schema if choice == "auto" else None,
                                    one_call=one_call, fields=fields, what=f"the {tools_param(legacy)}' schemas")
        if grammars is not None:
            grammars.check(grammar)
    except GrammarError as exc:
        field = tools_param(legacy)
        raise APIError(400, f"{field}: {exc}", param=field) from None
    return grammar


def _no_call_bias(bias: tuple[tuple[int, float], ...], tokenizer, no_calls: bool) -> tuple[tuple[int, float], ...]:
    """Under tool_choice "none" with tools shown: the opening tag of a call, where the
    vocabulary has it as a token, biased by -100 (unless the request biases it itself), so
    that the model does not start a call; its answer is read as text, calls not parsed."""
    token = tag_token(tokenizer, TOOL_OPEN) if no_calls else None
    if token is None or token in dict(bias):
        return bias
    return tuple(sorted((*bias, (token, -100.0))))


def _logit_bias(value: dict | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} -> sorted (id, bias) pairs."""
    if not value:
        return ()
    bias = {}
    for key, number in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= len(str(vocab)) and int(key) < vocab):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}) written as strings, got "
                                f"{_short(key)}", param="logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not (-100 <= number <= 100):
            raise APIError(400, f"logit_bias values must be numbers in [-100, 100], got {_short(number)} for token "
                                f"{key}", param="logit_bias")
        bias[int(key)] = float(number)
    return tuple(sorted(bias.items()))


def _short(value: object, limit: int = 40) -> str:
    """A value as JSON for an error message, cut short."""
    return _cut(json.dumps(value, ensure_ascii=False), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _float(body: dict, name: str, default: float) -> float:
    """A number field as a float; JSON integers have no size limit, floats do."""
    try:
        return float(body.get(name, default))
    except OverflowError:
        raise APIError(400, f"{name}: must be a number in range, got an integer too large for one "
                            f"({len(str(body[name]))} digits)", param=name) from None


def _one_call_stop(body: dict, tokenizer, tools: list | None, grammar: str | None) -> tuple[int, ...]:
    """parallel_tool_calls false where no grammar holds the answer (tool_choice "auto" without
    a response_format): the answer ends with its first call's closing tag, where the model's
    vocabulary has that tag as a token (else its calls are not read as calls at all). The
    tag adds no text; the parser takes a call whose tag is missing at the answer's end."""
    if not tools or grammar is not None or body.get("parallel_tool_calls") is not False:
        return ()
    token = tag_token(tokenizer, TOOL_CLOSE)
    return () if token is None else (token,)


def _legacy_functions(body: dict) -> dict:
    """The deprecated `functions` / `function_call` as the `tools` / `tool_choice` that
    replaced them, so that an old client's requests work; at most one call per answer, as
    the legacy answer's `function_call` holds one. Mixed with the new fields: a 400 (which
    of them to follow is anyone's guess)."""
    legacy = [name for name in ("functions", "function_call") if name in body]
    if not legacy:
        return body
    for name in ("tools", "tool_choice"):
        if name in body:
            raise APIError(400, f"'{legacy[0]}' is the deprecated form of tools and tool_choice: give "
                                f"'{legacy[0]}' or '{name}', not both", param=legacy[0])
    functions = body.get("functions", [])
    for i, fn in enumerate(functions):
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise APIError(400, f'functions[{i}] must be {{"name": …, "description": …, "parameters": {{…}}}}',
                           param="functions")
    choice = body.get("function_call", "auto")
    if isinstance(choice, dict):
        # (a name that is no string is none of them: a list or an object would be unhashable in the set)
        if not isinstance(choice.get("name"), str) or choice["name"] not in {fn["name"] for fn in functions}:
            raise APIError(400, 'function_call must name a function in functions: {"name": …}', param="function_call")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice not in ("auto", "none"):
        raise APIError(400, 'function_call must be "auto", "none" or {"name": …}', param="function_call")
    out = {key: value for key, value in body.items() if key not in legacy}
    return {**out, "tools": [{"type": "function", "function": fn} for fn in functions], "tool_choice": choice,
            "parallel_tool_calls": False}


def _tools(body: dict, legacy: bool = False) -> tuple[list | None, str]:
    """(The tools to show the model, or None: none given; the choice: "auto", "none",
    "required" or "named", which leaves only the named function in the tools). `legacy`:
    they came as `functions` (_legacy_functions), which errors name as the client sent them."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise APIError(400, "tool_choice must be auto, none, required or "
                                '{"type": "function", "function": {"name": …}}', param="tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "tool_choice must be auto, none, required or a named function", param="tool_choice")
    if not tools:  # (None, or an empty list)
        if named is not None or choice == "required":
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, "auto"
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": …}}}}', param="tools")
        # (null: no parameters; any other value that is not an object, falsy ones such as [], "" or
        # 0 included, is no schema: the grammar of enforced calls reads it as one)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, f"{_tool_field(i, 'parameters', legacy)} must be a JSON Schema object",
                           param=tools_param(legacy))
        if TOOL_OPEN in fn["name"] or TOOL_CLOSE in fn["name"]:
            raise APIError(400, f"{_tool_field(i, 'name', legacy)} must not contain {TOOL_OPEN} or {TOOL_CLOSE}: "
                                "a call naming it could not be read back", param=tools_param(legacy))
    if named is not None:
        if named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, "tool_choice names a function that is not in tools", param="tool_choice")
        return [t for t in tools if t["function"]["name"] == named], "named"
    return tools, choice


def tools_param(legacy: bool) -> str:
    """The request field its tools came in, as errors name it: `functions` for the deprecated
    form (legacy, see _legacy_functions), else `tools`."""
    return "functions" if legacy else "tools"


def _tool_field(i: int, key: str, legacy: bool) -> str:
    """A field of tool i's function as the request sent it, for errors: tools[i].function.key,
    or functions[i].key for the deprecated `functions` (legacy), which _legacy_functions
    turned into tools."""
    return f"functions[{i}].{key}" if legacy else f"tools[{i}].function.{key}"


def _chat_prompt(body: dict, tokenizer, tools: list | None, think: bool = True) -> list[int]:
    """The chat's prompt ids. `think` False (a constrained answer, which must start as its
    grammar says) renders the template with enable_thinking=False unless the request sets it:
    a reasoning model's template then leaves the thinking out (Qwen3: an empty think block)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool",
                                                            "function"):
            raise APIError(400, f"messages[{i}] needs a role of system, developer, user, assistant or tool (or "
                                "function, tool's deprecated form)", param="messages")
        if m["role"] == "function" and not isinstance(m.get("name"), str):
            raise APIError(400, f"messages[{i}] (a function's result) needs the function's name", param="messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        if m.get("name") is not None and not isinstance(m["name"], str):  # (templates would write 5 as "5")
            raise APIError(400, f"messages[{i}].name must be a string, got {_short(m['name'])}", param="messages")
        if content is None and not (m["role"] == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            # (As OpenAI: only an assistant turn that made calls may leave its text out; a
            # message without content is more likely a client's bug than an empty message.)
            raise APIError(400, f"messages[{i}].content is required (a string or a list of parts) in a "
                                f"{m['role']!r} message; an assistant message may leave it out or null only "
                                "beside tool_calls", param="messages")
        if m["role"] in ("tool", "function") and not answers_a_call(messages[:i]):
            # (As OpenAI: a result nobody asked for is a broken history, not something to render.)
            raise APIError(400, f"messages[{i}] is a {m['role']!r} message, which must answer an assistant "
                                "message's tool_calls (with only other results between them)", param="messages")
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    normalized = [_normalize_message(m, i) for i, m in enumerate(messages)]
    variables = dict(body.get("chat_template_kwargs") or {})
    for name in _RESERVED_TEMPLATE_VARIABLES.intersection(variables):
        raise APIError(400, f"chat_template_kwargs cannot set '{name}' (it comes from the request's own "
                            "fields)", param="chat_template_kwargs")
    if not think:
        variables.setdefault("enable_thinking", False)
    add_generation_prompt = variables.pop("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise APIError(400, "chat_template_kwargs.add_generation_prompt must be true or false",
                       param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(normalized, add_generation_prompt=add_generation_prompt,
                                             tools=tools, **variables)
    except ValueError as exc:  # the template rejected the conversation
        raise APIError(400, f"chat template: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def answers_a_call(earlier: list[dict]) -> bool:
    """Whether a tool's (or function's) result after the messages `earlier` answers calls: it
    follows an assistant message that made some, with only other results between them."""
    for m in reversed(earlier):
        if m["role"] not in ("tool", "function"):
            return m["role"] == "assistant" and bool(m.get("tool_calls") or m.get("function_call"))
    return False


# Template variables that the request's own fields set (messages, tools), or names of the
# rendering functions' own arguments, which a variable cannot also be passed as.
_RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "template", "self"}


def part_text(part: object, where: str, text_types: tuple[str, ...], refusal_ok: bool, param: str,
              context: str = "") -> str:
    """One content part's text: a text part's (`text_types`), or where `refusal_ok` (an
    assistant's message: OpenAI takes refusal parts there only) a refusal part's. Else a 400
    naming `where` (e.g. messages[0].content[1]); `context` follows the kinds it takes."""
    kind = part.get("type") if isinstance(part, dict) else None
    key = "text" if kind in text_types else "refusal" if kind == "refusal" and refusal_ok else None
    if key is None:
        allowed = "text or refusal" if refusal_ok else "text"
        raise APIError(400, f"{where}: only {allowed} content parts are supported{context}, got type {_short(kind)}",
                       param=param)
    if not isinstance(part.get(key), str):
        raise APIError(400, f"{where}.{key} must be a string, got {_short(part.get(key))}", param=param)
    return part[key]


def _normalize_message(message: dict, i: int) -> dict:
    """Text parts joined into one string (templates expect strings), an assistant's refusal
    parts (as OpenAI answers a refusal, sent back in the history) as its text; system ==
    developer. `i`: the message's index, for errors."""
    m = dict(message)
    if m["role"] == "developer":
        m["role"] = "system"
    # The deprecated forms of a call and of its result (requests with `functions`), as tool ones.
    if m["role"] == "function":
        m["role"] = "tool"
    function_call = m.pop("function_call", None)
    if function_call is not None and m.get("tool_calls") is None:
        m["tool_calls"] = [{"type": "function", "function": function_call}]
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            texts.append(part_text(part, f"messages[{i}].content[{j}]", ("text",), m["role"] == "assistant",
                                   "messages", context=f" in {m['role']!r} messages"))
        m["content"] = "".join(texts)
    elif content is None:
        m["content"] = ""
    if m.get("tool_calls") is not None:
        # OpenAI clients send arguments as a JSON string; templates expect the object. Text that
        # is not JSON (a call the model got wrong, sent back as it wrote it) stays text, which
        # Qwen's templates write as it is.
        calls = []
        for call in m["tool_calls"] if isinstance(m["tool_calls"], list) else [None]:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, "tool_calls entries need function.name", param="messages")
            arguments = fn.get("arguments", "{}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments or "{}")
                except (ValueError, RecursionError):  # also nested too deep, or too long an integer
                    pass
            calls.append({**call, "function": {**fn, "arguments": arguments}})
        m["tool_calls"] = calls
    return m


def _text_prompts(body: dict, tokenizer, name: str = "prompt", appended: tuple[int, ...] = ()) -> list[list[int]]:
    """The texts (or token ids) of a request's `name` field, tokenized (a text's ids followed
    by `appended`)."""
    prompt = body.get(name)
    vocab = tokenizer.vocab_size
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt) + list(appended)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) + list(appended) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
          and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, f"'{name}' must be a string, a list of strings, or token ids", param=name)
    if any(not p for p in prompts):
        raise APIError(400, f"'{name}' must not be empty", param=name)
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise APIError(400, f"token ids must be in [0, {vocab})", param=name)
    return prompts


# ---- embeddings ------------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """One parsed /v1/embeddings request."""

    inputs: list[list[int]]  # token ids, one list per input
    model: str
    base64: bool  # encoding_format "base64": little-endian float32 bytes, base64-encoded
    dimensions: int | None  # keep the first this many components (then normalise again)


def parse_embeddings(body: object, tokenizer, context_length: int, served_model: str,
                     hidden_size: int, max_inputs: int) -> Embeddings:
    """Validate an /v1/embeddings body: `input` a string, a list of strings, token ids or lists
    of token ids (at most `max_inputs` inputs). A text is tokenized as the model's tokenizer
    would for an embedding: with what its rules append (Tokenizer.appended_ids)."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    model = _model(body, served_model)
    if "input" not in body:
        raise APIError(400, "'input' is required: a string, a list of strings, or token ids", param="input")
    given = body["input"]
    count = len(given) if isinstance(given, list) and given and not isinstance(given[0], int) else 1
    if count > max_inputs:  # (before tokenizing them all)
        raise APIError(400, f"this request has {count} inputs; this server holds at most {max_inputs} requests "
                            f"at once", param="input")
    inputs = _text_prompts(body, tokenizer, "input", getattr(tokenizer, "appended_ids", ()))
    form = body.get("encoding_format", "float")
    if form not in ("float", "base64"):
        raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {_short(form)}",
                       param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                   or not 1 <= dimensions <= hidden_size):
        raise APIError(400, f"'dimensions' must be an integer from 1 to {hidden_size} (this model's), got "
                            f"{_short(dimensions)}", param="dimensions")
    for index, ids in enumerate(inputs):
        if len(ids) > context_length:
            raise APIError(400, f"this model's context length is {context_length} tokens; input {index} has "
                                f"{len(ids)}", param="input", code="context_length_exceeded")
    return Embeddings(inputs, model, form == "base64", dimensions)


def embedding_json(hidden: list[float], request: Embeddings, index: int) -> list[float] | str:
    """Input `index`'s embedding as the answer holds it: the model's last hidden state at its
    last token (cut to `dimensions`), scaled to unit length."""
    vector = np.asarray(hidden, dtype=np.float32)[: request.dimensions]
    if not np.isfinite(vector).all():  # (the model's doing, e.g. float16 overflow: not the client's)
        raise APIError(500, f"the model's hidden state for input {index} is not finite (NaN or infinity)",
                       type="server_error")
    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    if request.base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embeddings_response(request: Embeddings, vectors: list, prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


# ---- responses -----------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict:
    """`reasoning_tokens`: those of the answers' reasoning (reasoning_tokens); as OpenAI's
    usage, completion_tokens_details is always there (0 for an answer without reasoning)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def reasoning_tokens(tokenizer, reasoning: str, completion_tokens: int) -> int:
    """The tokens of an answer's reasoning text, as the tokenizer encodes it again (at most
    the answer's own count)."""
    if not reasoning:
        return 0
    return min(len(tokenizer.encode(reasoning, add_special_tokens=False)), completion_tokens)


def token_text(tokenizer, token_id: int) -> str:
    """A token as text: its bytes read as UTF-8, or, for a token holding part of a character,
    OpenAI's spelling of those bytes, "bytes:\\xe6\\x9d" (distinct tokens stay distinct, where
    decoding gives each of them U+FFFD)."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class AnswerLogprobs:
    """The log-probs an answer reports: those of the tokens whose text is in it, whatever the
    events carried. A token's entry goes out once the answer's text has reached its first byte
    (`feed` returns it then); so the token that stopped the answer (EOS or a stop token id, which
    adds no text) and tokens a stop string cut off whole never go out. A token a stop string cuts
    in two is kept: part of its text is in the answer. Both are counted in characters (the
    tokens' as TextOffsets counts them), not bytes: bytes that are no UTF-8 are one U+FFFD in
    the text, whose 3 bytes can be more than the tokens had."""

    def __init__(self, tokenizer, params: SamplingParams):
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids))
        self._pending: deque = deque()  # (entry, the character of the text its first byte is in)
        self._offsets = TextOffsets(tokenizer)  # where the tokens fed start
        self._text_chars = 0  # characters of the answer's text so far

    def feed(self, event) -> list:
        """The entries whose text the answer has reached with this event."""
        entries = list(event.logprobs or ())
        if (event.finish_reason == "stop" and entries and event.token_ids
                and event.token_ids[-1] in self._stop_ids and entries[-1].token_id == event.token_ids[-1]):
            entries.pop()  # the stop token: no text, even where the tokens' bytes drift from the text
        for entry, start in zip(entries, self._offsets.take([entry.token_id for entry in entries])):
            self._pending.append((entry, start))
        self._text_chars += len(event.text)
        released = []
        while self._pending and self._pending[0][1] < self._text_chars:
            released.append(self._pending.popleft()[0])
        if event.finish_reason:
            # Tokens of no text (ids beyond the vocabulary, a GGUF's unused ones) that the
            # answer ends with: no later text reaches them, yet their empty text is in the
            # answer, as such a token's in the middle is (an answer cut by max_tokens had one
            # entry fewer than its completion_tokens). A token a stop string cut off has text.
            while self._pending and not self._tokenizer.token_bytes(self._pending[0][0].token_id):
                released.append(self._pending.popleft()[0])
        return released


class TextOffsets:
    """Where each token starts in a text, in characters (legacy logprobs' `text_offset`),
    counted from the tokens' bytes; a token that starts inside a character starts with it."""

    def __init__(self, tokenizer, start: int = 0):
        self._tokenizer = tokenizer
        self._decoder = _utf8_decoder()
        self._chars = start

    def take(self, token_ids: list[int]) -> list[int]:
        """The offsets of the next tokens of the text."""
        offsets = []
        for token_id in token_ids:
            raw = self._tokenizer.token_bytes(token_id)
            pending = self._decoder.getstate()[0]  # the start of a character, held back
            # The token goes on with that character, or the character was never finished (it
            # is one U+FFFD in the text) and the token starts after it.
            broken = pending and raw and _utf8_decoder().decode(pending + raw[:1]).startswith("\ufffd")
            offsets.append(self._chars + 1 if broken else self._chars)
            self._chars += len(self._decoder.decode(raw))
        return offsets


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


def logprobs_json(kind: str, entries: list, tokenizer, text_offset: list[int] | None = None) -> dict | None:
    """Per-token logprobs in the chat format ({"content": [...]}) or the legacy completions one.
    `bytes` are each token's raw bytes: joined, they are the text's UTF-8. Legacy: `top_logprobs`
    holds the top alternatives and the sampled token (OpenAI's "up to logprobs + 1"), and
    `text_offset` where each token starts in the answer (from 0 unless given)."""
    if entries is None:
        return None
    if kind == "chat":
        def one(token_id: int, logprob: float) -> dict:
            return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                    "bytes": list(tokenizer.token_bytes(token_id))}

        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}
    if text_offset is None:
        text_offset = TextOffsets(tokenizer).take([e.token_id for e in entries])
    return {
        "tokens": [token_text(tokenizer, e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_logprobs(e, tokenizer) for e in entries],
        "text_offset": text_offset,
    }


def _top_logprobs(entry, tokenizer) -> dict:
    top = {token_text(tokenizer, t): lp for t, lp in entry.top}
    top.setdefault(token_text(tokenizer, entry.token_id), entry.logprob)
    return top


def echoed_logprobs(prompt: list[int], scores: list, generated: list, tokenizer,
                    generated_offset: list[int]) -> dict:
    """Completions logprobs for echo: the prompt's tokens (the first has no log-prob) then the
    generated ones (at `generated_offset` in the answer), as lm-evaluation-harness reads them."""
    offsets = TextOffsets(tokenizer).take(prompt)
    first = {"tokens": [token_text(tokenizer, prompt[0])], "token_logprobs": [None], "top_logprobs": [None],
             "text_offset": offsets[:1]}
    rest = logprobs_json("text", list(scores[1:]) + generated, tokenizer, offsets[1:] + generated_offset)
    return {k: first[k] + rest[k] for k in first}


def response(c: Completion, rid: str, choices: list[dict], usage_json: dict) -> dict:
    return _envelope(c, rid, "chat.completion" if c.kind == "chat" else "text_completion", choices, usage_json)


def chunk(c: Completion, rid: str, choices: list[dict], usage_json: dict | None = None) -> dict:
    return _envelope(c, rid, "chat.completion.chunk" if c.kind == "chat" else "text_completion", choices, usage_json)


def _envelope(c: Completion, rid: str, obj: str, choices: list[dict], usage_json: dict | None) -> dict:
    out = {"id": rid, "object": obj, "created": c.created, "model": c.model,
           "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if usage_json is not None or c.include_usage:  # (a stream's other chunks: null, as OpenAI's)
        out["usage"] = usage_json
    return out


def _fingerprint() -> str:
    from . import __version__

    return f"mlxserve-{__version__}"


SYSTEM_FINGERPRINT = _fingerprint()
