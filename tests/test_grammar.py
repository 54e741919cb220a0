"""Constrained decoding (grammar.py): answers held to a JSON schema, in the sampler, the
scheduler, the engine and the server, on a tiny float32 model."""

import json

import llguidance
import mlx.core as mx
import numpy as np
import pytest

from mlxserve.engine import Engine, EngineConfig
from mlxserve.grammar import (ANSWER_REFUSED, GrammarError, Grammars, json_schema_grammar, read_schema,
                              response_format_grammar, tool_call_grammar, tool_tags)
from mlxserve.loader import load_model
from mlxserve.openai_api import AnswerLogprobs
from mlxserve.sampling import RowSamplingState, Sampler, SamplingParams
from mlxserve.scheduler import Request
from tiny_models import prompt_logits

# Bounded answers: a random tiny model completes any of them within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "n", "tag", "name"],
    "additionalProperties": False,
}
GRAMMAR = json_schema_grammar(SCHEMA)


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"ok", "n", "tag", "name"} and isinstance(value["ok"], bool)
            and isinstance(value["n"], int) and 0 <= value["n"] <= 99 and value["tag"] in ("red", "green", "blue")
            and isinstance(value["name"], str) and len(value["name"]) <= 6)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)


def constrained(max_tokens=80, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), grammar=GRAMMAR, **kw)


def generate(engine, prompt, params):
    events = engine.generate(prompt, params)
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1]


def allowed_by_llguidance(matcher, vocab: int) -> np.ndarray:
    """llguidance's own mask (compute_bitmask), unpacked by numpy: the reference for ours."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = np.zeros(vocab, dtype=bool)
    allowed[: min(vocab, len(bits))] = bits[:vocab].astype(bool)
    return allowed


def reference_matcher(tokenizer, grammar, consumed=()):
    """An llguidance matcher of its own (not mlxserve's), after `consumed`."""
    vocabulary = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids))
    matcher = llguidance.LLMatcher(vocabulary, grammar)
    assert matcher.consume_tokens(list(consumed))
    return matcher


def reference_greedy(loaded, prompt, grammar, max_tokens):
    """Greedy constrained decoding the slow way: a whole forward pass per token, the argmax
    over the tokens llguidance allows, until its matcher stops or an end-of-turn token."""
    tokenizer = loaded.tokenizer
    matcher = reference_matcher(tokenizer, grammar)
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        logits = np.array(prompt_logits(loaded, ids)[-1])
        logits[~allowed_by_llguidance(matcher, logits.shape[0])] = -np.inf
        token = int(np.argmax(logits))
        out.append(token)
        if token in tokenizer.eos_token_ids:
            break
        assert matcher.consume_token(token)
        ids.append(token)
        if matcher.is_stopped():
            break
    return out


# ---- the front end's grammars ------------------------------------------------------------
def test_response_format_forms():
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}) == json_schema_grammar({"type": "object"})
    assert response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}) == GRAMMAR
    for bad, says in [
        ("json", "must be an object"),
        ({"type": "xml"}, "'text', 'json_object' or 'json_schema', got \"xml\""),
        ({}, "got null"),
        ({"type": "json_schema"}, 'needs "json_schema"'),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": True}}, "schema as a JSON object"),
    ]:
        with pytest.raises(GrammarError, match=says):
            response_format_grammar(bad)


def test_a_schema_file_is_read_as_utf8_with_or_without_a_byte_order_mark(tmp_path):
    """--format FILE and /format FILE: a file that a Windows editor saved with a byte order
    mark was refused as "not valid JSON" (Unexpected UTF-8 BOM)."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "const": "Zoë"}}}
    for name, prefix in [("plain.json", b""), ("bom.json", b"\xef\xbb\xbf")]:
        path = tmp_path / name
        path.write_bytes(prefix + json.dumps(schema, ensure_ascii=False).encode("utf-8"))
        assert read_schema(str(path)) == schema


def test_boolean_schemas_are_json_not_file_names(tmp_path, monkeypatch):
    """--format true and /format false: JSON Schema's boolean schemas, which the server
    refuses in response_format (a schema must be an object), were looked for as files named
    "true" and "false" ("cannot read the schema file true: No such file or directory"), even
    beside a file of that name. They are refused as the JSON they are."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "true").write_text('{"type": "object"}')
    for value, says in [("true", "for the boolean schema true (any JSON value) give {}"),
                        (" false ", "the boolean schema false admits no answer at all")]:
        with pytest.raises(GrammarError, match=r"^a JSON schema must be a JSON object; .*") as caught:
            read_schema(value)
        assert says in str(caught.value)
    assert read_schema("{}") == {}  # what true means, as an object
    json_schema_grammar({})


def test_integers_beyond_64_bits_in_a_schema_are_named():
    """llguidance reads a schema's integers as 64-bit (signed or unsigned) and says only "Value
    is not JSON serializable" of others: the error names the integer and where it is."""
    json_schema_grammar({"const": 2**64 - 1})  # the limits themselves are fine
    json_schema_grammar({"enum": [-(2**63), 1e30, True]})
    for schema, where, shown in [({"type": "integer", "maximum": 2**64}, "$.maximum", "18446744073709551616"),
                                 ({"anyOf": [{"const": 1}, {"enum": [-(2**63) - 1]}]}, "$.anyOf[1].enum[0]",
                                  "-9223372036854775809"),
                                 ({"const": 10**40}, "$.const", "100000000000… (41 digits)")]:
        with pytest.raises(GrammarError) as error:
            json_schema_grammar(schema)
        assert str(error.value).startswith(f"the JSON schema cannot be used: the integer at {where} ({shown}) "
                                           "does not fit in 64 bits")
    deep = {"const": 2**70}
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = {"items": deep}
    with pytest.raises(GrammarError, match=r"integer at …(\.items)+\.const \(1180591620717411303424\)"):
        json_schema_grammar(deep)
    with pytest.raises(GrammarError, match=r"integer at \$\.properties\.x{38}…\.const \(1180591620717411303424\)"):
        json_schema_grammar({"properties": {"x" * 10**6: {"const": 2**70}}})  # a key cut short
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -(2**70)}}}}}
    with pytest.raises(GrammarError, match=r"the tools' schemas cannot be used: the integer at "
                                           r"tools\[1\]\.function\.parameters\.properties\.n\.minimum"):
        tool_call_grammar([{"type": "function", "function": {"name": "g"}}, tool], ("<a>", "</a>"))
    with pytest.raises(GrammarError, match=r"the JSON schema cannot be used: the integer at \$\.maximum"):
        tool_call_grammar([{"type": "function", "function": {"name": "g"}}], ("<a>", "</a>"),
                          answer={"maximum": 2**64})


def test_grammars_check_against_the_vocabulary(loaded):
    grammars = Grammars(loaded.tokenizer)
    grammars.check(GRAMMAR)
    for schema, says in [({"type": "foo"}, "Invalid type: foo"),
                         ({"$ref": "#/nowhere"}, "does not exist"),
                         ({"type": "string", "minLength": 5, "maxLength": 2}, "Unsatisfiable"),
                         ({"$ref": "#"}, "no text satisfies it")]:
        with pytest.raises(GrammarError, match=says):
            grammars.check(json_schema_grammar(schema))
    with pytest.raises(GrammarError, match="cannot be used"):
        grammars.constraint("this is not a grammar {")


def test_a_grammar_is_compiled_once(loaded, monkeypatch):
    """The front end's check compiles a grammar; the rows that use it later get copies."""
    from types import SimpleNamespace

    from mlxserve import grammar as grammar_module

    built = []

    def counting_matcher(*args, **kwargs):
        built.append(args[1])
        return llguidance.LLMatcher(*args, **kwargs)

    fake = SimpleNamespace(LLMatcher=counting_matcher, LLTokenizer=llguidance.LLTokenizer)
    monkeypatch.setattr(grammar_module, "_llguidance", lambda: fake)
    grammars = Grammars(loaded.tokenizer)
    grammars.check(GRAMMAR)
    first, second = grammars.constraint(GRAMMAR), grammars.constraint(GRAMMAR)
    assert built == [GRAMMAR]
    first.consume(loaded.tokenizer.encode("{", add_special_tokens=False)[0])  # copies: apart
    masks = [np.zeros(first.mask_words, dtype=np.int32) for _ in range(2)]
    first.fill_mask(masks[0])
    second.fill_mask(masks[1])
    assert not np.array_equal(masks[0], masks[1])


# ---- the sampler ---------------------------------------------------------------------------
def test_sampler_draws_only_allowed_tokens(loaded):
    """Greedy rows take the best allowed token, sampled rows (top-k, top-p, plain) draw only
    allowed ones, and a row without a constraint beside them is left alone."""
    grammars = Grammars(loaded.tokenizer)
    vocab = loaded.config["vocab_size"]
    logits = mx.random.normal((5, vocab), key=mx.random.key(0)) * 4
    specs = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=1.5, top_k=5, seed=2),
             dict(temperature=1.0, top_p=0.5, seed=3)]
    for consumed in ([], loaded.tokenizer.encode('{"ok":', add_special_tokens=False)):
        allowed = allowed_by_llguidance(reference_matcher(loaded.tokenizer, GRAMMAR, consumed), vocab)
        assert 0 < allowed.sum() < vocab
        masked = np.where(allowed, np.array(logits[0]), -np.inf)
        for trial in range(8):
            rows = []
            for spec in specs:
                constraint = grammars.constraint(GRAMMAR)
                for token in consumed:
                    constraint.consume(token)
                spec = {**spec, "seed": spec["seed"] + 10 * trial} if "seed" in spec else spec
                rows.append(RowSamplingState(SamplingParams(grammar=GRAMMAR, **spec), [1], constraint))
            rows.append(RowSamplingState(SamplingParams(temperature=0.0), [1]))
            tokens = Sampler().sample(logits, rows).tokens.tolist()
            assert tokens[0] == int(np.argmax(masked))
            assert all(allowed[t] for t in tokens[1:4]), tokens
            assert tokens[4] == int(np.argmax(np.array(logits[4])))  # unconstrained


# ---- the engine ----------------------------------------------------------------------------
def test_greedy_constrained_answer_matches_a_reference(loaded):
    """The engine's constrained greedy answer is token for token the slow reference's, ends
    when the JSON closes, and follows the schema."""
    prompt = loaded.tokenizer.encode("Once upon a time")
    expected = reference_greedy(loaded, prompt, GRAMMAR, 80)
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        ids, text, last = generate(engine, prompt, constrained())
    assert ids == expected
    assert last.finish_reason == "stop" and follows_schema(text), text


def test_constrained_rows_beside_others(loaded):
    """Constrained rows (greedy and seeded sampling) batched with plain ones: every answer is
    what it is alone, under chunked prefill and preemption alike."""
    tok = loaded.tokenizer
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    work = [(tok.encode("Hello"), plain),
            (tok.encode("The capital of France is"), constrained()),
            (tok.encode("def add(a, b):"), plain),
            (tok.encode("Numbers: 0 1 2 3"), constrained(temperature=1.0, seed=7)),
            (tok.encode("Once upon a time"), constrained(temperature=0.8, top_k=20, seed=3))]
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        alone = [generate(engine, p, params)[:2] for p, params in work]
    for text, (_, params) in zip([t for _, t in alone], work):
        if params.grammar:
            assert follows_schema(text), text
    for config in (EngineConfig(block_size=8, max_batch_tokens=7),
                   # room for few rows: the youngest are preempted and recompute
                   EngineConfig(block_size=4, max_batch_tokens=64, memory_budget_bytes=_kv_bytes(loaded, 128 + 64))):
        with Engine(loaded, config) as engine:
            streams = [engine.submit(Request(p, params)) for p, params in work]
            together = [([t for e in events for t in e.token_ids], "".join(e.text for e in events))
                        for events in map(list, streams)]
            preempted = engine.stats()["preemptions"]
        assert together == alone, config
        if config.memory_budget_bytes:
            assert preempted > 0


def _kv_bytes(loaded, tokens: int) -> int:
    layers, heads, dim = loaded.model.kv_shape()
    return tokens * layers * 2 * heads * dim * 4


def test_constrained_rows_do_not_speculate(loaded, monkeypatch):
    """With speculation on (every row that may draft always does), a constrained row decodes
    token by token (its masks follow every token) and answers as without speculation; a
    plain row still drafts."""
    from mlxserve import scheduler

    tok = loaded.tokenizer
    prompt = tok.encode("Numbers: 0 1 2 3 4 5 6 7 8 9")
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        expected = generate(engine, prompt, constrained())[:2]
    monkeypatch.setattr(scheduler, "make_drafter", lambda *args: scheduler._ZerosDrafter())
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram")) as engine:
        assert generate(engine, prompt, constrained())[:2] == expected
        assert engine.stats()["drafted_tokens"] == 0
        generate(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        assert engine.stats()["drafted_tokens"] > 0


def test_grammar_complete_before_max_tokens_and_ignore_eos(loaded):
    """The row ends when its grammar is complete, even with ignore_eos; cut short by
    max_tokens it ends with "length" (and an unfinished JSON text)."""
    prompt = loaded.tokenizer.encode("Hello")
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        ids, text, last = generate(engine, prompt, constrained(ignore_eos=True))
        assert last.finish_reason == "stop" and follows_schema(text)
        short, text, last = generate(engine, prompt, constrained(max_tokens=3))
        assert last.finish_reason == "length" and short == ids[:3]
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_an_end_of_turn_token_ends_the_answer_without_its_text(loaded):
    """Where the grammar is complete but could go on (an integer), an end-of-turn token ends
    the answer, ignore_eos or not, and adds neither text nor a logprob."""
    eos = min(loaded.tokenizer.eos_token_ids)
    grammar = json_schema_grammar({"type": "integer", "minimum": 0, "maximum": 1000})
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        for ignore_eos in (False, True):
            params = SamplingParams(max_tokens=10, temperature=0.0, grammar=grammar, ignore_eos=ignore_eos,
                                    logit_bias=((eos, 100.0),), logprobs=True)  # EOS as soon as it may come
            events = engine.generate(loaded.tokenizer.encode("Hello"), params)
            assert events[-1].finish_reason == "stop" and events[-1].token_ids[-1] == eos
            text = "".join(e.text for e in events)
            assert text.isdigit() and len(text) == 1, text
            answer = AnswerLogprobs(loaded.tokenizer, params)  # the logprobs the server reports
            assert [lp.token_id for e in events for lp in answer.feed(e)] == loaded.tokenizer.encode(
                text, add_special_tokens=False)


def test_a_token_the_grammar_refuses_fails_its_request_only(loaded):
    """llguidance's mask may allow a special token that its parser then refuses (fixed text
    spelling "<|im_end|>"): that request ends with a one-line error, the others go on."""
    tok = loaded.tokenizer
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        alone = generate(engine, tok.encode("Hello"), plain)[0]
        bad = engine.submit(Request(tok.encode("Hi"), SamplingParams(
            max_tokens=20, temperature=0.0, grammar=json_schema_grammar({"const": "a<|im_end|>b"}))))
        good = engine.submit(Request(tok.encode("Hello"), plain))
        events = list(bad)
        assert [t for e in good for t in e.token_ids] == alone
        assert engine.alive
    assert events[-1].finish_reason == "error" and events[-1].error.startswith(ANSWER_REFUSED)
    assert "\n" not in events[-1].error and len(events[-1].error) < 400


def test_an_unusable_grammar_fails_its_request_only(loaded):
    tok = loaded.tokenizer
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        bad = engine.submit(Request(tok.encode("Hello"), SamplingParams(max_tokens=5, grammar="not a grammar {")))
        good = engine.submit(Request(tok.encode("Hello"), SamplingParams(max_tokens=5, temperature=0.0)))
        events = list(bad)
        assert events[-1].finish_reason == "error" and "the grammar cannot be used" in events[-1].error
        assert list(good)[-1].finish_reason == "length"


# ---- tool calls held to their tools (tool_choice "required" or named, or beside a response_format) ----

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"$ref": "#/$defs/city"}}, "required": ["city"],
    "additionalProperties": False, "$defs": {"city": {"enum": ["Paris", "Rome"]}}}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: its arguments are {}


def call(name: str, arguments: str) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + arguments + '}\n</tool_call>'


def follows(grammars: Grammars, grammar: str, text: str) -> tuple[bool, bool]:
    """(whether every token of `text` is allowed, whether the answer is then complete)."""
    constraint = grammars.constraint(grammar)
    for token in grammars._tokenizer.encode(text, add_special_tokens=False):
        constraint.consume(token)
    return constraint.error is None, constraint.finished


def may_end_after(grammars: Grammars, grammar: str, text: str) -> bool:
    """Whether an end-of-turn token is allowed after `text`."""
    constraint = grammars.constraint(grammar)
    for token in grammars._tokenizer.encode(text, add_special_tokens=False):
        constraint.consume(token)
    mask = np.zeros(constraint.mask_words, dtype=np.int32)
    constraint.fill_mask(mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return all(bits[i] for i in grammars._tokenizer.eos_token_ids)


def test_tool_call_grammars_hold_calls_to_their_tools(loaded):
    grammars = Grammars(loaded.tokenizer)
    tags = tool_tags(loaded.tokenizer)
    open_id = loaded.tokenizer.backend.token_to_id("<tool_call>")
    assert tags[0] == f"<[{open_id}]>"  # the tag's own token, not its text
    calls = tool_call_grammar([WEATHER, NOW], tags)
    paris, rome, now = call("get_weather", '{"city":"Paris"}'), call("get_weather", '{"city":"Rome"}'), call("now", "{}")
    assert follows(grammars, calls, paris) == (True, False)  # another call may follow
    assert follows(grammars, calls, paris + "\n" + now) == (True, False)
    # A newline after a call, as models write before ending their turn, may end the answer.
    assert may_end_after(grammars, calls, paris) and may_end_after(grammars, calls, paris + "\n")
    assert not may_end_after(grammars, calls, paris + "\n<tool_call>")
    for wrong in (call("get_weather", '{"city":"Oslo"}'),  # not in the schema's $defs enum
                  call("get_weather", "{}"),  # a required argument missing
                  call("now", '{"x":1}'),  # no parameters declared: none allowed
                  call("get_time", "{}"),  # not a tool
                  '{"city":"Paris"}',  # not a call
                  '<tool_call>\n{"arguments": {}, "name": "now"}\n</tool_call>'):  # the name comes first
        assert follows(grammars, calls, wrong)[0] is False, wrong

    one = tool_call_grammar([WEATHER, NOW], tags, one_call=True)
    assert follows(grammars, one, rome) == (True, False) and may_end_after(grammars, one, rome)
    assert follows(grammars, one, rome + "\n") == (True, True)
    assert follows(grammars, one, rome + "\n" + now)[0] is False

    either = tool_call_grammar([WEATHER], tags, answer=SCHEMA)
    answer = '{"ok":true,"n":3,"tag":"red","name":"x"}'
    assert follows(grammars, either, answer) == (True, True)
    assert follows(grammars, either, paris) == (True, False)
    assert follows(grammars, calls, answer)[0] is False

    with pytest.raises(GrammarError, match="must describe an object"):
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], tags)


def test_a_model_without_tag_tokens_makes_calls_the_parser_reads(smollm2_path):
    """SmolLM2's vocabulary has no <tool_call> token: the grammar spells the tags as text, and
    the answer's parser reads calls wherever a grammar wrote them (not otherwise: the text
    alone is no markup of this model's)."""
    from mlxserve.chat_output import parser_for

    loaded = load_model(str(smollm2_path), progress=False)
    tokenizer = loaded.tokenizer
    assert tool_tags(tokenizer) == ('"<tool_call>"', '"</tool_call>"')
    grammar = tool_call_grammar([WEATHER], tool_tags(tokenizer), one_call=True)
    grammars = Grammars(tokenizer)
    assert follows(grammars, grammar, call("get_weather", '{"city":"Rome"}') + "\n") == (True, True)
    assert follows(grammars, grammar, call("get_weather", '{"city":"Bern"}'))[0] is False
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Rome?"}],
                                                            tools=[WEATHER]), add_special_tokens=False)
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        _, text, last = generate(engine, prompt, SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar))
    assert last.finish_reason == "stop"
    parser = parser_for(tokenizer, tools_enabled=True, calls_constrained=True)
    parsed = parser.feed(text)
    parsed.tool_calls += parser.flush().tool_calls
    (made,) = parsed.tool_calls
    assert made.name == "get_weather" and json.loads(made.arguments)["city"] in ("Paris", "Rome")
    assert parser.finish_reason("stop") == "tool_calls"
    assert not parser_for(tokenizer, tools_enabled=True).tools
