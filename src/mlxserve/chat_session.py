"""One terminal chat's state: the conversation, its settings, and the files it is kept in.

Pure data and checks (no terminal, no model), so that the REPL's commands stay thin and every
rule here is testable on its own. A conversation is saved as JSON (`/save`, `/load`) and
exported as Markdown (`/export`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .checks import MAX_TEMPERATURE, is_temperature
from .paths import expand_user

SAVE_FORMAT = "mlxserve-chat"
SAVE_VERSION = 1


class UsageError(ValueError):
    """A command's argument is wrong; the message is the one line of help to show."""


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int | None = None  # None: as many as the context leaves (or the server's default)
    think: bool = True  # show the model's reasoning; off also asks the model not to think
    # The JSON Schema answers are held to (/format), or None: free text.
    schema: dict | None = None

    def set(self, name: str, raw: str) -> None:
        """Set one setting from the text a user typed; UsageError says what is accepted."""
        parse = _PARSERS[name]
        setattr(self, name, parse(raw.strip()))

    def describe(self, name: str) -> str:
        value = getattr(self, name)
        if name == "think":
            return "on" if value else "off"
        if name == "max_tokens" and value is None:
            return "auto (as many as the context leaves)"
        if name == "schema":
            return describe_schema(value)
        return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_temperature(raw: str) -> float:
    usage = f"usage: /temp X (a number from 0 to {MAX_TEMPERATURE}, as the server takes; 0 = greedy)"
    value = _number(raw, usage)
    if not is_temperature(value):
        raise UsageError(usage)
    return value


def _parse_top_p(raw: str) -> float:
    value = _number(raw, "usage: /top_p X (a number in (0, 1])")
    if not 0 < value <= 1:
        raise UsageError("usage: /top_p X (a number in (0, 1])")
    return value


def _parse_max_tokens(raw: str) -> int | None:
    usage = "usage: /max_tokens N (a whole number >= 1, or auto)"
    if raw.lower() == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(usage) from None
    if value < 1:
        raise UsageError(usage)
    return value


def _parse_think(raw: str) -> bool:
    if raw.lower() in ("on", "off"):
        return raw.lower() == "on"
    raise UsageError("usage: /think on|off")


FORMAT_USAGE = "usage: /format text|json|SCHEMA (a JSON schema's file, or the schema as JSON text)"


def _parse_schema(raw: str) -> dict | None:
    from .grammar import GrammarError, read_schema

    if raw.lower() in ("text", "off"):
        return None
    if not raw:
        raise UsageError(FORMAT_USAGE)
    try:
        return read_schema(raw)
    except GrammarError as exc:
        raise UsageError(f"/format: {exc}") from None


def describe_schema(schema: dict | None) -> str:
    """What /format shows: free text, any JSON object, or a schema by its title and fields."""
    if schema is None:
        return "text"
    if schema == {"type": "object"}:
        return "json (any JSON object)"
    fields = schema.get("properties")
    what = f"'{schema['title']}' " if isinstance(schema.get("title"), str) else ""
    if isinstance(fields, dict) and fields:
        return f"JSON under the schema {what}with {', '.join(map(str, fields))}"
    return f"JSON under the schema {what}".rstrip()


def _number(raw: str, usage: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(usage) from None
    if not math.isfinite(value):
        raise UsageError(usage)
    return value + 0.0  # (-0 is 0: /temp -0 showed "temperature: -0")


_PARSERS = {"temperature": _parse_temperature, "top_p": _parse_top_p,
            "max_tokens": _parse_max_tokens, "think": _parse_think, "schema": _parse_schema}


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str
    reasoning: str = ""  # the assistant's thinking, shown dimmed; never sent back to the model
    cut: bool = False  # the answer was stopped with Ctrl-C


@dataclass
class ChatSession:
    # None: no system message, so the chat template's own default applies (Qwen2.5's "You are
    # Qwen, …"); "": an empty one, so that no system prompt at all is used (`--system ''`).
    system: str | None = None
    settings: Settings = field(default_factory=Settings)
    messages: list[Message] = field(default_factory=list)

    # ---- the conversation ------------------------------------------------------------------
    def add_user(self, text: str) -> None:
        self.messages.append(Message("user", text))

    def add_answer(self, content: str, reasoning: str = "", cut: bool = False) -> None:
        self.messages.append(Message("assistant", content, reasoning, cut))

    def drop_unanswered(self) -> None:
        """Forget a question whose answer failed, so that roles keep alternating."""
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()

    def take_last_answer(self) -> Message | None:
        """For /retry: remove the last answer, if the conversation ends with one, and return it
        (to put back if the new answer fails)."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages.pop()
        return None

    @property
    def awaiting_answer(self) -> bool:
        return bool(self.messages) and self.messages[-1].role == "user"

    def reset(self) -> None:
        self.messages.clear()

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "user")

    def model_messages(self) -> list[dict]:
        """What the model sees: the system prompt and every turn's text. Reasoning stays out,
        as chat templates drop earlier turns' thinking anyway."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": m.role, "content": m.content} for m in self.messages]

    # ---- files -----------------------------------------------------------------------------
    def to_json(self, model: str | None = None) -> dict:
        return {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "model": model,
            "system": self.system,
            "settings": asdict(self.settings),
            "messages": [_message_json(m) for m in self.messages],
        }

    def save(self, path: str | Path, model: str | None = None) -> Path:
        return _write(path, json.dumps(self.to_json(model), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_json(cls, data: object, current: ChatSession | None = None) -> tuple[ChatSession, str | None]:
        """A session from a /save file, or from a plain list of OpenAI-style messages.
        Returns the session and the model it was saved with (if known). The system prompt and
        the settings are the file's where it has them (a /save file has all), else `current`'s:
        a plain list of messages carries no settings, so loading one keeps those given with
        `chat --temperature …` or a command, and keeps the system prompt unless it has a
        system message."""
        if current is None:
            current = cls()
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError("not a saved chat (expected an object with 'messages')")  # noqa: TRY004 - bad file content
        if data.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise ValueError(f"not a saved chat (format {_json(data.get('format'))})")
        version = data.get("version", SAVE_VERSION)
        if type(version) is not int or version < 1:
            raise ValueError(f"'version' must be a whole number >= 1, not {_json(version)}")
        if version > SAVE_VERSION:  # its settings or messages may mean what this one cannot tell
            raise ValueError(f"saved by a newer mlxserve (version {version}; this one reads up to {SAVE_VERSION})")
        system = data["system"] if "system" in data else current.system  # (null in a /save file: it had none)
        messages = []
        for i, raw in enumerate(data["messages"]):
            role = raw.get("role") if isinstance(raw, dict) else None
            role = "system" if role == "developer" else role  # (OpenAI's newer name for it)
            content = _message_text(raw.get("content")) if isinstance(raw, dict) else None
            if role not in ("system", "user", "assistant") or content is None:
                raise ValueError(f"messages[{i}] needs a role (system, developer, user or assistant) and text "
                                 "content (a string or a list of text parts)")
            if role == "system":
                system = content
                continue
            reasoning, cut = raw.get("reasoning"), raw.get("cut")
            if not isinstance(reasoning, (str, type(None))):
                raise ValueError(f"messages[{i}].reasoning must be text")
            if not isinstance(cut, (bool, type(None))):  # ("false", a string, was true)
                raise ValueError(f"messages[{i}].cut must be true or false, not {_json(cut)}")
            messages.append(Message(role, content, reasoning or "", bool(cut)))
        if system is not None and not isinstance(system, str):
            raise ValueError("'system' must be text")
        settings = replace(current.settings)  # a copy: a file that fails to load changes nothing
        saved_settings = data.get("settings") or {}
        if not isinstance(saved_settings, dict):
            raise ValueError("'settings' must be an object")
        for name, value in saved_settings.items():
            if name not in _PARSERS:  # a typo in a file written by hand would be lost unseen
                raise ValueError(f"settings.{name}: not a setting (the settings are {', '.join(_PARSERS)})")
            try:
                settings.set(name, _setting_text(name, value))
            except UsageError:
                raise ValueError(f"settings.{name}: {_json(value)} is not accepted") from None
        model = data.get("model")
        return cls(system, settings, messages), model if isinstance(model, str) else None

    @classmethod
    def load(cls, path: str | Path, current: ChatSession | None = None) -> tuple[ChatSession, str | None]:
        """See from_json."""
        path = expand_user(path)
        try:
            # (utf-8-sig: a byte order mark that an editor on Windows put before the text
            # goes, as before piped text; json.loads refused it, "is not JSON".)
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not JSON") from None
        except RecursionError:  # deeper than Python's JSON parser goes: not a file /save wrote
            raise ValueError(f"{path}: its JSON is nested too deeply") from None
        try:
            return cls.from_json(data, current)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_markdown(self, model: str | None = None) -> str:
        """A readable transcript: headings per turn, thinking folded away."""
        parts = [f"# Chat with {model}" if model else "# Chat"]
        if self.system:
            parts.append("**System:** " + self.system)
        for m in self.messages:
            if m.role == "user":
                parts.append("## You\n\n" + m.content)
                continue
            answer = ["## Assistant"]
            if m.reasoning.strip():
                answer.append("<details><summary>Thinking</summary>\n\n" + m.reasoning.strip() + "\n\n</details>")
            answer.append(m.content)
            if m.cut:
                answer.append("*(answer cut short)*")
            parts.append("\n\n".join(answer))
        return "\n\n".join(parts) + "\n"

    def export(self, path: str | Path, model: str | None = None) -> Path:
        return _write(path, self.to_markdown(model))


def _json(value: object) -> str:
    """A value read from a saved chat as its file spells it (true, null, "1"), for errors; at
    most 80 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:79] + "…"


def _message_text(content: object) -> str | None:
    """An OpenAI message's text: a string, or a list of text parts joined, as the server reads
    them (a client's own history often has parts); an assistant's refusal parts are its text,
    as OpenAI returns a refusal. None for anything else (an image part, a number)."""
    # The server's own rule for a part (openai_api.part_text), imported here only: it brings
    # numpy, which a terminal chat has no need of until a file is loaded. Refusal parts are
    # taken whatever the message's role (the server takes them in an assistant's only).
    from .openai_api import APIError, part_text

    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    try:
        return "".join(part_text(part, "content", ("text",), True, "messages") for part in content)
    except APIError:
        return None


def _write(path: str | Path, text: str) -> Path:
    """Write a /save or /export file. An error is one line that names the file and says why:
    an OSError's own message may not name it (`[Errno 28] No space left on device`)."""
    path = expand_user(path)
    try:
        # Encoded before the file is opened: a file already there stays as it was.
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which a loaded file's JSON can hold ("\udc80")
        raise ValueError(f"cannot write {path}: the conversation holds text that is not valid Unicode") from None
    target = Path(os.path.realpath(path))  # a link's file is written, the link kept
    try:
        if target.exists() and not target.is_file():  # /dev/null, a FIFO (a folder fails here)
            target.write_bytes(data)
        else:
            _replace_whole(target, data)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _replace_whole(target: Path, data: bytes) -> None:
    """`target` holds `data`, or, if writing fails part way (a full disk), what it held: the
    data goes to a new file beside it first, which then takes its name. The new file gets the
    old one's permissions, or for a new file what the umask leaves of rw for all, as open()
    gives."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if target.exists():
            os.chmod(temporary, target.stat().st_mode & 0o7777)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _message_json(m: Message) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.reasoning:
        out["reasoning"] = m.reasoning
    if m.cut:
        out["cut"] = True
    return out


def _setting_text(name: str, value: object) -> str:
    """A saved setting as the text its command takes."""
    if value is None:
        return "text" if name == "schema" else "auto"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
