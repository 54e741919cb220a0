"""Split a chat model's streamed text into content, reasoning and tool calls.

Qwen-family models (and other Hermes-style templates) write their reasoning as
`<think>…</think>` and each tool call as `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
`ChatOutputParser.feed(delta)` returns what can be emitted now, holding back any tail that
could be the start of a tag.

Tool calls. A call that starts the usual way, `{"name": "…", "arguments": {`, is announced as
soon as that head is read, and its arguments object follows as it is written (the parser tracks
strings and nesting, so it knows where the object ends). Once the call is over it is checked:
well-formed means its arguments are a JSON object and the call object around them is valid JSON
(or lacks only its final `}` before `</tool_call>`, or its closing tag at the end of the answer).
A call that was announced but is not well-formed (bad JSON, or the answer ended inside it) stays
a call, with the arguments text as the model wrote it, and sets `broken_tool_call`: its finish
reason is then not "tool_calls". Any other call (e.g. arguments given as a JSON string) is read
whole at its closing tag, and given back as plain content if its JSON does not parse. Streaming
(`incremental=True`) and whole answers run the same steps, so they always agree.
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


def parser_for(tokenizer, *, tools_enabled: bool, incremental: bool = False,
               calls_constrained: bool = False, calls_only: bool = False) -> "ChatOutputParser":
    """The one place that decides, per model family, which markup to look for: the tags the
    tokenizer knows as single tokens, and tool calls wherever a grammar wrote them
    (`calls_constrained`: grammar.tool_call_grammar, which writes them as text where the
    vocabulary has no tag tokens). `calls_only`: the grammar lets the answer be calls only
    (tool_choice "required" or a named function), so no text of it is content."""
    vocab = {tokenizer.decode([i]) for i in tokenizer.special_token_ids} | _added_tokens(tokenizer)
    return ChatOutputParser(reasoning=THINK_OPEN in vocab,
                            tools=tools_enabled and (TOOL_OPEN in vocab or calls_constrained),
                            incremental=incremental, exact_json=calls_constrained, calls_only=calls_only)


def _added_tokens(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return set()
    return {t.content for t in backend.get_added_tokens_decoder().values()}


class ChatOutputParser:
    """`incremental=True` (streaming) reports tool calls as ToolCallParts while the model is
    still writing their arguments; otherwise each call comes whole once closed."""

    def __init__(self, *, reasoning: bool, tools: bool, incremental: bool = False, exact_json: bool = False,
                 calls_only: bool = False):
        self.reasoning = reasoning
        self.tools = tools
        self.incremental = incremental
        # The answer can only be calls (parser_for): what is held back when it was cut short
        # (max_tokens inside a call's tag or name) is the start of a call, not text.
        self.calls_only = calls_only
        # A grammar wrote the calls (grammar.tool_call_grammar): their JSON is exact, so a
        # closing tag inside one of its strings is text of an argument, not the call's end.
        # Otherwise the tag ends the call wherever it comes (a model's JSON may be broken).
        self.exact_json = exact_json
        self._buffer = ""
        # start | think | skip_ws | content | tool (before a call's head) | tool_args (in its
        # arguments object) | tool_rest (after it, in the call object) | tool_close (after that)
        self._state = "start"
        self.saw_tool_call = False  # a well-formed call was read
        self.broken_tool_call = False  # a call was announced but is not well-formed
        self._calls = 0  # index of the next tool call
        # The call being read after its head: its id, name, text before the arguments, the
        # arguments so far, the text after them; and where the scan of its JSON stands.
        self._call: tuple[str, str, str] | None = None
        self._args: list[str] = []
        self._rest = ""
        self._depth, self._in_string, self._escaped = 0, False, False

    def finish_reason(self, reason: str) -> str:
        """The answer's finish reason: "tool_calls" when it ended by itself ("stop") after
        making calls, all of them well-formed; an answer cut short keeps "length"."""
        return "tool_calls" if reason == "stop" and self.saw_tool_call and not self.broken_tool_call else reason

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
            elif self._state in ("tool_args", "tool_rest"):
                # Scan the call's JSON up to the closing tag or what may be its start.
                end = self._close_tag()
                limit = end if end >= 0 else len(self._buffer) - _partial_suffix(self._buffer, TOOL_CLOSE)
                closed = self._scan(limit)
                text = self._buffer[: limit if closed is None else closed]
                self._buffer = self._buffer[len(text):]
                if self._state == "tool_args":
                    self._add_arguments(out, text)
                else:
                    self._rest += text
                if closed is not None:  # the arguments object, or then the call object, ends
                    if self._state == "tool_args":
                        self._state, self._depth = "tool_rest", 1  # back in the call object
                    else:
                        self._end_call(out, self._well_formed(complete=True))
                        self._state = "tool_close"
                    continue
                if end < 0:
                    return out
                # The closing tag came first: the call ends here, whole or not.
                self._buffer = self._buffer[len(TOOL_CLOSE):]
                self._end_call(out, self._state == "tool_rest" and self._well_formed(complete=False))
                self._state = "skip_ws"
            elif self._state == "tool_close":
                # After a call object: its closing tag (other text there is content).
                stripped = self._buffer.lstrip()
                if stripped.startswith(TOOL_CLOSE):
                    self._buffer = stripped[len(TOOL_CLOSE):]
                    self._state = "skip_ws"
                elif TOOL_CLOSE.startswith(stripped):
                    return out  # nothing yet, or maybe the start of the tag: wait
                else:
                    self._buffer = stripped
                    self._state = "content"
            else:  # tool: wait for the head of the call, or its closing tag to parse it whole
                end = self._buffer.find(TOOL_CLOSE)
                if self._start_call(out, end):
                    self._state = "tool_args"
                    continue
                if end < 0:
                    return out
                raw = self._buffer[: end + len(TOOL_CLOSE)]
                self._buffer = self._buffer[end + len(TOOL_CLOSE):]
                call = _parse_call(raw[len(TOOL_OPEN): -len(TOOL_CLOSE)])
                if call is None:
                    out.content += raw  # malformed: degrade to text
                    self._state = "content"
                else:
                    self._whole_call(out, call)
                    self._state = "skip_ws"

    def _start_call(self, out: Parsed, end: int) -> bool:
        """Once the call shows its name and the `{` of its arguments (before any closing tag at
        `end`): announce it, move the buffer to that `{` and return True."""
        head = _CALL_HEAD.match(self._buffer, len(TOOL_OPEN))
        if head is None or 0 <= end < head.end():
            return False
        try:
            name = json.loads(head.group(1))
        except json.JSONDecodeError:  # e.g. an invalid escape: the whole-call path handles it
            return False
        self._call = ("call_" + uuid.uuid4().hex[:24], name, self._buffer[len(TOOL_OPEN): head.end()])
        self._buffer = self._buffer[head.end():]
        self._args, self._rest = [], ""
        self._depth, self._in_string, self._escaped = 0, False, False
        if self.incremental:
            out.tool_call_parts.append(ToolCallPart(self._calls, "", self._call[0], name))
        return True

    def _close_tag(self) -> int:
        """Where the closing tag is in the buffer (-1: not there): its first place, or with
        `exact_json` its first place outside the call's JSON strings."""
        if not self.exact_json:
            return self._buffer.find(TOOL_CLOSE)
        in_string, escaped = self._in_string, self._escaped
        for i, ch in enumerate(self._buffer):
            if not in_string and self._buffer.startswith(TOOL_CLOSE, i):
                return i
            in_string, escaped = _string_state(ch, in_string, escaped)
        return -1

    def _scan(self, limit: int) -> int | None:
        """Follow the JSON in buffer[:limit] (strings, nesting); the index just after the `}`
        or `]` that brings the depth back to 0, or None."""
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        closed = None
        for i in range(limit):
            ch = self._buffer[i]
            inside = in_string
            in_string, escaped = _string_state(ch, in_string, escaped)
            if inside or in_string:  # a string's character or quote
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    closed = i + 1
                    break
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        return closed

    def _add_arguments(self, out: Parsed, text: str) -> None:
        if not text:
            return
        self._args.append(text)
        if self.incremental:
            _add_part(out, ToolCallPart(self._calls, text))

    def _well_formed(self, *, complete: bool) -> bool:
        """Whether the call read so far is well-formed: its arguments a JSON object, and the
        call object valid JSON with that name and those arguments (`complete`), or, not
        closed, nothing but whitespace after its arguments."""
        arguments = _json_object("".join(self._args))
        if arguments is None:
            return False
        if not complete:
            return not self._rest.strip()
        call_id, name, head = self._call
        whole = _json_object(head + "".join(self._args) + self._rest)
        return whole is not None and whole.get("name") == name and whole.get("arguments") == arguments

    def _end_call(self, out: Parsed, well_formed: bool) -> None:
        if well_formed:
            self.saw_tool_call = True
        else:
            self.broken_tool_call = True
        if not self.incremental:
            call_id, name, _ = self._call
            out.tool_calls.append(ToolCall(call_id, name, "".join(self._args)))
        self._calls += 1
        self._call, self._args, self._rest = None, [], ""

    def _whole_call(self, out: Parsed, call: ToolCall) -> None:
        if self.incremental:
            out.tool_call_parts.append(ToolCallPart(self._calls, call.arguments, call.id, call.name))
        else:
            out.tool_calls.append(call)
        self._calls += 1
        self.saw_tool_call = True

    def flush(self) -> Parsed:
        """End of stream: whatever is held back (an unfinished tag) is text; a call whose
        closing tag never came is a call if it is well-formed without it."""
        out = Parsed()
        if self._state == "think":
            out.reasoning = self._buffer
        elif self._state in ("tool_args", "tool_rest"):  # the model stopped inside a call
            if self._state == "tool_args":
                self._add_arguments(out, self._buffer)
            else:
                self._rest += self._buffer
            self._end_call(out, self._state == "tool_rest" and self._well_formed(complete=False))
        elif self._state == "tool_close":
            stripped = self._buffer.strip()
            out.content = "" if TOOL_CLOSE.startswith(stripped) else stripped
        elif self._state == "tool":
            call = _parse_call(self._buffer[len(TOOL_OPEN):])
            if call is None:
                out.content = self._buffer
            else:
                self._whole_call(out, call)
        else:
            out.content = self._buffer
        if self.calls_only:
            out.content = ""
        self._buffer = ""
        self._state = "content"
        return out


def _string_state(ch: str, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """JSON text's string state after `ch`: (inside a string, just after a backslash in one)."""
    if in_string:
        if escaped:
            return True, False
        return ch != '"', ch == "\\"
    return ch == '"', False


def _add_part(out: Parsed, part: ToolCallPart) -> None:
    """One entry per call in a delta: more arguments for the call just added join it."""
    last = out.tool_call_parts[-1] if out.tool_call_parts else None
    if last is not None and last.index == part.index and part.id is None:
        last.arguments += part.arguments
    else:
        out.tool_call_parts.append(part)


def merge_parts(parts: list[ToolCallPart]) -> list[ToolCallPart]:
    """`parts` with each call's consecutive pieces joined: one entry per call index."""
    out = Parsed()
    for part in parts:
        _add_part(out, ToolCallPart(part.index, part.arguments, part.id, part.name))
    return out.tool_call_parts


def _json_object(text: str) -> dict | None:
    """`text` as a JSON object, or None; strict JSON (no NaN or Infinity)."""
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _parse_call(body: str) -> ToolCall | None:
    obj = _json_object(body)
    if obj is None or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models already write a JSON string
        arguments = _json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id="call_" + uuid.uuid4().hex[:24], name=obj["name"], arguments=json.dumps(arguments))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
