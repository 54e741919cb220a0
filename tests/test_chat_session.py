"""The chat's conversation state, settings and files (no terminal, no model)."""

import json
import math

import pytest

from mlxserve.chat_session import ChatSession, Settings, UsageError


def conversation() -> ChatSession:
    session = ChatSession(system="Be brief.")
    session.add_user("What is 2+2?")
    session.add_answer("4", reasoning="Two and two.")
    session.add_user("And 3+3?\nShow the sum.")
    session.add_answer("6 because", cut=True)
    return session


@pytest.mark.parametrize("name,raw,value", [
    ("temperature", "0", 0.0), ("temperature", "1.25", 1.25), ("temperature", "2", 2.0),
    ("top_p", "0.9", 0.9), ("top_p", "1", 1.0),
    ("max_tokens", "64", 64), ("max_tokens", "auto", None), ("max_tokens", "AUTO", None),
    ("think", "off", False), ("think", "On", True),
    ("schema", "json", {"type": "object"}), ("schema", "text", None), ("schema", "OFF", None),
    ("schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}',
     {"type": "object", "properties": {"a": {"type": "integer"}}}),
])
def test_settings_accept(name, raw, value):
    settings = Settings()
    settings.set(name, raw)
    assert getattr(settings, name) == value


def test_minus_zero_is_zero():
    """/temp -0 showed "temperature: -0"."""
    settings = Settings()
    settings.set("temperature", "-0")
    assert settings.describe("temperature") == "0" and math.copysign(1, settings.temperature) == 1


@pytest.mark.parametrize("name,raw,usage", [
    ("temperature", "-0.1", "/temp X"), ("temperature", "hot", "/temp X"), ("temperature", "nan", "/temp X"),
    ("temperature", "2.5", "/temp X (a number from 0 to 2, as the server takes"),  # as OpenAI's API
    ("top_p", "0", "/top_p X"), ("top_p", "1.5", "/top_p X"), ("top_p", "", "/top_p X"),
    ("max_tokens", "0", "/max_tokens N"), ("max_tokens", "2.5", "/max_tokens N"),
    ("think", "maybe", "/think on|off"),
    ("schema", "", "/format text|json|SCHEMA"),
])
def test_settings_refuse_with_one_line_of_usage(name, raw, usage):
    settings = Settings()
    before = getattr(settings, name)
    with pytest.raises(UsageError) as err:
        settings.set(name, raw)
    assert str(err.value).startswith("usage: " + usage) and "\n" not in str(err.value)
    assert getattr(settings, name) == before


@pytest.mark.parametrize("raw,needle", [
    ("/no/such/schema.json", "/format: cannot read the schema file /no/such/schema.json"),
    ("{not json", "/format: the schema is not valid JSON"),
    ("[1, 2]", "/format: a JSON schema must be a JSON object"),
])
def test_a_bad_format_says_why_in_one_line(raw, needle):
    settings = Settings(schema={"type": "object"})
    with pytest.raises(UsageError) as err:
        settings.set("schema", raw)
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)
    assert settings.schema == {"type": "object"}


def test_format_from_a_file_and_as_described(tmp_path):
    path = tmp_path / "city.json"
    schema = {"title": "City", "type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}}}
    path.write_text(json.dumps(schema))
    settings = Settings()
    assert settings.describe("schema") == "text"
    settings.set("schema", str(path))
    assert settings.schema == schema
    assert settings.describe("schema") == "JSON under the schema 'City' with name, size"
    settings.set("schema", "json")
    assert settings.describe("schema") == "json (any JSON object)"


def test_model_messages_leave_reasoning_out():
    assert conversation().model_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nShow the sum."},
        {"role": "assistant", "content": "6 because"},
    ]


def test_retry_and_failed_answers_keep_roles_alternating():
    session = conversation()
    taken = session.take_last_answer()
    assert taken.content == "6 because" and session.awaiting_answer
    assert session.take_last_answer() is None  # the conversation ends with a question now
    session.drop_unanswered()
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert not session.awaiting_answer
    session.reset()
    assert session.messages == [] and session.system == "Be brief."


def test_save_then_load_gives_the_same_conversation(tmp_path):
    session = conversation()
    session.settings.set("temperature", "0.2")
    session.settings.set("think", "off")
    session.settings.set("schema", '{"type": "object", "properties": {"sum": {"type": "integer"}}}')
    path = session.save(tmp_path / "chat.json", model="tiny")
    saved = json.loads(path.read_text())
    assert saved["format"] == "mlxserve-chat" and saved["model"] == "tiny"
    assert saved["messages"][1] == {"role": "assistant", "content": "4", "reasoning": "Two and two."}
    loaded, model = ChatSession.load(path)
    assert model == "tiny"
    assert loaded == session


def test_an_empty_system_prompt_is_sent_and_kept(tmp_path):
    """"" (chat --system '', /system none) is an empty system message, so that the chat
    template adds no default of its own; None sends none. Saving and loading keeps which."""
    assert ChatSession(system="").model_messages() == [{"role": "system", "content": ""}]
    assert ChatSession().model_messages() == []
    for system in ("", None):
        loaded, _ = ChatSession.load(ChatSession(system=system).save(tmp_path / "chat.json"))
        assert loaded.system == system


def test_load_accepts_openai_style_messages(tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]))
    loaded, model = ChatSession.load(path)
    assert loaded.system == "S" and model is None
    assert [(m.role, m.content) for m in loaded.messages] == [("user", "Hi"), ("assistant", "Hello")]


def test_load_accepts_openai_messages_with_text_parts_and_a_developer_message(tmp_path):
    """A list of OpenAI messages as a client keeps them: content as a list of text parts
    (joined, as the server reads them; an assistant's refusal part is its text) and a
    developer message, OpenAI's newer system message (each was refused)."""
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ]))
    loaded, _ = ChatSession.load(path)
    assert loaded.system == "Be brief."
    assert [(m.role, m.content) for m in loaded.messages] == [("user", "Hi"), ("assistant", "No.")]
    path.write_text(json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]))
    with pytest.raises(ValueError, match=r"messages\[0\] needs a role .* text parts"):
        ChatSession.load(path)


def test_load_reads_content_parts_by_the_server_s_rule(tmp_path, monkeypatch):
    """An assistant message's content in a loaded file is the text the server makes of it
    (openai_api.part_text's rule, one copy of it), and what the server refuses is no text."""
    from mlxserve import openai_api

    contents = [[{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "b"}], [], "plain",
                [{"type": "text", "text": 1}], [{"type": "image_url", "image_url": {"url": "x"}}],
                [{"type": "refusal"}], ["text"], [{"text": "no type"}]]
    seen = []
    part_text = openai_api.part_text
    monkeypatch.setattr(openai_api, "part_text", lambda *args, **kw: seen.append(args[0]) or part_text(*args, **kw))
    path = tmp_path / "messages.json"
    for content in contents:
        try:
            server = openai_api._normalize_message({"role": "assistant", "content": content}, 0)["content"]
        except openai_api.APIError:
            server = None
        path.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]))
        seen.clear()
        try:
            loaded = ChatSession.load(path)[0].messages[1].content
        except ValueError:
            loaded = None
        assert loaded == server, content
        assert bool(seen) == (isinstance(content, list) and bool(content)), content  # (read by it, not a copy)


def test_load_reads_a_file_with_a_byte_order_mark(tmp_path):
    """A saved chat (or a list of messages) edited and saved again by an editor on Windows
    starts with a UTF-8 byte order mark: /load said it "is not JSON"."""
    session = conversation()
    path = session.save(tmp_path / "chat.json", model="tiny")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded, model = ChatSession.load(path)
    assert loaded == session and model == "tiny"


def test_load_keeps_what_the_file_does_not_carry(tmp_path):
    """A plain list of messages has no settings: the current ones stay (a copy), and the
    system prompt too unless the list has a system message. A /save file sets them all."""
    current = ChatSession(system="Be brief.", settings=Settings(temperature=0.2, max_tokens=64, think=False))
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]))
    loaded, _ = ChatSession.load(path, current)
    assert loaded.system == "Be brief." and loaded.settings == current.settings
    assert loaded.settings is not current.settings
    path.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]))
    loaded, _ = ChatSession.load(path, current)
    assert loaded.system == "S" and loaded.settings == current.settings
    path.write_text(json.dumps({"messages": [], "settings": {"temperature": 1}}))  # only what it names
    loaded, _ = ChatSession.load(path, current)
    assert loaded.settings == Settings(temperature=1.0, max_tokens=64, think=False)
    saved = conversation()  # the default settings, no system prompt: those come back
    saved.system = None
    loaded, _ = ChatSession.load(saved.save(tmp_path / "chat.json"), current)
    assert loaded == saved


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0]"),
    ('{"format": "other", "messages": []}', "not a saved chat"),
    ('{"messages": [], "settings": {"temperature": -3}}', "settings.temperature"),
    ('{"messages": [], "settings": [1, 2]}', "'settings' must be an object"),
    ('{"messages": [], "settings": "x"}', "'settings' must be an object"),
    ('"just text"', "not a saved chat"),
    ('{"version": 2, "messages": []}', "saved by a newer mlxserve (version 2; this one reads up to 1)"),
    ('{"version": "1", "messages": []}', "'version' must be a whole number >= 1, not \"1\""),
    ('{"version": true, "messages": []}', "'version' must be a whole number >= 1, not true"),
    ('{"messages": [], "settings": {"temprature": 0.5}}', "settings.temprature: not a setting (the settings are temperature, top_p"),
    # A hand-edited answer marked "cut": "false" loaded as cut (any non-empty string is true).
    ('{"messages": [{"role": "assistant", "content": "x", "cut": "false"}]}', "messages[0].cut must be true or false, not \"false\""),
    ('{"messages": [], "settings": {"max_tokens": true}}', "settings.max_tokens: true is not accepted"),
    ('{"messages": [{"role": "assistant", "content": "x", "reasoning": ["a"]}]}', "messages[0].reasoning must be text"),
])
def test_load_errors_are_one_line_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        ChatSession.load(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_load_of_json_nested_too_deeply_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's JSON parser goes
    with pytest.raises(ValueError) as err:
        ChatSession.load(path)
    assert str(err.value) == f"{path}: its JSON is nested too deeply"


@pytest.mark.parametrize("write", ["save", "export"])
def test_a_file_that_cannot_be_written_is_one_line_naming_it(tmp_path, write):
    """/save and /export say which file and why: an OSError's own message may not name the
    file (/dev/full: "[Errno 28] No space left on device")."""
    session = conversation()
    for path, why in [("/dev/full", "No space left on device"), (tmp_path, "Is a directory"),
                      (tmp_path / "no" / "chat.json", "No such file or directory")]:
        with pytest.raises(ValueError) as err:
            getattr(session, write)(path)
        assert str(err.value) == f"cannot write {path}: {why}"
    kept = tmp_path / "kept"
    kept.write_text("saved before")
    session.add_user("\udc80")  # a lone surrogate (a loaded file's JSON can hold one): not UTF-8
    with pytest.raises(ValueError) as err:
        getattr(session, write)(kept)
    assert str(err.value) == f"cannot write {kept}: the conversation holds text that is not valid Unicode"
    assert kept.read_text() == "saved before"


@pytest.mark.parametrize("write", ["save", "export"])
def test_a_write_that_fails_part_way_leaves_the_file_as_it_was(tmp_path, monkeypatch, write):
    """A full disk mid-write left a truncated file where the last save was: the text goes to a
    new file beside it, which takes the file's name (and permissions) only once it is whole;
    a link is kept, its file written."""
    import errno
    import os

    kept = tmp_path / "chat.json"
    kept.write_text("saved before")
    kept.chmod(0o640)
    link = tmp_path / "latest.json"
    link.symlink_to(kept.name)

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", disk_full)
        with pytest.raises(ValueError) as err:
            getattr(conversation(), write)(kept)
    assert str(err.value) == f"cannot write {kept}: No space left on device"
    assert kept.read_text() == "saved before" and sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "latest.json"]
    getattr(conversation(), write)(link)
    assert link.is_symlink() and "And 3+3?" in kept.read_text() and kept.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("verb", ["save", "export", "load"])
def test_a_home_folder_nobody_has_is_one_line_naming_the_file(verb):
    """`~nosuchuser/chat.json`: pathlib raises a RuntimeError there, which was "a bug" in the
    chat (`/save failed: RuntimeError: Could not determine home directory.`)."""
    path = "~mlxserve-no-such-user/chat.json"
    with pytest.raises(ValueError) as err:
        if verb == "load":
            ChatSession.load(path)
        else:
            getattr(conversation(), verb)(path)
    assert str(err.value) == f"{path}: no home folder is known for ~mlxserve-no-such-user"


def test_markdown_export(tmp_path):
    text = conversation().export(tmp_path / "chat.md", model="tiny").read_text()
    assert text.startswith("# Chat with tiny\n")
    assert "**System:** Be brief." in text
    assert text.count("## You") == 2 and text.count("## Assistant") == 2
    assert "<details><summary>Thinking</summary>\n\nTwo and two.\n\n</details>" in text
    assert "And 3+3?\nShow the sum." in text
    assert text.rstrip().endswith("6 because\n\n*(answer cut short)*")
