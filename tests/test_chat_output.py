"""Splitting chat output into content, reasoning and tool calls, streamed in any pieces."""

import json
import random

import pytest

from mlxserve.chat_output import ChatOutputParser, parser_for

ANSWER = (
    "<think>\nThe user wants the weather.\n</think>\n\nLet me check."
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>'
)


def run(text, pieces, *, reasoning=True, tools=True):
    parser = ChatOutputParser(reasoning=reasoning, tools=tools)
    content, thought, calls = "", "", []
    cuts = sorted(random.Random(pieces).sample(range(1, len(text)), min(pieces, len(text) - 1)))
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        out = parser.feed(text[a:b])
        content, thought, calls = content + out.content, thought + out.reasoning, calls + out.tool_calls
    out = parser.flush()
    return content + out.content, thought + out.reasoning, calls + out.tool_calls, parser


@pytest.mark.parametrize("pieces", [1, 3, 17, 60, 400])
def test_reasoning_content_and_two_tool_calls_in_any_split(pieces):
    content, thought, calls, parser = run(ANSWER, pieces)
    assert thought == "\nThe user wants the weather.\n"
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"zone": "CET"}]
    assert len({c.id for c in calls}) == 2 and parser.saw_tool_call


@pytest.mark.parametrize("pieces", [1, 5, 40])
def test_malformed_tool_call_degrades_to_content(pieces):
    text = 'Hi <tool_call>{"name": "f", "arguments": {oops}}</tool_call> bye'
    content, thought, calls, parser = run(text, pieces)
    assert calls == [] and content == text and not parser.saw_tool_call


def test_unterminated_markup_is_released_at_the_end():
    content, _, calls, _ = run('Sure <tool_call>{"name": "f"', 4)
    assert calls == [] and content == 'Sure <tool_call>{"name": "f"'
    _, thought, _, _ = run("<think>still thinking", 3)
    assert thought == "still thinking"


def test_tags_only_count_where_the_model_family_uses_them():
    content, thought, calls, _ = run(ANSWER, 7, reasoning=False, tools=False)
    assert content == ANSWER and thought == "" and calls == []
    text = "The tag <think> in the middle is text"
    content, thought, _, _ = run(text, 5)
    assert content == text and thought == ""


def test_parser_for_reads_the_tokenizer(tiny_model_dir, smollm2_path):
    from mlxserve.loader import load_model

    tiny = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False).tokenizer
    assert parser_for(tiny, tools_enabled=True).tools and parser_for(tiny, tools_enabled=True).reasoning
    assert not parser_for(tiny, tools_enabled=False).tools
    from mlxserve.quant.gguf_metadata import read_gguf_metadata
    from mlxserve.tokenizer import Tokenizer

    smol = Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_path))
    p = parser_for(smol, tools_enabled=True)
    assert not p.tools and not p.reasoning  # SmolLM2 has neither tag


def run_incremental(text, pieces):
    parser = ChatOutputParser(reasoning=True, tools=True, incremental=True)
    content, parts = "", []
    cuts = sorted(random.Random(pieces).sample(range(1, len(text)), min(pieces, len(text) - 1)))
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        out = parser.feed(text[a:b])
        content, parts = content + out.content, parts + out.tool_call_parts
    out = parser.flush()
    return content + out.content, parts + out.tool_call_parts


@pytest.mark.parametrize("pieces", [1, 4, 25, 90, 400])
def test_incremental_tool_calls_concatenate_to_the_arguments(pieces):
    content, parts = run_incremental(ANSWER, pieces)
    assert content == "Let me check."
    calls = {}
    for part in parts:
        entry = calls.setdefault(part.index, {"id": part.id, "name": part.name, "arguments": ""})
        if part.id is not None:
            assert entry["id"] == part.id and not entry["arguments"]  # id and name come first, once
        entry["arguments"] += part.arguments
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == [{"city": "Paris"}, {"zone": "CET"}]


def test_incremental_streams_arguments_before_the_call_closes():
    parser = ChatOutputParser(reasoning=False, tools=True, incremental=True)
    first = parser.feed('<tool_call>\n{"name": "search", "arguments": {"query": "mlx')
    assert first.tool_call_parts[0].name == "search"
    assert "".join(p.arguments for p in first.tool_call_parts) == '{"query": "mlx'
    second = parser.feed(' docs"}')  # the "}" may be the call's own end: held back
    assert "".join(p.arguments for p in second.tool_call_parts) == ' docs"'
    last = parser.feed("}\n</tool_call>")
    assert "".join(p.arguments for p in last.tool_call_parts) == "}"
    assert parser.saw_tool_call


def test_a_name_with_a_bad_escape_falls_back_to_whole_call_parsing():
    text = '<tool_call>{"name": "bad\\q", "arguments": {"a": 1}}</tool_call>'
    content, parts = run_incremental(text, 3)
    assert parts == [] and content == text  # not valid JSON: plain content, no error
