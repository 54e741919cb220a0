"""Split a chat model's streamed text into content, reasoning and tool calls.

Qwen-family models (and other Hermes-style templates) write their reasoning as
`<think>…</think>` and each tool call as `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
`ChatOutputParser.feed(delta)` returns what can be emitted now, holding back any tail that
could be the start of a tag; a tool call is emitted once its closing tag arrives. A call whose
JSON does not parse is given back as plain content, never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


@dataclass
class ToolCallPart:
    """A piece of a tool call being streamed: the first carries id and name, the rest more of
    the arguments text; concatenated, the arguments are the call's JSON object."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls (incremental=False)
    tool_call_parts: list[ToolCallPart] = field(default_factory=list)  # incremental=True

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.tool_call_parts)


# The start of a call written the usual way: name first, then an arguments object.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


def parser_for(tokenizer, *, tools_enabled: bool, incremental: bool = False) -> "ChatOutputParser":
    """The one place that decides, per model family, which markup to look for: the tags the
    tokenizer knows as single tokens."""
    vocab = {tokenizer.decode([i]) for i in tokenizer.special_token_ids} | _added_tokens(tokenizer)
    return ChatOutputParser(reasoning=THINK_OPEN in vocab, tools=tools_enabled and TOOL_OPEN in vocab,
                            incremental=incremental)


def _added_tokens(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return set()
    return {t.content for t in backend.get_added_tokens_decoder().values()}


class ChatOutputParser:
    """`incremental=True` (streaming) reports tool calls as ToolCallParts while the model is
    still writing their arguments; otherwise each call comes whole once closed."""

    def __init__(self, *, reasoning: bool, tools: bool, incremental: bool = False):
        self.reasoning = reasoning
        self.tools = tools
        self.incremental = incremental
        self._buffer = ""
        self._state = "start"  # start | think | skip_ws | content | tool | tool_args
        self.saw_tool_call = False
        self._calls = 0  # index of the next tool call

    def feed(self, delta: str) -> Parsed:
        self._buffer += delta
        out = Parsed()
        while True:
            if self._state == "start":
                # Reasoning may only open the answer (possibly after whitespace).
                stripped = self._buffer.lstrip()
                if not self.reasoning:
                    self._state = "content"
                elif stripped.startswith(THINK_OPEN):
                    self._buffer = stripped[len(THINK_OPEN):]
                    self._state = "think"
                elif THINK_OPEN.startswith(stripped):
                    return out  # maybe the start of <think>: wait
                else:
                    self._state = "content"
            elif self._state == "think":
                end = self._buffer.find(THINK_CLOSE)
                if end < 0:
                    keep = _partial_suffix(self._buffer, THINK_CLOSE)
                    out.reasoning += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                out.reasoning += self._buffer[:end]
                self._buffer = self._buffer[end + len(THINK_CLOSE):]
                self._state = "skip_ws"
            elif self._state == "skip_ws":
                # Whitespace after </think> or </tool_call> is layout, not content, however
                # the text was split into pieces.
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return out
                self._state = "content"
            elif self._state == "content":
                start = self._buffer.find(TOOL_OPEN) if self.tools else -1
                if start < 0:
                    keep = _partial_suffix(self._buffer, TOOL_OPEN) if self.tools else 0
                    out.content += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                out.content += self._buffer[:start]
                self._buffer = self._buffer[start:]
                self._state = "tool"
            elif self._state == "tool_args":
                if not self._stream_arguments(out):
                    return out
            else:  # tool: wait for the closing tag, then parse
                end = self._buffer.find(TOOL_CLOSE)
                name = self._streamable_name(end)
                if name is not None:
                    out.tool_call_parts.append(ToolCallPart(self._calls, "", "call_" + uuid.uuid4().hex[:24], name))
                    self._state = "tool_args"
                    continue
                if end < 0:
                    return out
                raw = self._buffer[: end + len(TOOL_CLOSE)]
                self._buffer = self._buffer[end + len(TOOL_CLOSE):]
                call = _parse_call(raw[len(TOOL_OPEN): -len(TOOL_CLOSE)])
                if call is None:
                    out.content += raw  # malformed: degrade to text
                elif self.incremental:
                    out.tool_call_parts.append(ToolCallPart(self._calls, call.arguments, call.id, call.name))
                    self._calls += 1
                    self.saw_tool_call = True
                else:
                    out.tool_calls.append(call)
                    self.saw_tool_call = True
                self._state = "content" if call is None else "skip_ws"

    def _streamable_name(self, end: int) -> str | None:
        """In incremental mode, once a call shows its name and the `{` of its arguments: the
        name (and the buffer moves to that `{`). None: keep buffering the whole call."""
        head = _CALL_HEAD.match(self._buffer, len(TOOL_OPEN)) if self.incremental else None
        if head is None or 0 <= end < head.end():
            return None
        try:
            name = json.loads(head.group(1))
        except json.JSONDecodeError:  # e.g. an invalid escape: the whole-call path handles it
            return None
        self._buffer = self._buffer[head.end():]
        return name

    def _stream_arguments(self, out: Parsed) -> bool:
        """Inside a call's arguments object: pass on what cannot be its closing `}` or the
        `</tool_call>` tag. Returns True once the call is closed."""
        end = self._buffer.find(TOOL_CLOSE)
        if end < 0:
            brace = self._buffer.rfind("}")
            hold = _partial_suffix(self._buffer, TOOL_CLOSE)
            if brace >= 0 and not self._buffer[brace + 1 : len(self._buffer) - hold].strip():
                hold = len(self._buffer) - brace  # maybe the call's own closing brace
            piece = self._buffer[: len(self._buffer) - hold]
            if piece:
                out.tool_call_parts.append(ToolCallPart(self._calls, piece))
            self._buffer = self._buffer[len(self._buffer) - hold:]
            return False
        body = self._buffer[:end].rstrip()
        self._buffer = self._buffer[end + len(TOOL_CLOSE):]
        # What remains is the end of the arguments, then the call's own closing brace. (If the
        # model wrote malformed JSON the call has already gone out; its text is passed on as is.)
        rest = body[:-1].rstrip() if body.endswith("}") else body
        if rest:
            out.tool_call_parts.append(ToolCallPart(self._calls, rest))
        self._calls += 1
        self.saw_tool_call = True
        self._state = "skip_ws"
        return True

    def flush(self) -> Parsed:
        """End of stream: whatever is held back (an unfinished tag or tool call) is text."""
        out = Parsed()
        if self._state == "think":
            out.reasoning = self._buffer
        elif self._state == "tool_args":  # the model stopped inside a call's arguments
            if self._buffer:
                out.tool_call_parts.append(ToolCallPart(self._calls, self._buffer))
        else:
            out.content = self._buffer
        self._buffer = ""
        return out


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models already write a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id="call_" + uuid.uuid4().hex[:24], name=obj["name"], arguments=json.dumps(arguments))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
