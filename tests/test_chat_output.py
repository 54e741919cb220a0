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


def run(text, pieces, *, reasoning=True, tools=True, exact_json=False):
    parser = ChatOutputParser(reasoning=reasoning, tools=tools, exact_json=exact_json)
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


@pytest.mark.parametrize("pieces", [1, 4, 30, 200])
def test_a_closing_tag_inside_an_argument_of_grammar_written_calls(pieces):
    """Calls a grammar wrote (exact JSON): a closing tag inside a string is the argument's
    text; the calls around it are read as written. Without `exact_json` the tag ends the
    call wherever it comes (a model's own JSON may be broken)."""
    code = "print('</tool_call>')"
    text = ('<tool_call>\n{"name": "run", "arguments": {"code":' + json.dumps(code) + '}}\n</tool_call>\n'
            '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>\n')
    content, _, calls, parser = run(text, pieces, exact_json=True)
    assert content == "" and [c.name for c in calls] == ["run", "clock"]
    assert json.loads(calls[0].arguments) == {"code": code} and parser.finish_reason("stop") == "tool_calls"
    _, _, calls, parser = run(text, pieces)
    assert calls[0].arguments == '{"code":"print(\'' and parser.finish_reason("stop") == "stop"


@pytest.mark.parametrize("pieces", [1, 5, 40])
def test_malformed_tool_call_degrades_to_content(pieces):
    """A call that never showed a name and an arguments object is read whole: bad JSON is text."""
    for text in ('Hi <tool_call>{oops}</tool_call> bye', 'Hi <tool_call>{"arguments": {oops}, "name": "f"}</tool_call> bye'):
        content, thought, calls, parser = run(text, pieces)
        assert calls == [] and content == text and not parser.saw_tool_call and not parser.broken_tool_call


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
    second = parser.feed(' docs", "tags": ["a}"]}')  # nesting and strings followed: this "}" ends them
    assert "".join(p.arguments for p in second.tool_call_parts) == ' docs", "tags": ["a}"]}'
    last = parser.feed("}\n</tool_call>")
    assert last.tool_call_parts == []
    assert parser.saw_tool_call and parser.finish_reason("stop") == "tool_calls"


def test_a_name_with_a_bad_escape_falls_back_to_whole_call_parsing():
    text = '<tool_call>{"name": "bad\\q", "arguments": {"a": 1}}</tool_call>'
    content, parts = run_incremental(text, 3)
    assert parts == [] and content == text  # not valid JSON: plain content, no error


def both_ways(text, pieces):
    """(content, calls, finish reason) of `text` parsed whole and streamed in `pieces` random
    pieces, asserting that they agree; a streamed call is its parts joined by index."""
    whole = ChatOutputParser(reasoning=True, tools=True)
    out = whole.feed(text)
    end = whole.flush()
    calls = [(c.name, c.arguments) for c in out.tool_calls + end.tool_calls]
    expected = (out.content + end.content, calls, whole.finish_reason("stop"))

    streaming = ChatOutputParser(reasoning=True, tools=True, incremental=True)
    content, parts = "", []
    cuts = sorted(random.Random(pieces).sample(range(1, len(text)), min(pieces, len(text) - 1)))
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        out = streaming.feed(text[a:b])
        assert len({p.index for p in out.tool_call_parts}) == len(out.tool_call_parts)  # one entry per call
        content, parts = content + out.content, parts + out.tool_call_parts
    out = streaming.flush()
    content, parts = content + out.content, parts + out.tool_call_parts
    streamed = {}
    for part in parts:
        if part.id is not None:
            assert part.index not in streamed  # id and name come first, once
            streamed[part.index] = [part.name, ""]
        streamed[part.index][1] += part.arguments
    assert (content, [tuple(streamed[i]) for i in sorted(streamed)], streaming.finish_reason("stop")) == expected
    return expected


SHAPES = {
    "well-formed": ('<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "}\\""}]}}\n</tool_call>',
                    [("f", '{"a": [1, {"b": "}\\""}]}')], "tool_calls", ""),
    "no final brace": ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
                       [("f", '{"a": 1}')], "tool_calls", ""),
    "another key after the arguments": ('<tool_call>{"name":"f","arguments":{"a":1}, "x":2}</tool_call>',
                                        [("f", '{"a":1}')], "tool_calls", ""),
    "no closing tag at the end": ('<tool_call>{"name": "f", "arguments": {"a": 1}}', [("f", '{"a": 1}')],
                                  "tool_calls", ""),
    "text after an unclosed call": ('<tool_call>{"name": "f", "arguments": {}} Done.', [("f", "{}")],
                                    "tool_calls", "Done."),
    "bad JSON in the arguments": ('<tool_call>{"name": "f", "arguments": {"code": "print("hi")"}}</tool_call>',
                                  [("f", '{"code": "print("hi")"}')], "stop", ""),
    "NaN is no JSON": ('<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>', [("f", '{"a": NaN}')],
                       "stop", ""),
    "junk in the call object": ('<tool_call>{"name": "f", "arguments": {"a": 1} oops}</tool_call>',
                                [("f", '{"a": 1}')], "stop", ""),
    "the tag inside the arguments": ('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call> then',
                                     [("f", '{"a": 1')], "stop", "then"),
    "the answer ends inside the arguments": ('<tool_call>{"name": "f", "arguments": {"a": "unfinish',
                                             [("f", '{"a": "unfinish')], "stop", ""),
    "a second call broken": ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
                             '<tool_call>{"name": "g", "arguments": {"a": tru}}</tool_call>',
                             [("f", "{}"), ("g", '{"a": tru}')], "stop", ""),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pieces", [1, 3, 11, 200])
def test_streamed_and_whole_tool_calls_agree_and_only_valid_json_finishes_with_tool_calls(shape, pieces):
    text, calls, reason, content = SHAPES[shape]
    got_content, got_calls, got_reason = both_ways(text, pieces)
    assert (got_content, got_calls, got_reason) == (content, calls, reason)
    if got_reason == "tool_calls":
        assert all(isinstance(json.loads(arguments), dict) for _, arguments in got_calls)


def test_streamed_arguments_of_the_qa_pieces():
    """One piece may finish the head and start the arguments: one entry for the call."""
    parser = ChatOutputParser(reasoning=False, tools=True, incremental=True)
    assert parser.feed("<tool_call>").tool_call_parts == []
    (part,) = parser.feed('\n{"name": "f", "arguments": {"a": 1}').tool_call_parts
    assert (part.index, part.name, part.arguments) == (0, "f", '{"a": 1}') and part.id
    assert parser.feed("\n</tool_call>").tool_call_parts == []
    assert parser.flush().tool_call_parts == [] and parser.finish_reason("stop") == "tool_calls"


def test_merge_parts_gives_one_entry_per_call():
    from mlxserve.chat_output import ToolCallPart, merge_parts

    parts = [ToolCallPart(0, "", "call_a", "f"), ToolCallPart(0, '{"a"'), ToolCallPart(0, ": 1}"),
             ToolCallPart(1, "{}", "call_b", "g")]
    merged = merge_parts(parts)
    assert [(p.index, p.id, p.name, p.arguments) for p in merged] == [(0, "call_a", "f", '{"a": 1}'),
                                                                     (1, "call_b", "g", "{}")]
    assert parts[0].arguments == ""  # the input is left alone
