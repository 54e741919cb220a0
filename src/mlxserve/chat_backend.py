"""Where the terminal chat's answers come from: the engine in this process, or an
OpenAI-compatible server (`mlxserve chat --url`).

Both backends turn a conversation into a `Generation`: iterate it for `Delta`s (reasoning and
answer text, split by chat_output's parser), `cancel()` it on Ctrl-C, then read `stats`.
The HTTP backend speaks chat completions with streaming and `stream_options.include_usage`
through the standard library only.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .chat_output import ChatOutputParser, Parsed

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a long prompt on a slow machine may take minutes before its first token


class BackendError(Exception):
    """A request failed (server unreachable, error answer, engine error): one line to show."""


@dataclass
class Delta:
    """New text of an answer: reasoning (thinking) and content, and how many tokens it took."""

    reasoning: str = ""
    content: str = ""
    tokens: int = 0


@dataclass
class Stats:
    """An answer's figures. None where the source does not say (e.g. a server without usage)."""

    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | …
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    tok_s: float | None = None


@dataclass
class ModelInfo:
    name: str
    detail: str = ""  # format, quantization, size, … as one short string
    current: bool = False


def _merge(a: Parsed, b: Parsed) -> Parsed:
    return Parsed(content=a.content + b.content, reasoning=a.reasoning + b.reasoning)


# ---- in-process ---------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer, messages: list[dict], think: bool) -> list[int]:
    """The token ids a chat model sees for `messages`, ending with the assistant's turn.
    `think=False` asks templates that know the switch (Qwen3's `enable_thinking`) to skip
    reasoning; other templates ignore it."""
    extra = {} if think else {"enable_thinking": False}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    return tokenizer.encode(text, add_special_tokens=False)


class EngineBackend:
    """The engine in this process. Owns it: `close()` stops it."""

    loads_models = True  # /model loads weights (slow: show progress)

    def __init__(self, loaded, engine_config, load_options: dict | None = None):
        """`load_options`: load_model's keywords (dtype, gguf_mode) for /model."""
        from .engine import Engine

        _require_chat_template(loaded)
        self._config = engine_config
        self._load_options = load_options or {}
        self.loaded = loaded
        self.engine = _start(Engine(loaded, engine_config))

    @property
    def model(self) -> str:
        return self.loaded.name

    def describe(self) -> str:
        loaded = self.loaded
        return f"{_short_name(loaded.name)} ({loaded.format}, {loaded.quantization}, {loaded.context_length:,} context)"

    def generate(self, messages: list[dict], settings) -> EngineGeneration:
        from .chat_output import parser_for
        from .sampling import SamplingParams
        from .scheduler import Request

        tokenizer = self.loaded.tokenizer
        # An answer held to a schema starts as the schema says: no thinking first.
        prompt = chat_prompt_ids(tokenizer, messages, settings.think and settings.schema is None)
        room = self.loaded.context_length - len(prompt)
        if room < 1:
            if sum(m["role"] != "system" for m in messages) == 1:  # /reset would not help
                raise BackendError(f"the message ({len(prompt):,} tokens with the template) does not fit "
                                   f"the model's context ({self.loaded.context_length:,}); shorten it")
            raise BackendError(f"the conversation ({len(prompt):,} tokens) fills the model's context "
                               f"({self.loaded.context_length:,}); /reset to start over")
        max_tokens = room if settings.max_tokens is None else min(settings.max_tokens, room)
        params = SamplingParams(max_tokens=max_tokens, temperature=settings.temperature, top_p=settings.top_p,
                                grammar=self._grammar(settings.schema))
        try:
            stream = self.engine.submit(Request(prompt, params))
        except RuntimeError as exc:  # the engine stopped (or the server is busy)
            raise BackendError(str(exc)) from None
        except ValueError as exc:  # the conversation's KV does not fit --memory-budget
            alone = sum(m["role"] != "system" for m in messages) == 1
            raise BackendError(f"{exc}; {'shorten the message' if alone else '/reset to start over'}") from None
        return EngineGeneration(stream, parser_for(tokenizer, tools_enabled=False, incremental=True),
                                progress=lambda: self.engine.prompt_progress(stream.id))

    def check_schema(self, schema: dict) -> None:
        """Raise BackendError if answers cannot be held to `schema` with this model (its
        vocabulary; the first check builds llguidance's index of it, ~0.4 s)."""
        self._grammar(schema)

    def _grammar(self, schema: dict | None) -> str | None:
        from .grammar import GrammarError, json_schema_grammar

        if schema is None:
            return None
        try:
            grammar = json_schema_grammar(schema)
            self.engine.grammars.check(grammar)
        except GrammarError as exc:
            raise BackendError(f"/format: {exc}") from None
        return grammar

    def stats(self) -> dict:
        return self.engine.stats()

    def models(self) -> list[ModelInfo]:
        """The current model, the known aliases, and models found in the local caches."""
        from . import registry

        local = registry.list_local_models()
        infos = [ModelInfo(self.model, self.describe(), current=True)]
        seen = {self.model}
        for alias in registry.ALIASES.values():
            if alias.name not in seen:
                infos.append(ModelInfo(alias.name, alias.description))
                seen.add(alias.name)
        for m in local:
            if m.name not in seen:
                infos.append(ModelInfo(m.name, f"{m.format}, {m.quantization}, {m.size_bytes / 1e6:,.0f} MB"))
                seen.add(m.name)
        return infos

    def switch_model(self, name: str) -> str:
        """Load `name`, start an engine on it, then stop the old one (which keeps serving if
        the load fails). Returns a line to show."""
        from .engine import Engine
        from .loader import load_model

        loaded = load_model(name, progress=True, **self._load_options)
        _require_chat_template(loaded)
        engine = _start(Engine(loaded, self._config))
        old = self.engine
        self.loaded, self.engine = loaded, engine
        old.stop()
        return f"Loaded {self.describe()} in {loaded.load_seconds:.1f}s"

    def close(self) -> None:
        self.engine.stop()


def _start(engine):
    try:
        return engine.start()
    except RuntimeError as exc:  # e.g. no memory for the KV cache: one line, no traceback
        raise BackendError(str(exc)) from None


def _require_chat_template(loaded) -> None:
    if loaded.tokenizer.chat_template is None:
        raise BackendError(f"{loaded.name} has no chat template, so it cannot chat; "
                           "use `mlxserve run --no-chat` for plain completion")


def _short_name(name: str) -> str:
    """A local path shows as its last component; aliases and repo ids as they are."""
    path = Path(name)
    return path.name if path.is_absolute() or name.startswith(".") else name


class EngineGeneration:
    def __init__(self, stream, parser: ChatOutputParser, progress=None):
        self._stream = stream
        self._parser = parser
        self._progress = progress
        self.stats: Stats | None = None

    def prompt_progress(self) -> tuple[int, int] | None:
        """(prompt tokens read, prompt tokens) while the engine reads the prompt, else None."""
        return self._progress() if self._progress is not None else None

    def __iter__(self):
        for event in self._stream:
            parsed = self._parser.feed(event.text)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise BackendError(event.error or "generation failed")
                parsed = _merge(parsed, self._parser.flush())
                self._finish(event)
            if parsed or event.token_ids:
                yield Delta(parsed.reasoning, parsed.content, len(event.token_ids))

    def cancel(self) -> None:
        """Stop the request and wait for its last event (its figures). Text still in flight
        is dropped: the user asked to stop."""
        if self.stats is not None:
            return
        self._stream.cancel()
        for event in self._stream:
            if event.finish_reason is not None:
                self._finish(event)

    def _finish(self, event) -> None:
        self.stats = Stats(event.completion_tokens, event.finish_reason, event.prompt_tokens,
                           event.cached_tokens, event.ttft_s, event.decode_tok_s)


# ---- over HTTP ----------------------------------------------------------------------------------
def normalize_base_url(url: str) -> str:
    """`host:port`, `http://host:port`, `…/v1` or `…/v1/chat/completions` -> `http(s)://host:port/…/v1`."""
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError as exc:  # urllib's own words ("Port out of range 0-65535") named no flag
        raise BackendError(f"--url must be an http(s) URL, got {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"--url must be an http(s) URL, got {url!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        path = path.removesuffix(suffix)
    if not path:
        path = "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


class HTTPBackend:
    """An OpenAI-compatible server. `model` None: the first model the server lists."""

    loads_models = False  # /model only changes the name sent

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        self.base_url = normalize_base_url(url)
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host, self._port, self._path = parts.hostname, parts.port, parts.path
        self._api_key = api_key
        listed = self._list_models()  # also checks that the server is there
        if model is None:
            if not listed:
                raise BackendError(f"{self.base_url} lists no models; name one with --model")
            model = listed[0]["id"]
        self.model = model
        self._context = _context_length(listed, model)

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def generate(self, messages: list[dict], settings) -> HTTPGeneration:
        body = {"model": self.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": settings.temperature, "top_p": settings.top_p}
        if not settings.think:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        if settings.schema is not None:
            # (The server asks the template to leave thinking out itself.)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": settings.schema}}
        if settings.max_tokens is None:
            return HTTPGeneration(self, body)
        try:
            return HTTPGeneration(self, {**body, "max_tokens": settings.max_tokens})
        except ContextExceeded:
            # /max_tokens is a cap, as in-process: more than the context leaves means as many
            # as it leaves, which is what the server gives without it.
            return HTTPGeneration(self, body)

    def check_schema(self, schema: dict) -> None:
        """Raise BackendError if `schema` is no usable JSON Schema (checked here, without the
        server's vocabulary: the server checks that with each request)."""
        from .grammar import GrammarError, validate_schema

        try:
            validate_schema(schema)
        except GrammarError as exc:
            raise BackendError(f"/format: {exc}") from None

    def stats(self) -> dict:
        try:
            return self._get_json("/stats")
        except Unreachable:  # the server is gone, not one without stats
            raise
        except BackendError as exc:
            raise BackendError(f"this server has no engine stats ({exc})") from None

    def models(self) -> list[ModelInfo]:
        infos = []
        for m in self._list_models():
            detail = f"{m['context_length']:,} context" if isinstance(m.get("context_length"), int) else ""
            infos.append(ModelInfo(m["id"], detail, current=m["id"] == self.model))
        if not any(i.current for i in infos):
            infos.insert(0, ModelInfo(self.model, "not listed by the server", current=True))
        return infos

    def switch_model(self, name: str) -> str:
        listed = self._list_models()
        self.model = name
        self._context = _context_length(listed, name)
        if listed and name not in {m["id"] for m in listed}:
            return f"Now asking for {name} (the server does not list it; /models shows what it has)"
        return f"Now asking {self.base_url} for {name}"

    def close(self) -> None:
        pass

    # ---- plumbing ------------------------------------------------------------------------------
    def connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def path(self, route: str) -> str:
        return self._path + route

    def _list_models(self) -> list[dict]:
        data = self._get_json("/models").get("data")
        if not isinstance(data, list):
            return []
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _get_json(self, route: str) -> dict:
        conn = self.connection()
        try:
            conn.request("GET", self.path(route), headers=self.headers())
            response = conn.getresponse()
            raw = response.read()
            if response.status != 200:
                raise BackendError(error_message(response.status, raw))
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach {self.base_url}: {_reason(exc)}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BackendError(f"{self.base_url}{route} did not answer JSON") from None
        if not isinstance(data, dict):
            raise BackendError(f"{self.base_url}{route} did not answer a JSON object")
        return data


def _context_length(listed: list[dict], model: str) -> int | None:
    for m in listed:
        if m["id"] == model and isinstance(m.get("context_length"), int):
            return m["context_length"]
    return None


class Unreachable(BackendError):
    """No answer from the server at all: refused, timed out, the connection broken."""


class ContextExceeded(BackendError):
    """The server's 400 for a prompt plus max_tokens beyond the model's context."""


def _error_code(raw: bytes) -> str | None:
    """The `code` of an OpenAI-shaped error answer, if it is one."""
    try:
        err = json.loads(raw).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


def error_message(status: int, raw: bytes) -> str:
    """One line from an error answer: OpenAI's {"error": {"message"}} when it is one."""
    message = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message", message) if isinstance(err, dict) else (err or message)
    except (json.JSONDecodeError, UnicodeDecodeError):
        if message.startswith("<"):  # a web page (an error page's markup): its first line says nothing
            reason = http.client.responses.get(status, "error")
            return f"server answered {status}: {reason} (a web page, not an OpenAI-compatible answer)"
    first = str(message).splitlines()[0] if message else http.client.responses.get(status, "")
    return f"server answered {status}: {first}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate cannot be verified ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):  # e.g. https:// to a plain-http port: WRONG_VERSION_NUMBER
        return f"the TLS handshake failed ({exc.reason or type(exc).__name__}): is it an http:// server?"
    return str(exc) or type(exc).__name__


class HTTPGeneration:
    """One streamed chat completion. TTFT and tok/s are measured here, on the client's clock;
    token counts come from the server's usage when it sends one."""

    def __init__(self, backend: HTTPBackend, body: dict):
        self._started = time.perf_counter()
        self._conn = backend.connection()
        # Reasoning split by the server arrives as reasoning_content; a server that leaves
        # <think> in the text is split here.
        self._parser = ChatOutputParser(reasoning=True, tools=False)
        self._chunks = 0
        self._first: float | None = None
        self._usage: dict | None = None
        self._finish_reason: str | None = None
        self.stats: Stats | None = None
        try:
            self._conn.request("POST", backend.path("/chat/completions"), body=json.dumps(body).encode(),
                               headers=backend.headers())
            self._conn.sock.settimeout(READ_TIMEOUT_S)
            self._response = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise BackendError(f"cannot reach {backend.base_url}: {_reason(exc)}") from None
        if self._response.status != 200:
            raw = self._response.read()
            self._conn.close()
            kind = ContextExceeded if _error_code(raw) == "context_length_exceeded" else BackendError
            raise kind(error_message(self._response.status, raw))
        kind = self._response.getheader("Content-Type") or ""
        if kind and not kind.lower().startswith("text/event-stream"):
            # (e.g. a whole JSON answer from a server that does not stream, or a web page:
            # read as events it would be nothing, "broken before the answer was complete")
            self._conn.close()
            raise _malformed(f"'{kind.split(';')[0].strip()}' instead of a stream of events")

    def __iter__(self):
        try:
            for data in self._events():
                delta = self._delta(data)
                if delta is not None:
                    yield delta
        except (OSError, http.client.HTTPException) as exc:
            raise BackendError(f"the connection broke: {_reason(exc)}") from None
        finally:
            self._conn.close()
        tail = self._parser.flush()
        if tail:
            yield Delta(tail.reasoning, tail.content)
        self._finish(self._finish_reason or "stop")

    def _events(self):
        """The JSON objects of the server-sent events, up to [DONE]. A stream that stops
        before [DONE] and before any finish_reason was cut off (the server went away)."""
        for line in self._response:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                yield json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BackendError("the server sent an event that is not JSON") from None
        if self._finish_reason is None:
            raise BackendError("the connection broke before the answer was complete")

    def _delta(self, data: object) -> Delta | None:
        if not isinstance(data, dict):
            raise _malformed("an event that is not a JSON object")
        if isinstance(data.get("error"), dict):
            raise BackendError(str(data["error"].get("message") or "generation failed"))
        if isinstance(data.get("usage"), dict):
            self._usage = data["usage"]
        choices = data.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _malformed("'choices' that are not a list of objects")
        reasoning = content = ""
        for choice in choices:
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise _malformed("a 'delta' that is not an object")
            reasoning += _text(delta, "reasoning_content") or _text(delta, "reasoning")
            parsed = self._parser.feed(_text(delta, "content"))
            reasoning += parsed.reasoning
            content += parsed.content
            self._finish_reason = _text(choice, "finish_reason") or self._finish_reason
        if not (reasoning or content):
            return None
        self._chunks += 1
        if self._first is None:
            self._first = time.perf_counter()
        return Delta(reasoning, content, 1)

    def cancel(self) -> None:
        """Hang up: the server cancels a request whose client went away."""
        self._conn.close()
        if self.stats is None:
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        usage = self._usage or {}
        completion = _count(usage, "completion_tokens")
        completion = self._chunks if completion is None else completion
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        now = time.perf_counter()
        tok_s = None
        if self._first is not None and completion > 1 and now > self._first:
            tok_s = (completion - 1) / (now - self._first)
        self.stats = Stats(completion, reason, _count(usage, "prompt_tokens"), _count(details, "cached_tokens"),
                           None if self._first is None else self._first - self._started, tok_s)


def _malformed(what: str) -> BackendError:
    return BackendError(f"the server sent {what}: is it an OpenAI-compatible server?")


def _text(obj: dict, name: str) -> str:
    """A text field of a streamed event ("" when absent or null)."""
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(f"a '{name}' that is not text")
    return value


def _count(obj: dict, name: str) -> int | None:
    """A token count of the server's usage; None when absent or not a count (the figures
    then fall back on what the client saw)."""
    value = obj.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
