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
