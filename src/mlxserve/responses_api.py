"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat completions path.

A Responses request is translated into a chat completion request (messages, tools,
tool_choice, response_format, max_tokens) and checked and tokenized by the same code
(openai_api.parse_request), so templates, constrained decoding and errors behave alike; the
chat answer (content, reasoning, tool calls) is then written as Responses output items:
a `reasoning` item, a `message` with one `output_text` part, and a `function_call` per call.
Streaming sends the typed events of that API (`response.created`, `...output_text.delta`,
`...function_call_arguments.delta`, `response.completed`, ...), each item opened, filled and
closed in order.

`previous_response_id` continues a stored response's conversation: responses are kept in
memory (`ResponseStore`, the last STORED_RESPONSES of them, unless `store: false`), so they
last as long as the server process. Supported input items: messages (text parts),
`function_call` and `function_call_output` (a tool loop), `reasoning` (skipped: templates drop
earlier reasoning). Only function tools are served. `background: true` generates the response
apart from its request (background.py): it can then be polled, followed, resumed and cancelled.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .openai_api import APIError, Completion, answers_a_call, parse_request, part_text
from .sampling import MAX_TOP_LOGPROBS

if TYPE_CHECKING:
    from .background import BackgroundResponse

STORED_RESPONSES = 1000  # responses kept for previous_response_id and GET, oldest dropped first
EVENTS_KEPT = 64  # ended background responses whose events are kept (to be streamed again), the last ones

# Chat request fields as the Responses API names them, for errors raised by the chat parser.
_PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
                "tools": "tools", "tool_choice": "tool_choice"}


def in_responses_terms(exc: APIError) -> APIError:
    """An error of the chat path with the fields named as the Responses API names them."""
    exc.param = _PARAM_NAMES.get(exc.param, exc.param)
    for chat_name, name in (("max_tokens", "max_output_tokens"), ("response_format", "text.format")):
        exc.message = exc.message.replace(chat_name, name)
    exc.message = re.sub(r"tools\[(\d+)\]\.function\.", r"tools[\1].", exc.message)  # (its tools are flat)
    return exc


@dataclass
class ResponseRequest:
    """A parsed Responses request: the chat completion that answers it, and what its answer
    repeats of the request."""

    completion: Completion
    messages: list[dict]  # the conversation as chat messages (with previous responses'), without instructions
    input_items: list[dict]  # this request's input as Responses items, with ids (GET .../input_items)
    echo: dict  # request fields the response object repeats (instructions, tools, ...)
    store: bool
    background: bool = False  # generated apart from the request (background.py)
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))


@dataclass
class StoredResponse:
    response: dict  # the response object (of a background one: as it was when stored)
    # Chat messages up to and with its answer (what previous_response_id continues); None
    # while a background response runs, and for one that failed or was cancelled.
    conversation: list[dict] | None
    input_items: list[dict]  # its request's input (ResponseRequest.input_items)
    run: "BackgroundResponse | None" = None  # a background response's run (background.py)

    @property
    def current(self) -> dict:
        """The response object as it stands (a background one's may still be in progress:
        the server's event loop only)."""
        return self.run.response if self.run is not None else self.response

    @property
    def status(self) -> str:
        return self.run.status if self.run is not None else self.response["status"]


class ResponseStore:
    """Responses by id, with the conversation that led to each (thread-safe): finished ones,
    and background ones from their start. The oldest finished one goes first when full."""

    def __init__(self, capacity: int = STORED_RESPONSES):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: StoredResponse) -> None:
        with self._lock:
            self._items[stored.response["id"]] = stored
            while len(self._items) > self.capacity:
                oldest = next((key for key, item in self._items.items() if item.run is None or item.run.done), None)
                if oldest is None:  # (all running in the background: they stay until they end)
                    break
                del self._items[oldest]

    def update(self, stored: StoredResponse) -> None:
        """Replace a response that is still stored (one deleted meanwhile stays deleted); a
        background response that has ended: only the last EVENTS_KEPT of them keep their events."""
        with self._lock:
            if stored.response["id"] in self._items:
                self._items[stored.response["id"]] = stored
            ended = [item.run for item in reversed(self._items.values())
                     if item.run is not None and item.run.done and item.run.events is not None]
            for run in ended[EVENTS_KEPT:]:
                run.forget_events()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None


def parse(body: object, tokenizer, context_length: int, served_model: str, grammars, store: ResponseStore) -> ResponseRequest:
    """Validate a /v1/responses body and turn it into the chat completion that answers it."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    for name in ("conversation", "prompt"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    history: list[dict] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise APIError(400, "'previous_response_id' must be a string", param="previous_response_id")
        found = store.get(previous)
        if found is None:
            raise APIError(404, f"no stored response '{str(previous)[:80]}' (responses are kept in this server's "
                                f"memory, the last {store.capacity}, unless sent with store: false)",
                           param="previous_response_id", code="response_not_found")
        if found.conversation is None:
            raise APIError(400, f"response '{previous[:80]}' is {found.status.replace('_', ' ')}: only a "
                                f"completed or incomplete response can be continued", param="previous_response_id")
        history = found.conversation  # (stored without its instructions: each request gives its own)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "'instructions' must be a string", param="instructions")
    _check_fields(body)
    # (validates `input`; a call's output answers a call made in it or in the stored conversation)
    messages = history + _input_messages(body.get("input"), history)
    if not messages:
        raise APIError(400, "'input' holds no message, function_call or function_call_output item (reasoning "
                            "items are skipped)", param="input")
    input_items = _input_items(body["input"])
    # "" is an empty system message, as a chat's own: the template then adds no default of its own.
    system = [{"role": "system", "content": instructions}] if instructions is not None else []
    chat = {"messages": system + messages, "stream": body.get("stream", False)}
    if "model" in body:
        chat["model"] = body["model"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if name in body:
            chat[name] = body[name]
    if "max_output_tokens" in body:
        chat["max_tokens"] = body["max_output_tokens"]
    # As OpenAI: log-probs come only when `include` asks for them; top_logprobs (checked by
    # _check_fields) says how many alternatives each then has, and alone gives none.
    if LOGPROBS in body.get("include", []):
        chat["logprobs"] = True
        chat["top_logprobs"] = body.get("top_logprobs", 0)
    if "tools" in body:
        chat["tools"] = _tools(body["tools"])
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text_format = _text_format(body.get("text"))
    if text_format is not None:
        chat["response_format"] = text_format
    store_it = body.get("store", True)
    if not isinstance(store_it, bool):
        raise APIError(400, "'store' must be true or false", param="store")
    background = body.get("background", False)
    if not isinstance(background, bool):
        raise APIError(400, "'background' must be true or false", param="background")
    if background and not store_it:
        raise APIError(400, "'background' needs 'store': true (a background response is fetched by its id)",
                       param="background")
    try:
        completion = parse_request(chat, "chat", tokenizer, context_length, served_model, grammars)
    except APIError as exc:
        raise in_responses_terms(exc) from None
    echo = {
        "instructions": instructions,
        "tools": body.get("tools", []),
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "max_output_tokens": body.get("max_output_tokens"),
        "top_logprobs": body.get("top_logprobs", 0),
        # (Echoed as sent, as OpenAI's are; neither changes the answer here: see the README.)
        "truncation": body.get("truncation", "disabled"),
        "reasoning": {"effort": body.get("reasoning", {}).get("effort"),
                      "summary": body.get("reasoning", {}).get("summary")},
        "previous_response_id": previous,
        "text": {"format": {"type": "text"}, **body.get("text", {})},
        "metadata": body.get("metadata", {}),
        "user": body.get("user"),
        "store": store_it,
        "background": background,
    }
    return ResponseRequest(completion, messages, input_items, echo, store_it, background)


LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them


def _check_fields(body: dict) -> None:
    """The fields whose errors the chat parser would word in its own API's terms."""
    include = body.get("include", [])
    if not (isinstance(include, list) and all(isinstance(value, str) for value in include)):
        raise APIError(400, f"'include' must be a list of strings such as [\"{LOGPROBS}\"]", param="include")
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise APIError(400, f"'max_output_tokens' must be an integer >= 1, got {json.dumps(limit)[:40]}",
                       param="max_output_tokens")
    top = body.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got "
                            f"{json.dumps(top)[:40]}", param="top_logprobs")
    if body.get("truncation", "disabled") not in ("auto", "disabled"):
        raise APIError(400, f"'truncation' must be \"auto\" or \"disabled\", got {json.dumps(body['truncation'])[:40]}",
                       param="truncation")
    for name in ("metadata", "text", "reasoning"):
        if name in body and not isinstance(body[name], dict):
            raise APIError(400, f"'{name}' must be an object", param=name)
    for name in ("effort", "summary"):
        value = body.get("reasoning", {}).get(name)
        if value is not None and not isinstance(value, str):
            raise APIError(400, f"'reasoning.{name}' must be a string, got {json.dumps(value)[:40]}",
                           param=f"reasoning.{name}")
    _check_metadata(body.get("metadata", {}))
    if "user" in body and not isinstance(body["user"], str):
        raise APIError(400, "'user' must be a string", param="user")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and not (choice.get("type") == "function" and isinstance(choice.get("name"), str)):
        raise APIError(400, 'tool_choice must be auto, none, required or {"type": "function", "name": …}',
                       param="tool_choice")


# OpenAI's limits on `metadata`: so that what it accepts, and only that, is accepted here.
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def _check_metadata(metadata: dict) -> None:
    """`metadata`: at most 16 pairs, keys of at most 64 characters, values strings of at most 512."""
    if len(metadata) > METADATA_KEYS:
        raise APIError(400, f"'metadata' holds at most {METADATA_KEYS} keys, got {len(metadata)}", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise APIError(400, f"metadata keys are at most {METADATA_KEY_CHARS} characters, got {len(key)} "
                                f"({json.dumps(key)[:40]}…)", param="metadata")
        if not isinstance(value, str):
            raise APIError(400, f"metadata values must be strings, got {json.dumps(value)[:40]} for "
                                f"{json.dumps(key)}", param="metadata")
        if len(value) > METADATA_VALUE_CHARS:
            raise APIError(400, f"metadata values are at most {METADATA_VALUE_CHARS} characters, got {len(value)} "
                                f"for {json.dumps(key)}", param="metadata")


def _call_ids(messages: list[dict]) -> set[str]:
    """The ids of the calls the assistant's turns made."""
    return {call["id"] for m in messages for call in m.get("tool_calls") or ()}


def _input_messages(value: object, history: list[dict]) -> list[dict]:
    """`input` (a string, or a list of items) as chat messages, after `history` (the stored
    conversation it continues). A function_call_output must answer a call made before it, in
    the input or the history (as OpenAI checks it: an output of no call is a client's bug,
    which the template would show the model as if it were one), right after the calls or
    other outputs (a chat template renders a result after the turn that made the call)."""
    calls = _call_ids(history)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a string or a non-empty list of items", param="input")
    messages: list[dict] = []
    input_calls: list[tuple[int, str]] = []  # (item index, call_id) of the input's function_call items
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"input[{i}] needs a role of user, system, developer or assistant", param="input")
            messages.append({"role": role, "content": _text_of(item.get("content"), i, role)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", i), "type": "function",
                    "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}
            calls.add(call["id"])
            input_calls.append((i, call["id"]))
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # Calls after the assistant's text, or beside each other: one assistant turn,
                # as the response that made them is stored (conversation_after).
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, (str, list)):
                raise APIError(400, f"input[{i}].output must be a string or a list of text parts", param="input")
            if isinstance(output, list):
                output = _text_of(output, i)
            call_id = _string(item, "call_id", i)
            if call_id not in calls:
                raise APIError(400, f"No tool call found for function call output with call_id "
                                    f"{json.dumps(call_id)[:80]} (input[{i}]): no earlier function_call item, nor the "
                                    "previous response, made it", param="input")
            if not answers_a_call(history + messages):
                raise APIError(400, f"input[{i}]: a function_call_output must follow the function_call items "
                                    "(or other outputs) it answers, with no message between them", param="input")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # chat templates drop earlier turns' reasoning
        else:
            raise APIError(400, f"input[{i}]: items of type {json.dumps(kind)[:40]} are not supported (messages, "
                                "function_call, function_call_output and reasoning are)", param="input")
    # A continuation answers every call the previous response made (its turn ends the stored
    # conversation), as OpenAI requires: the template would show the model a call that never
    # returned. (Its words are OpenAI's; the server made the id, so it needs no quoting.)
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    for call in history[-1].get("tool_calls") or () if history else ():
        if call["id"] not in answered:
            raise APIError(400, f"No tool output found for function call {call['id']}: a request that continues "
                                "the previous response gives a function_call_output item for each of its calls",
                           param="input")
    # So does a call given in the input (OpenAI refuses it in the same words).
    for i, call_id in input_calls:
        if call_id not in answered:
            raise APIError(400, f"No tool output found for function call {json.dumps(call_id)[:80]} (input[{i}]): "
                                "each function_call item needs a function_call_output item after it", param="input")
    return messages


def _input_items(value: str | list) -> list[dict]:
    """A valid `input` as the items GET /v1/responses/{id}/input_items lists: each with an
    id (the client's, or a new one) and a status, a message's text as content parts."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items, ids = [], set()
    for i, given in enumerate(value):
        item = {"type": "message", **given}
        kind = item["type"]
        if kind == "message":
            # Text parts as the API returns them: input_text, or output_text for the assistant's.
            part = "output_text" if item["role"] == "assistant" else "input_text"
            parts = [{"type": "text", "text": item["content"]}] if isinstance(item["content"], str) else item["content"]
            # (An assistant's refusal part stays one, as the response that gave it had it.)
            item["content"] = [{"type": "refusal", "refusal": p["refusal"]} if p["type"] == "refusal" else
                               {"type": part, "text": p["text"], **({"annotations": []} if part == "output_text" else {})}
                               for p in parts]
            prefix = "msg"
        else:
            prefix = {"function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}[kind]
        if kind == "reasoning":
            item.setdefault("summary", [])
        elif item.get("status") not in ("in_progress", "completed", "incomplete"):
            item["status"] = "completed"
        if item.get("id") is None:
            item["id"] = _item_id(prefix)
        elif not (isinstance(item["id"], str) and item["id"]):
            raise APIError(400, f"input[{i}].id must be a non-empty string", param="input")
        elif item["id"] in ids:
            # (The input_items list pages by id: each must name one item.)
            raise APIError(400, f"input[{i}].id {json.dumps(item['id'])[:80]} is the id of an earlier item: "
                                "ids must be unique", param="input")
        ids.add(item["id"])
        items.append(item)
    return items


def input_items_page(items: list[dict], query) -> dict:
    """GET /v1/responses/{id}/input_items: a page of a stored response's input items, as the
    query (`limit` 1-100, default 20; `order` asc or desc, the default; `after`, an item id)
    asks. Raises APIError for a bad query."""
    limit = query.get("limit", "20")
    if not (re.fullmatch(r"[0-9]{1,3}", limit) and 1 <= int(limit) <= 100):
        raise APIError(400, f"'limit' must be an integer from 1 to 100, got {limit[:40]!r}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"'order' must be 'asc' or 'desc', got {order[:40]!r}", param="order")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"'after' names no input item of this response: {after[:80]!r}", param="after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[: int(limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page)}


def _text_of(content: object, i: int, role: str | None = None) -> str:
    """A message's content: a string, or a list of text parts (input_text / output_text, and
    an assistant's refusal parts, as a response's output has them, read as its text).
    `role`: the message's (None: a function_call_output's output)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"input[{i}].content[{j}]" if role is not None else f"input[{i}].output[{j}]"
            texts.append(part_text(part, where, ("input_text", "output_text", "text"), role == "assistant", "input"))
        return "".join(texts)
    raise APIError(400, f"input[{i}].content must be a string or a list of text parts", param="input")


def _string(item: dict, name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{name} must be a string", param="input")
    return value


def _tools(tools: object) -> list:
    """Responses function tools ({type, name, description, parameters}) in the chat shape."""
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type") == "function"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"tools[{i}]: only function tools are supported, got {json.dumps(kind)[:40]}",
                           param="tools")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f'tools[{i}] needs a \'name\': {{"type": "function", "name": …, "parameters": {{…}}}}',
                           param="tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> object:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text_format(text: object) -> dict | None:
    """`text.format` as a chat response_format (None: plain text)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, 'text.format must be an object such as {"type": "json_object"}', param="text.format")
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"text.format type must be 'text', 'json_object' or 'json_schema', got "
                            f"{json.dumps(fmt.get('type'))[:40]}", param="text.format")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "text.format json_schema needs 'schema', a JSON Schema object: {\"type\": "
                                "\"json_schema\", \"name\": …, \"schema\": {…}}", param="text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "answer"), "schema": fmt["schema"]}}
    return {"type": fmt.get("type")}


# ---- the answer ---------------------------------------------------------------------------------
def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Builds a response's output items from the answer's parsed pieces (chat_output.Parsed,
    as the incremental parser gives them), and the Responses streaming events on the way:
    `add` returns the events for one piece, `finish` those that close the response."""

    def __init__(self, r: ResponseRequest, model: str):
        self.r, self.model = r, model
        self.output: list[dict] = []
        self._open: dict | None = None  # the item being written
        self._sequence = 0

    def event(self, kind: str, **fields) -> dict:
        out = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return out

    def response(self, status: str, usage: dict | None = None, incomplete: str | None = None,
                 error: dict | None = None) -> dict:
        return {"id": self.r.id, "object": "response", "created_at": self.r.created_at, "status": status,
                "model": self.model, "output": list(self.output), "error": error,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "usage": usage, "user": None, **self.r.echo}

    def start(self) -> list[dict]:
        """The opening events: created (queued, for a background response), then in progress."""
        return [self.event("response.created", response=self.response("queued" if self.r.background else "in_progress")),
                self.event("response.in_progress", response=self.response("in_progress"))]

    def add(self, parsed, logprobs: list[dict] | None = None) -> list[dict]:
        """The events of one parsed piece; `logprobs`: those of the message text in it (the
        chat format's entries), for its output_text part."""
        events = []
        if parsed.reasoning:
            events += self._text("reasoning", parsed.reasoning)
        if parsed.content:
            events += self._text("message", parsed.content, logprobs or [])
        for part in parsed.tool_call_parts:
            if part.id is not None:  # a new call: its name, then arguments as they come
                events += self._close()
                item = {"type": "function_call", "id": _item_id("fc"), "call_id": part.id, "name": part.name,
                        "arguments": "", "status": "in_progress"}
                events += self._open_item(item)
            self._open["arguments"] += part.arguments
            if part.arguments:
                events.append(self.event("response.function_call_arguments.delta", item_id=self._open["id"],
                                         output_index=len(self.output) - 1, delta=part.arguments))
        for call in parsed.tool_calls:  # (whole calls: a non-incremental parser's)
            events += self._close()
            events += self._open_item({"type": "function_call", "id": _item_id("fc"), "call_id": call.id,
                                       "name": call.name, "arguments": call.arguments, "status": "in_progress"})
        return events

    def finish(self, finish_reason: str, usage: dict) -> tuple[list[dict], dict]:
        """The closing events and the final response object. Cut by max_output_tokens, the
        response and the item it was writing are "incomplete"."""
        incomplete = "max_output_tokens" if finish_reason == "length" else None
        events = self._close("incomplete" if incomplete else "completed")
        final = self.response("incomplete" if incomplete else "completed", usage, incomplete)
        events.append(self.event("response.incomplete" if incomplete else "response.completed", response=final))
        return events, final

    def _text(self, kind: str, text: str, logprobs: list[dict] | None = None) -> list[dict]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close()
            if kind == "message":
                item = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"type": "reasoning", "id": _item_id("rs"), "summary": [], "content": [],
                        "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            events += self._open_item(item)
            item["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self.output) - 1, content_index=0, part=dict(part)))
        item = self._open
        item["content"][0]["text"] += text
        if kind == "message":
            item["content"][0]["logprobs"] += logprobs
            events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                                     content_index=0, delta=text, logprobs=logprobs))
        else:
            events.append(self.event("response.reasoning_text.delta", item_id=item["id"],
                                     output_index=len(self.output) - 1, content_index=0, delta=text))
        return events

    def _open_item(self, item: dict) -> list[dict]:
        self.output.append(item)
        self._open = item
        # A snapshot: the item fills later, and this event shows it as opened (content empty).
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item))]

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.output) - 1
        item["status"] = status
        events = []
        if item["type"] == "function_call":
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if item["type"] == "message":
                events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                         content_index=0, text=part["text"], logprobs=part["logprobs"]))
            else:
                events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                         content_index=0, text=part["text"]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int,
               cache_block: int | None) -> dict:
    """`reasoning_tokens`: those of the answer's reasoning (openai_api.reasoning_tokens).
    `cache_block`: the prefix cache's block size (None: no prefix cache); the prompt's whole
    blocks not found there are kept in it (`cache_write_tokens`)."""
    written = max(0, prompt_tokens // cache_block * cache_block - cached_tokens) if cache_block else 0
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": written},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + completion_tokens}


def reasoning_text(output: list[dict]) -> str:
    return "".join(item["content"][0]["text"] for item in output if item["type"] == "reasoning")


def conversation_after(r: ResponseRequest, output: list[dict]) -> list[dict]:
    """The request's conversation with the response's output as the assistant's turn: what a
    later request's previous_response_id continues."""
    content = "".join(item["content"][0]["text"] for item in output if item["type"] == "message")
    # (A call cut short by max_output_tokens was never made: it is left out.)
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                       "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call" and item["status"] == "completed"]
    turn: dict = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        turn["tool_calls"] = calls
    return r.messages + [turn]
