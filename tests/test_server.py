"""`mlxserve serve`: a real uvicorn server on a free loopback port, driven by the real openai SDK
and by raw HTTP for the error cases."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

from mlxserve.engine import Engine, EngineConfig, EngineStopped
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from live_server import SCRIPT, LiveServer, ScriptedEngine, ScriptedStream, TokenScriptedEngine, free_port
from mlxserve.server import create_app

MODEL = "tiny"
KEY = "secret-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = Engine(loaded, EngineConfig(block_size=8)).start()
    live = LiveServer(create_app(engine, MODEL, api_key=KEY, max_body_bytes=64 * 1024))
    yield live.base, engine
    live.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def raw(url, body=None, *, method="POST", key=KEY, data=None, headers=None):
    """(status, parsed JSON body) for a raw request."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


GREEDY = dict(model=MODEL, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_chat_completion(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], **GREEDY)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.system_fingerprint


def test_chat_streaming_equals_non_streaming_and_reports_usage(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(messages=messages, **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_every_answer_has_a_request_id_as_openai_s(client):
    """x-request-id on every answer, as OpenAI's API sends it: the SDK's `_request_id` of an
    object, a raw (streamed) response's header and an error's request_id; one per request."""
    messages = [{"role": "user", "content": "Hi"}]
    ids = [client.chat.completions.create(messages=messages, **GREEDY)._request_id, client.models.list()._request_id]
    with client.chat.completions.with_streaming_response.create(messages=messages, stream=True, **GREEDY) as raw_stream:
        ids.append(raw_stream.headers.get("x-request-id"))
        assert "data: [DONE]" in list(raw_stream.iter_lines())
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("no-such-model")
    ids.append(refused.value.request_id)
    assert all(isinstance(i, str) and i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)


def test_structured_output_parsed_by_the_openai_sdk(client):
    """response_format json_schema (here from a pydantic model, as the SDK's `parse` sends
    it): the answer is JSON of that schema, streamed or not."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=30)
        kind: Literal["cat", "dog"]

    messages = [{"role": "user", "content": "Describe a pet."}]
    r = client.chat.completions.parse(model=MODEL, messages=messages, response_format=Pet, max_tokens=80,
                                      temperature=0)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=0,
                                                 stream=True, response_format={"type": "json_schema", "json_schema": {
                                                     "name": "Pet", "schema": {**Pet.model_json_schema(), "additionalProperties": False}}}))
    assert Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == pet


# Tools whose calls a grammar can hold the answer to: a random tiny model writes them only so.
FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def valid_call(call) -> bool:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "clock":
        return arguments == {}
    return (call.function.name == "forecast" and set(arguments) == {"city", "days"}
            and arguments["city"] in ("Paris", "Rome") and 1 <= arguments["days"] <= 7)


def test_tool_choice_required_and_named_are_enforced(client, server):
    """tool_choice "required": the answer is one or more calls of the tools, arguments valid
    under their schemas, streamed as the whole answer gives them; a named function: one call
    of it; parallel_tool_calls false: one call, where the same seed made several. An answer
    cut by max_tokens says "length", calls or not."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    request = dict(model=MODEL, messages=messages, tools=[FORECAST, CLOCK], max_tokens=300, temperature=1.0)
    for seed in range(3):
        r = client.chat.completions.create(tool_choice="required", seed=seed, **request)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and all(valid_call(c) for c in choice.message.tool_calls)
        chunks = list(client.chat.completions.create(tool_choice="required", seed=seed, stream=True, **request))
        streamed = {}
        for p in (p for c in chunks if c.choices for p in c.choices[0].delta.tool_calls or []):
            name, arguments = streamed.get(p.index, (None, ""))
            streamed[p.index] = (name or p.function.name, arguments + (p.function.arguments or ""))
        assert [streamed[i] for i in sorted(streamed)] == [(c.function.name, c.function.arguments)
                                                           for c in choice.message.tool_calls]
        named = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "forecast"}},
                                               seed=seed, **request)
        (call,) = named.choices[0].message.tool_calls
        assert call.function.name == "forecast" and valid_call(call)
    # This random model ends after one call mostly; with its end-of-turn tokens held back,
    # some seeds make several.
    held_back = {str(i): -4 for i in server[1].tokenizer.eos_token_ids}
    several = None
    for seed in range(30):
        r = client.chat.completions.create(tool_choice="required", seed=seed, logit_bias=held_back, **request)
        calls = r.choices[0].message.tool_calls
        if r.choices[0].finish_reason == "tool_calls" and len(calls) > 1:
            assert all(valid_call(c) for c in calls)
            several = seed
            break
    assert several is not None, "no seed made several calls"
    single = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, seed=several,
                                            logit_bias=held_back, **request)
    (call,) = single.choices[0].message.tool_calls
    assert valid_call(call) and single.choices[0].finish_reason == "tool_calls"
    cut = client.chat.completions.create(tool_choice="required", seed=0, **{**request, "max_tokens": 40},
                                         logit_bias={k: -100 for k in held_back})
    assert cut.choices[0].finish_reason == "length"
    # Cut inside its first call's tag or name: no text of it comes back as content (it did:
    # "<tool_call>", or '<tool_call>\n{"name": "fore'), streamed or not.
    for max_tokens in (1, 2, 3, 4, 6):
        cut = client.chat.completions.create(tool_choice="required", seed=0, **{**request, "max_tokens": max_tokens})
        assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content is None, cut
        chunks = client.chat.completions.create(tool_choice="required", seed=0, stream=True,
                                                **{**request, "max_tokens": max_tokens})
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), max_tokens


def test_a_streamed_answer_of_calls_only_accumulates_to_the_whole_answer_in_the_sdk(client):
    """tool_choice "required" or a named function: the SDK's stream helper gives the message
    the whole answer gives, content null beside the calls (the first delta's content was "")."""
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[FORECAST, CLOCK],
                   max_tokens=300, temperature=1.0, seed=0)
    for choice in ("required", {"type": "function", "function": {"name": "forecast"}}):
        whole = client.chat.completions.create(tool_choice=choice, **request).choices[0]
        with client.chat.completions.stream(tool_choice=choice, **request) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert whole.finish_reason == streamed.finish_reason == "tool_calls"
        assert whole.message.content is None and streamed.message.content is None
        assert ([(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
                == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls])


def test_tool_edge_cases(server):
    """parameters null is a function without parameters; parallel_tool_calls false under
    "auto" ends the answer at its first call's closing tag (a token here, adding no text); a
    token the tools' grammar refused is a 400 naming tools."""
    from mlxserve import openai_api

    url, engine = server
    tokenizer = engine.tokenizer
    body = {"messages": X, "tools": [{"type": "function", "function": {"name": "clock", "parameters": None}}]}
    status, answer = raw(url + "/v1/chat/completions", {**body, "tool_choice": "required", "max_tokens": 40})
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x-guidance": "bad",
                                                                        "additionalProperties": False}}}
    status, answer = raw(url + "/v1/chat/completions", {"messages": X, "tools": [odd], "tool_choice": "required",
                                                         "max_tokens": 40})
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    close = tokenizer.backend.token_to_id("</tool_call>")
    one = openai_api.parse_request({**body, "parallel_tool_calls": False}, "chat", tokenizer, 2048, MODEL)
    assert one.params.grammar is None and one.params.stop_token_ids == (close,)
    assert openai_api.parse_request(body, "chat", tokenizer, 2048, MODEL).params.stop_token_ids == ()
    # The argument's fixed text spells the closing tag, which this model writes as its own
    # token: llguidance allowed the text but refuses the token.
    spelled = {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"code": {"const": "</tool_call>"}}, "required": ["code"]}}}
    status, answer = raw(url + "/v1/chat/completions", {"messages": X, "tools": [spelled], "tool_choice": "required",
                                                         "max_tokens": 40, "temperature": 0})
    assert status == 400 and answer["error"]["param"] == "tools", answer
    assert answer["error"]["message"].startswith("the answer could not go on as calls of its tools")


def test_tool_choice_none_shows_the_tools_but_makes_no_calls(server):
    """As OpenAI's: under tool_choice "none" the tools are in the prompt (the one "auto" gives,
    so the prefix cache shares it), no call is parsed or enforced, and the call's opening tag
    (a token of this vocabulary) is biased by -100 unless the request biases it itself."""
    from mlxserve import openai_api

    url, engine = server
    tokenizer = engine.tokenizer
    tag = tokenizer.backend.token_to_id("<tool_call>")
    body = {"messages": X, "tools": TOOLS, "parallel_tool_calls": False}

    class Shown:  # the tokenizer, noting the tools its template is given (this one's writes none)
        def __init__(self):
            self.tools = []

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def apply_chat_template(self, messages, **kwargs):
            self.tools.append(kwargs.get("tools"))
            return tokenizer.apply_chat_template(messages, **kwargs)

    shown = Shown()
    auto = openai_api.parse_request(body, "chat", shown, 2048, MODEL)
    none = openai_api.parse_request({**body, "tool_choice": "none"}, "chat", shown, 2048, MODEL)
    assert shown.tools == [TOOLS, TOOLS] and none.prompts == auto.prompts
    assert not none.tools_enabled and none.params.grammar is None and none.params.stop_token_ids == ()
    assert none.params.logit_bias == ((tag, -100.0),) and auto.params.logit_bias == ()
    biased = openai_api.parse_request({**body, "tool_choice": "none", "logit_bias": {str(tag): 5, "7": 1}}, "chat",
                                      tokenizer, 2048, MODEL)
    assert biased.params.logit_bias == tuple(sorted(((7, 1.0), (tag, 5.0))))
    formatted = openai_api.parse_request({**body, "tool_choice": "none", "response_format": {"type": "json_object"}},
                                         "chat", tokenizer, 2048, MODEL)
    assert formatted.params.grammar == openai_api.parse_request(
        {"messages": X, "response_format": {"type": "json_object"}}, "chat", tokenizer, 2048, MODEL).params.grammar
    status, answer = raw(url + "/v1/chat/completions", {**body, "tool_choice": "none", "max_tokens": 8,
                                                        "temperature": 0, "ignore_eos": True})
    assert status == 200 and "tool_calls" not in answer["choices"][0]["message"], answer
    assert answer["usage"]["prompt_tokens"] == len(auto.prompts[0])


def test_tools_beside_a_response_format_answer_either_way(client, server):
    """With tools under tool_choice "auto", a response_format lets the answer be calls or
    JSON of that format. Biased away from the call tag, the answer is the JSON."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    schema = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"],
              "additionalProperties": False}
    request = dict(model=MODEL, messages=messages, tools=[FORECAST, CLOCK], max_tokens=300, temperature=1.0,
                   response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    r = client.chat.completions.create(seed=1, **request)
    assert r.choices[0].finish_reason == "tool_calls" and all(valid_call(c) for c in r.choices[0].message.tool_calls)
    call_tag = server[1].tokenizer.backend.token_to_id("<tool_call>")
    r = client.chat.completions.create(seed=1, logit_bias={str(call_tag): -100}, **request)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert set(json.loads(choice.message.content)) == {"sunny"}


def test_json_object_mode_on_both_endpoints(server):
    url, _ = server
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "JSON please"}]}),
                       ("/v1/completions", {"prompt": "Once upon a time"})]:
        status, answer = raw(url + path, {**body, "response_format": {"type": "json_object"}, "max_tokens": 400,
                                          "temperature": 0.7, "seed": 5})
        assert status == 200, answer
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # cut short by max_tokens: still the start of an object
            assert choice["finish_reason"] == "length" and text.startswith("{")


def test_n_choices(client):
    """n choices per request: seeded, choice i draws with seed + i * 2**32 (so n=3 gives the
    answers of three n=1 requests with those seeds, and again the same next time); usage
    counts the prompt once; greedy choices are all the same; streamed, each chunk names its
    choice."""
    messages = [{"role": "user", "content": "Tell me a story"}]
    sampled = dict(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=11,
                   extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, **sampled)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    alone = [client.chat.completions.create(**{**sampled, "seed": 11 + i * 2**32}) for i in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]
    assert r.usage.completion_tokens == 30 and r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **sampled))
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 30
    assert ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in range(3)] == texts
    greedy = client.chat.completions.create(messages=messages, n=2, **GREEDY)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_a_response_format_the_model_cannot_follow_is_a_400(server):
    """A schema whose fixed text spells a special token: llguidance refuses the token it
    allowed, and that request (streamed or not) ends with a 400 naming response_format."""
    url, _ = server
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": "<|im_end|>"}}}}
    status, answer = raw(url + "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "response_format"
    assert answer["error"]["message"].startswith("the answer could not go on under its response_format")
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["message"] == answer["error"]["message"]


def test_streamed_choices_are_interleaved():
    """Several choices stream as their events come: one waiting for its next token does not
    hold back another's (here `a` cannot go on until `b` has sent), and an error in one
    reaches the response."""
    import asyncio

    from mlxserve.server import _interleaved

    async def merged():
        b_sent = asyncio.Event()

        async def a():
            yield "a1"
            await b_sent.wait()
            yield "a2"

        async def b():
            yield "b1"
            b_sent.set()

        return [item async for item in _interleaved([a(), b()])]

    got = asyncio.run(asyncio.wait_for(merged(), 30))
    assert sorted(got) == ["a1", "a2", "b1"] and got.index("b1") < got.index("a2")

    async def failing():
        yield "x"
        raise RuntimeError("boom")

    async def drain():
        return [item async for item in _interleaved([failing(), failing()])]

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(asyncio.wait_for(drain(), 30))


def test_more_choices_than_the_server_holds_is_a_400(server):
    """prompts × n beyond max_running + max_waiting could never be admitted whole: a 400
    naming n, not a 429 that a client would retry."""
    url, engine = server
    limit = engine.config.max_running + engine.config.max_waiting
    status, body = raw(url + "/v1/completions", {"prompt": ["hi"] * (limit // 16 + 1), "n": 16, "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "n" and f"at most {limit} requests" in body["error"]["message"]
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0


def test_the_first_failing_choice_ends_a_whole_answer_at_once(server):
    """Not streamed, the choices are read side by side: one that fails ends the request while
    another has not finished (here, never would)."""
    import asyncio

    from mlxserve import openai_api
    from mlxserve.scheduler import TokenEvent
    from mlxserve.server import _collect

    _, engine = server

    class Stalled:
        async def __aiter__(self):
            await asyncio.Event().wait()
            yield  # (never reached)

    class Failing:
        async def __aiter__(self):
            yield TokenEvent("b", [], "", finish_reason="error", error="server busy: test")

    c = openai_api.Completion("text", [[1], [1]], SamplingParams(), False, False, MODEL, n=2)
    with pytest.raises(openai_api.APIError) as raised:
        asyncio.run(asyncio.wait_for(_collect(c, [Stalled(), Failing()], engine.loaded.tokenizer), 30))
    assert raised.value.status == 429


def test_n_choices_of_several_prompts(client):
    """/v1/completions with two prompts and n=2: prompt i's choices are at 2i and 2i + 1."""
    r = client.completions.create(prompt=["Hello", "The capital of France is"], n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(prompt=p, **GREEDY).choices[0].text for p in ("Hello", "The capital of France is")]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_every_chunk_of_a_stream_has_the_same_created(server, monkeypatch):
    from types import SimpleNamespace

    from mlxserve import openai_api

    url, _ = server
    clock = iter(range(1_700_000_000, 1_800_000_000))  # a second passes at every look at the clock
    monkeypatch.setattr(openai_api, "time", SimpleNamespace(time=lambda: next(clock)))
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        chunks = _sse_events(url + path, {**body, "max_tokens": 6, "ignore_eos": True, "stream": True,
                                          "stream_options": {"include_usage": True}}, key=KEY)
        assert len(chunks) > 2 and len({c["created"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1


def test_a_stream_with_usage_has_usage_null_on_every_other_chunk(server):
    """As OpenAI's: with include_usage every chunk has a usage field, null but on the last
    (typed clients read it there); without it, none has one."""
    url, _ = server
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        body = {**body, "max_tokens": 4, "ignore_eos": True, "stream": True, "n": 2}
        chunks = _sse_events(url + path, {**body, "stream_options": {"include_usage": True}}, key=KEY)
        assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
        assert not any("usage" in c for c in _sse_events(url + path, body, key=KEY))


def test_second_turn_reports_cached_tokens(client):
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 8},
                {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(messages=messages, **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(messages=messages, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens >= 8


def test_completions_prompt_forms_logprobs_and_stop(client):
    r = client.completions.create(prompt="The capital of France is", logprobs=2, **GREEDY)
    choice = r.choices[0]
    assert choice.text and len(choice.logprobs.tokens) == 12
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    ids = client.completions.create(prompt=[1, 2, 3], **GREEDY)
    assert ids.usage.prompt_tokens == 3
    many = client.completions.create(prompt=["Hello", "Numbers:"], **GREEDY)
    assert [c.index for c in many.choices] == [0, 1]
    stop = choice.text[4:7]
    stopped = client.completions.create(prompt="The capital of France is", stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


@pytest.mark.parametrize("n", [0, 2])
def test_legacy_logprobs_format(server, n):
    """OpenAI's /v1/completions logprobs: `logprobs` alternatives plus the sampled token in each
    top_logprobs dict (just the sampled one for 0), and each token's text_offset (into the prompt
    and the answer, as OpenAI's: the first is the prompt's length); streamed the same."""
    url, _ = server
    prompt = "The capital of France is"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.8, "seed": 3, "ignore_eos": True, "logprobs": n}
    status, whole = raw(url + "/v1/completions", body)
    assert status == 200, whole
    text, lp = whole["choices"][0]["text"], whole["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 12
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob and n <= len(top) <= n + 1
    assert lp["text_offset"][0] == len(prompt)
    _assert_text_offsets(prompt + text, lp)
    chunks = _sse_events(url + "/v1/completions", {**body, "stream": True}, key=KEY)
    streamed = {key: [v for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                      for v in c["choices"][0]["logprobs"][key]] for key in lp}
    assert streamed == lp


def test_legacy_logprobs_text_offset_with_echo(server):
    url, _ = server
    prompt = "The capital of France is"
    status, whole = raw(url + "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "logprobs": 1, "echo": True})
    text, lp = whole["choices"][0]["text"], whole["choices"][0]["logprobs"]
    assert lp["text_offset"][0] == 0 and lp["top_logprobs"][0] is None
    assert len(lp["text_offset"]) == len(lp["tokens"]) == len(lp["token_logprobs"]) > 5
    _assert_text_offsets(text, lp)
    # The answer's tokens have the same offsets echoed or not: both count from the prompt's start.
    status, alone = raw(url + "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "logprobs": 1})
    assert status == 200 and alone["choices"][0]["logprobs"]["text_offset"] == lp["text_offset"][-5:]


def _assert_text_offsets(text, lp):
    """Each token that is text is found at its text_offset (a "bytes:" token holds part of a
    character); the offsets never go back and stay in the text."""
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    plain = [(t, o) for t, o in zip(lp["tokens"], offsets) if not t.startswith("bytes:")]
    assert plain and all(text.startswith(t, o) for t, o in plain), (text, lp)


def test_seed_reproducibility(client):
    kw = dict(model=MODEL, temperature=1.0, max_tokens=16, seed=7, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    b = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    assert a == b


def test_concurrent_streams_match_alone(client):
    prompts = ["Hello", "The capital of France is", "def add(a, b):", "Numbers: 1 2 3", "Once upon", "Why", "A", "The sky"]
    alone = [client.completions.create(prompt=p, **GREEDY).choices[0].text for p in prompts]

    def streamed(p):
        return "".join(c.choices[0].text for c in client.completions.create(prompt=p, stream=True, **GREEDY) if c.choices)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


@pytest.mark.parametrize("path,field,value,status", [
    ("chat/completions", "stop", ["a" * 1000] * 60, 400),
    ("chat/completions", "max_tokens", int("9" * 4000), 400),  # (the context length's message)
    ("chat/completions", "top_logprobs", int("9" * 4000), 400),
    ("chat/completions", "model", "m" * 50_000, 404),
    ("completions", "max_tokens", int("9" * 4000), 400),
    ("embeddings", "model", "m" * 50_000, 404),
    ("embeddings", "model", 5, 400),  # (the wrong type, as chat says)
], ids=["stop", "chat-max_tokens", "top_logprobs", "chat-model", "text-max_tokens", "embeddings-model", "model-type"])
def test_errors_repeat_no_more_than_a_short_piece_of_a_huge_value(server, path, field, value, status):
    url, _ = server
    body = {"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat") else \
        {"prompt": "x"} if path == "completions" else {"input": "x"}
    logprobs = {"logprobs": True} if path.startswith("chat") else {}
    code, answer = raw(f"{url}/v1/{path}", {**body, **logprobs, field: value})
    assert code == status and answer["error"]["param"] == ("messages" if field == "max_tokens" and path.startswith("chat")
                                                           else "prompt" if field == "max_tokens" else field), answer
    assert len(answer["error"]["message"]) < 250, answer["error"]["message"]


def test_models_health_stats(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    for unknown in ("gpt-9", "org/some-model"):
        status, body = raw(url + "/v1/models/" + unknown, method="GET")
        assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert raw(url + "/v1/models/" + MODEL, method="GET", key=None)[0] == 401
    assert raw(url + "/health", method="GET", key=None) == (200, {"status": "ok"})
    status, stats = raw(url + "/v1/stats", method="GET")
    assert status == 200 and "running" in stats and "decode_tok_s" in stats


X = [{"role": "user", "content": "x"}]


def test_a_refused_cors_preflight_is_an_error_in_openai_shape(tiny_model_dir):
    """With --cors origins: a preflight from one of them is answered as Starlette answers it;
    from any other origin it is the same 400 with the same headers, its body OpenAI's error
    JSON (Starlette's is plain text), and a request from there still gets no CORS header."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    live = LiveServer(create_app(ScriptedEngine(loaded, ["fine"]), MODEL, cors_origins=["http://ok.example"]))

    def preflight(origin):
        req = urllib.request.Request(live.url + "/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    try:
        status, allowed, body = preflight("http://ok.example")
        assert status == 200 and body == b"OK"
        assert allowed["access-control-allow-origin"] == "http://ok.example"
        status, refused, body = preflight("http://other.example")
        assert status == 400 and refused["content-type"] == "application/json", body
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] == "Disallowed CORS origin"
        assert error["type"] == "invalid_request_error"
        assert "access-control-allow-origin" not in refused
        assert {name: value for name, value in refused.items() if name.lower().startswith("access-control-")} == \
            {name: value for name, value in allowed.items()
             if name.lower().startswith("access-control-") and name.lower() != "access-control-allow-origin"}
        req = urllib.request.Request(live.url + "/models", headers={"Origin": "http://other.example"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and "access-control-allow-origin" not in r.headers
    finally:
        live.stop()


def test_a_model_served_by_a_short_id_still_answers_to_its_other_names(tiny_model_dir):
    """A .gguf file given by path is served as its stem (registry.served_names): /v1/models
    and every answer show that id, and requests naming the path (the id before) or the stem
    are the same model; any other name is still a 404."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    path = "/models/My-Model.Q4_K_M.gguf"
    live = LiveServer(create_app(ScriptedEngine(loaded, ["fine"]), "My-Model.Q4_K_M", other_model_names=[path]))
    try:
        url = live.url
        assert raw(url + "/models", method="GET", key=None)[1]["data"][0]["id"] == "My-Model.Q4_K_M"
        for name in ("My-Model.Q4_K_M", path):
            assert raw(url + "/models/" + name, method="GET", key=None)[1]["id"] == "My-Model.Q4_K_M"
            status, answer = raw(url + "/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Hi"}]},
                                 key=None)
            assert status == 200 and answer["model"] == "My-Model.Q4_K_M"
            assert raw(url + "/completions", {"model": name, "prompt": "Hi"}, key=None)[1]["model"] == "My-Model.Q4_K_M"
            status, response = raw(url + "/responses", {"model": name, "input": "Hi"}, key=None)
            assert status == 200 and response["model"] == "My-Model.Q4_K_M"
        status, body = raw(url + "/chat/completions", {"model": "My-Model", "messages": [{"role": "user", "content": "Hi"}]},
                           key=None)
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert raw(url + "/models/My-Model", method="GET", key=None)[0] == 404
    finally:
        live.stop()


BAD = [
    ("not json", dict(data=b"{nope"), 400, None),
    ("not an object", dict(body=[1, 2]), 400, None),
    ("no messages", dict(body={"model": MODEL}), 400, "messages"),
    ("empty messages", dict(body={"model": MODEL, "messages": []}), 400, "messages"),
    ("unknown role", dict(body={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages"),
    ("content wrong type", dict(body={"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400, "messages"),
    ("user without content", dict(body={"messages": [{"role": "user"}]}), 400, "messages"),
    ("user content null", dict(body={"messages": [{"role": "user", "content": None}]}), 400, "messages"),
    ("system without content", dict(body={"messages": [{"role": "system"}, {"role": "user", "content": "x"}]}),
     400, "messages"),
    ("tool content null", dict(body={"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}, {
        "role": "tool", "tool_call_id": "c", "content": None}]}), 400, "messages"),
    ("name a number", dict(body={"messages": [{"role": "user", "content": "x", "name": 5}]}), 400, "messages"),
    ("assistant without content or calls", dict(body={"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant"}, {"role": "user", "content": "y"}]}), 400, "messages"),
    ("max_tokens string", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}), 400, "max_tokens"),
    ("max_tokens negative", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), 400, "max_tokens"),
    ("max_tokens zero", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, "max_tokens"),
    # (named as sent: the error named max_tokens, a field the request did not have)
    ("max_completion_tokens zero", dict(body={"messages": [{"role": "user", "content": "x"}],
                                              "max_completion_tokens": 0}), 400, "max_completion_tokens"),
    ("temperature negative", dict(body={"messages": [{"role": "user", "content": "x"}], "temperature": -1}), 400, "temperature"),
    ("temperature over 2", dict(body={"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}), 400,
     "temperature"),
    ("temperature string", dict(body={"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400, "temperature"),
    # true is an int to Python, a boolean to JSON: not a number (it was temperature 1)
    ("temperature true", dict(body={"messages": [{"role": "user", "content": "x"}], "temperature": True}), 400,
     "temperature"),
    # an int is /v1/completions' logprobs: here it was taken as true, its number of alternatives dropped
    ("logprobs a number", dict(body={"messages": [{"role": "user", "content": "x"}], "logprobs": 5}), 400, "logprobs"),
    ("top_p true", dict(body={"messages": [{"role": "user", "content": "x"}], "top_p": True}), 400, "top_p"),
    ("presence_penalty false", dict(body={"messages": [{"role": "user", "content": "x"}], "presence_penalty": False}),
     400, "presence_penalty"),
    ("top_p zero", dict(body={"messages": [{"role": "user", "content": "x"}], "top_p": 0}), 400, "top_p"),
    ("top_p big", dict(body={"messages": [{"role": "user", "content": "x"}], "top_p": 2}), 400, "top_p"),
    ("top_k negative", dict(body={"messages": [{"role": "user", "content": "x"}], "top_k": -3}), 400, "top_k"),
    ("min_p big", dict(body={"messages": [{"role": "user", "content": "x"}], "min_p": 1.5}), 400, "min_p"),
    ("presence huge", dict(body={"messages": [{"role": "user", "content": "x"}], "presence_penalty": 9}), 400, "presence_penalty"),
    ("frequency huge", dict(body={"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -9}), 400, "frequency_penalty"),
    ("repetition zero", dict(body={"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}), 400, "repetition_penalty"),
    ("seed float", dict(body={"messages": [{"role": "user", "content": "x"}], "seed": 1.5}), 400, "seed"),
    ("n zero", dict(body={"messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "n"),
    ("n over 16", dict(body={"messages": [{"role": "user", "content": "x"}], "n": 17}), 400, "n"),
    ("best_of under n", dict(body={"messages": [{"role": "user", "content": "x"}], "n": 3, "best_of": 2}), 400,
     "best_of"),
    ("stop number", dict(body={"messages": [{"role": "user", "content": "x"}], "stop": 5}), 400, "stop"),
    ("stop list of numbers", dict(body={"messages": [{"role": "user", "content": "x"}], "stop": [1]}), 400, "stop"),
    ("too many stops", dict(body={"messages": [{"role": "user", "content": "x"}], "stop": list("abcdefghijklmnopq")}), 400, "stop"),
    ("top_logprobs huge", dict(body={"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}), 400, "top_logprobs"),
    ("stream_options without stream", dict(body={"messages": X, "stream_options": {"include_usage": True}}), 400,
     "stream_options"),
    ("stream_options with stream false", dict(body={"messages": X, "stream": False, "stream_options": {}}), 400,
     "stream_options"),
    ("include_usage a string", dict(body={"messages": X, "stream": True, "stream_options": {"include_usage": "yes"}}),
     400, "stream_options"),
    ("stream string", dict(body={"messages": [{"role": "user", "content": "x"}], "stream": "yes"}), 400, "stream"),
    ("image part", dict(body={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages"),
    ("over context", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}), 400, "messages"),
    ("unknown model", dict(body={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
    ("bad key", dict(body={"messages": [{"role": "user", "content": "x"}]}, key="wrong"), 401, None),
    ("no key", dict(body={"messages": [{"role": "user", "content": "x"}]}, key=None), 401, None),
    ("huge body", dict(data=b'{"messages": "' + b"x" * 70_000 + b'"}'), 413, None),
    ("template kwargs set messages", dict(body={"messages": [{"role": "user", "content": "x"}],
                                                "chat_template_kwargs": {"messages": []}}), 400, "chat_template_kwargs"),
    ("template kwargs set tools", dict(body={"messages": [{"role": "user", "content": "x"}],
                                             "chat_template_kwargs": {"tools": []}}), 400, "chat_template_kwargs"),
    ("add_generation_prompt not a bool", dict(body={"messages": [{"role": "user", "content": "x"}],
                                                    "chat_template_kwargs": {"add_generation_prompt": "no"}}),
     400, "chat_template_kwargs"),
    ("tool_choice function a string", dict(body={"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                                                 "tool_choice": {"type": "function", "function": "get_weather"}}),
     400, "tool_choice"),
    ("tool_choice unknown", dict(body={"messages": [{"role": "user", "content": "x"}], "tool_choice": "bogus"}),
     400, "tool_choice"),
    ("tool_choice required without tools", dict(body={"messages": [{"role": "user", "content": "x"}],
                                                      "tool_choice": "required"}), 400, "tool_choice"),
    ("tool_choice named without tools", dict(body={"messages": [{"role": "user", "content": "x"}],
                                                   "tool_choice": {"type": "function", "function": {"name": "f"}}}),
     400, "tool_choice"),
    ("tool parameters not an object", dict(body={"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "x"}}]}), 400, "tools"),
]
BAD += [
    ("response_format json_schema without a schema", dict(body={"messages": X, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}), 400, "response_format"),
    ("response_format json_schema a string", dict(body={"messages": X, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}), 400, "response_format"),
    ("response_format schema of an unknown type", dict(body={"messages": X, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}), 400, "response_format"),
    ("response_format unsatisfiable schema", dict(body={"messages": X, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5,
                                                                        "maxLength": 2}}}}), 400, "response_format"),
    ("response_format schema with a 70-bit integer", dict(body={"messages": X, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                        "maximum": 2**70}}}}), 400, "response_format"),
    ("tool parameters with a 70-bit integer", dict(body={"messages": X, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"enum": [1, -(2**70)]}}}}}]}), 400, "tools"),
    # (falsy values too: the grammar of enforced calls read them as schemas, a 500)
    *[(f"tool parameters {json.dumps(value)}", dict(body={"messages": X, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": value}}]}), 400, "tools")
      for value in ([], "", 0, False)],
    ("tool parameters a string schema", dict(body={"messages": X, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}), 400, "tools"),
    ("tool parameters an unusable schema", dict(body={"messages": X, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "foo"}}}}}]}),
     400, "tools"),
    ("tool_choice required with no tools", dict(body={"messages": X, "tools": [], "tool_choice": "required"}),
     400, "tool_choice"),
    ("parallel_tool_calls a string", dict(body={"messages": X, "tools": TOOLS, "parallel_tool_calls": "no"}),
     400, "parallel_tool_calls"),
    ("a tool name with the call tag", dict(body={"messages": X, "tools": [
        {"type": "function", "function": {"name": "a</tool_call>b"}}]}), 400, "tools"),
    ("response_format unusable beside tools", dict(body={"messages": X, "tools": TOOLS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}), 400, "response_format"),
    ("response_format unknown type", dict(body={"messages": X, "response_format": {"type": "xml"}}), 400,
     "response_format"),
    ("response_format no type", dict(body={"messages": X, "response_format": {}}), 400, "response_format"),
    ("response_format a string", dict(body={"messages": X, "response_format": "json"}), 400, "response_format"),
    ("logit_bias a list", dict(body={"messages": X, "logit_bias": [[1, 2]]}), 400, "logit_bias"),
    ("logit_bias key not an id", dict(body={"messages": X, "logit_bias": {"the": 5}}), 400, "logit_bias"),
    ("logit_bias negative id", dict(body={"messages": X, "logit_bias": {"-1": 5}}), 400, "logit_bias"),
    ("logit_bias id past the vocabulary", dict(body={"messages": X, "logit_bias": {"100000": 5}}), 400, "logit_bias"),
    ("logit_bias id of 5000 digits", dict(body={"messages": X, "logit_bias": {"9" * 5000: 5}}), 400, "logit_bias"),
    ("logit_bias over 100", dict(body={"messages": X, "logit_bias": {"5": 100.5}}), 400, "logit_bias"),
    ("logit_bias huge", dict(body={"messages": X, "logit_bias": {"5": -10**400}}), 400, "logit_bias"),
    ("logit_bias value a string", dict(body={"messages": X, "logit_bias": {"5": "1"}}), 400, "logit_bias"),
    ("logit_bias value a bool", dict(body={"messages": X, "logit_bias": {"5": True}}), 400, "logit_bias"),
    ("best_of two", dict(body={"messages": X, "best_of": 2}), 400, "best_of"),
    ("best_of a string", dict(body={"messages": X, "best_of": "1"}), 400, "best_of"),
    ("functions beside tools", dict(body={"messages": X, "tools": TOOLS, "functions": [{"name": "f"}]}), 400,
     "functions"),
    ("function_call beside tool_choice", dict(body={"messages": X, "tool_choice": "auto", "function_call": "auto"}),
     400, "function_call"),
    ("functions not a list", dict(body={"messages": X, "functions": {"name": "f"}}), 400, "functions"),
    ("a function without a name", dict(body={"messages": X, "functions": [{"description": "f"}]}), 400,
     "functions"),
    ("function_call unknown", dict(body={"messages": X, "functions": [{"name": "f"}], "function_call": "any"}), 400,
     "function_call"),
    ("function_call naming no function", dict(body={"messages": X, "functions": [{"name": "f"}],
                                                     "function_call": {"name": "g"}}), 400, "function_call"),
    ("function message without a name", dict(body={"messages": [*X, {"role": "function", "content": "x"}]}), 400,
     "messages"),
]
BAD_COMPLETIONS = [
    ("no prompt", {"model": MODEL}, 400, "prompt"),
    ("suffix", {"prompt": "def f(", "suffix": "    return 1\n"}, 400, "suffix"),
    ("suffix not a string", {"prompt": "x", "suffix": 5}, 400, "suffix"),
    ("best_of three", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("best_of zero", {"prompt": "x", "best_of": 0}, 400, "best_of"),
    ("response_format unknown type", {"prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("logit_bias out of range", {"prompt": "x", "logit_bias": {"1": -101}}, 400, "logit_bias"),
    ("temperature over 2", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("logprobs true", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("logprobs false", {"prompt": "x", "logprobs": False}, 400, "logprobs"),
    ("logprobs 21", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs negative", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("prompt wrong type", {"prompt": 5}, 400, "prompt"),
    ("token id out of range", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1]}, 400, "prompt"),
    ("mixed prompt list", {"prompt": ["a", 1]}, 400, "prompt"),
]


@pytest.mark.parametrize("body,words", [
    ({"top_logprobs": 3}, "top_logprobs: needs logprobs set to true, got 3"),
    ({"stop": list("abcdefghijklmnopq")}, 'stop: at most 16 stop strings, got ["a", "b", "c",'),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, '{"type": "function", "function": {"name": …}}'),
    ({"tools": [{"type": "web_search"}]}, 'tools[0] must be {"type": "function", "function": {"name": …}}'),
    ({"functions": [5]}, 'functions[0] must be {"name": …, "description": …, "parameters": {…}}'),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, 'a function in functions: {"name": …}'),
    ({"functions": [{"name": "f"}], "function_call": "any"}, 'function_call must be "auto", "none" or {"name": …}'),
    ({"response_format": {"type": "json_schema"}}, 'needs "json_schema": {"name": …, "schema": {…}}'),
])
def test_errors_write_values_as_the_json_the_client_sent(server, body, words):
    """The client wrote JSON: an error shows its values, and the shapes it asks for, in JSON
    (true, null, ["a"], {"name": …}), not as Python writes them (True, None, ['a'], {'name': …})."""
    url, _ = server
    got, answer = raw(url + "/v1/chat/completions", {"messages": X, **body})
    message = answer["error"]["message"]
    assert got == 400 and words in message, message
    assert not any(python in message for python in ("True", "False", "None", "['", "{'")), message


@pytest.mark.parametrize("name,kwargs,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, name, kwargs, status, param):
    url, _ = server
    got, body = raw(url + "/v1/chat/completions", **kwargs)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if param:
        assert body["error"]["param"] == param
    if name == "over context":
        assert body["error"]["code"] == "context_length_exceeded"
    if name == "max_completion_tokens zero":
        assert body["error"]["message"].startswith("max_completion_tokens: must be an integer >= 1")
    if name == "response_format schema of an unknown type":
        assert body["error"]["message"] == "response_format: the grammar cannot be used: Invalid type: foo"
    if name == "response_format schema with a 70-bit integer":
        assert body["error"]["message"] == ("response_format: the JSON schema cannot be used: the integer at "
                                            "$.maximum (1180591620717411303424) does not fit in 64 bits (a bound "
                                            "can be written with an exponent, e.g. 1e30)")
    if name == "tool parameters with a 70-bit integer":
        assert "the integer at tools[0].function.parameters.properties.n.enum[1] (-1180591620717411303424)" \
            in body["error"]["message"]
    if name == "tool content null":
        assert body["error"]["message"].startswith("messages[2].content is required (a string or a list of parts) "
                                                    "in a 'tool' message")
    if name == "logit_bias value a string":
        assert 'got "1" for token 5' in body["error"]["message"]


def test_an_assistant_turn_with_calls_may_leave_its_content_out(server):
    url, _ = server
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    for turn in ({"role": "assistant", "tool_calls": [call]}, {"role": "assistant", "content": None, "tool_calls": [call]}):
        status, body = raw(url + "/v1/chat/completions", {"messages": [X[0], turn, {
            "role": "tool", "tool_call_id": "c", "content": "sunny"}], "tools": TOOLS, "max_tokens": 2})
        assert status == 200, body


def test_a_tool_result_must_answer_an_assistant_turn_with_calls(server):
    """As OpenAI: a tool's (or function's) result after no call is refused, not rendered."""
    url, _ = server
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    result = {"role": "tool", "tool_call_id": "c", "content": "sunny"}
    for history, index in (([X[0], result], 1), ([result], 0), ([X[0], {"role": "assistant", "content": "Hm."}, result], 2),
                           ([X[0], {"role": "assistant", "tool_calls": [call]}, result, X[0], result], 4),
                           ([X[0], {"role": "function", "name": "get_weather", "content": "sunny"}], 1)):
        status, body = raw(url + "/v1/chat/completions", {"messages": history, "tools": TOOLS, "max_tokens": 2})
        assert status == 400 and body["error"]["param"] == "messages", body
        assert body["error"]["message"].startswith(f"messages[{index}] is a "), body
        assert "must answer an assistant message's tool_calls" in body["error"]["message"]
    # Two results of one turn's calls are fine, the second after the first.
    status, body = raw(url + "/v1/chat/completions", {"messages": [X[0], {"role": "assistant", "tool_calls": [
        call, {**call, "id": "d"}]}, result, {**result, "tool_call_id": "d"}], "tools": TOOLS, "max_tokens": 2})
    assert status == 200, body


def test_an_assistant_refusal_part_is_its_text_in_the_history(server):
    """An assistant message's {"type": "refusal"} part (OpenAI's answer of a refusal, sent
    back in the history) is read as its text; elsewhere, and a part that is not text, is a 400
    naming the part's exact place."""
    from mlxserve import openai_api

    url, engine = server
    said = "I can't help with that."

    def history(*parts):
        return {"messages": [X[0], {"role": "assistant", "content": list(parts)}, {"role": "user", "content": "ok"}],
                "max_tokens": 2}

    as_text = {**history(), "messages": [X[0], {"role": "assistant", "content": said}, {"role": "user", "content": "ok"}]}
    expected = openai_api.parse_request(as_text, "chat", engine.tokenizer, 2048, MODEL).prompts
    for parts in ([{"type": "refusal", "refusal": said}],
                  [{"type": "text", "text": "I can't "}, {"type": "refusal", "refusal": "help with that."}]):
        assert openai_api.parse_request(history(*parts), "chat", engine.tokenizer, 2048, MODEL).prompts == expected
        status, answer = raw(url + "/v1/chat/completions", history(*parts))
        assert status == 200, answer
    for body, words in (
            (history({"type": "text", "text": "a"}, {"type": "text", "text": 5}), "messages[1].content[1].text must be "
                                                                                  "a string, got 5"),
            (history({"type": "refusal", "refusal": None}), "messages[1].content[0].refusal must be a string"),
            (history({"type": "image_url", "image_url": {"url": "x"}}), "messages[1].content[0]: only text or refusal "
                                                                        "content parts"),
            ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
             "messages[0].content[0]: only text content parts are supported in 'user' messages, got type \"refusal\""),
            ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]: only text content parts")):
        status, answer = raw(url + "/v1/chat/completions", body)
        assert status == 400 and answer["error"]["param"] == "messages", answer
        assert answer["error"]["message"].startswith(words), answer


def test_parameters_that_change_nothing_are_accepted(server):
    url, _ = server
    for path, body in (("/v1/chat/completions", {"messages": X, "response_format": {"type": "text"}, "best_of": 1}),
                       ("/v1/completions", {"prompt": "x", "suffix": "", "best_of": 1, "logit_bias": {}})):
        status, answer = raw(url + path, {**body, "max_tokens": 2})
        assert status == 200, answer


def test_an_empty_stop_string_is_ignored(server):
    """As OpenAI: `stop: ""` (or "" in a list) stops nothing, rather than being a 400."""
    url, _ = server
    for path, body in (("/v1/chat/completions", {"messages": X}), ("/v1/completions", {"prompt": "x"})):
        answers = []
        for stop in ("", [""], ["", ""], None):
            status, answer = raw(url + path, {**body, "stop": stop, "max_tokens": 6, "temperature": 0,
                                              "ignore_eos": True})
            assert status == 200, answer
            answers.append(answer["choices"][0])
        assert all(a["finish_reason"] == "length" for a in answers)
        assert len({json.dumps(a.get("message") or a.get("text")) for a in answers}) == 1


def test_openai_ranges_bounds_are_accepted(server):
    url, _ = server
    bounds = {"temperature": 2, "top_p": 1, "presence_penalty": -2, "frequency_penalty": 2}
    for path, body in (("/v1/chat/completions", {"messages": X}), ("/v1/completions", {"prompt": "x"})):
        status, answer = raw(url + path, {**body, **bounds, "max_tokens": 2})
        assert status == 200, answer


def test_logit_bias_steers_greedy_and_sampled_answers(server):
    url, engine = server
    tokenizer = engine.loaded.tokenizer
    (forced,) = tokenizer.encode(" time", add_special_tokens=False)
    for temperature in (0, 1.0):
        status, body = raw(url + "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": temperature,
                                                     "ignore_eos": True, "logit_bias": {str(forced): 100}})
        assert status == 200 and body["choices"][0]["text"] == " time" * 4, body
    greedy = {"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    (first,) = engine.generate([5, 6, 7], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[-1].token_ids
    assert raw(url + "/v1/completions", greedy)[1]["choices"][0]["text"] == tokenizer.decode([first])
    status, body = raw(url + "/v1/completions", {**greedy, "logit_bias": {str(first): -100}})
    assert status == 200 and body["choices"][0]["text"] != tokenizer.decode([first])


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
def test_an_integer_too_large_for_a_float_is_a_400_naming_the_field(server, field):
    url, _ = server
    huge = 10**400
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], field: huge}),
                       ("/v1/completions", {"prompt": "x", field: -huge})):
        status, answer = raw(url + path, body)
        assert (status, answer["error"]["param"]) == (400, field), answer
        assert field in answer["error"]["message"]


@pytest.mark.parametrize("data", [b"[" * 60_000, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": '
                                  + b"1" * 5000 + b"}"], ids=["nested too deep", "integer of 5000 digits"])
def test_json_that_python_cannot_read_is_not_valid_json(server, data):
    """Nesting deeper than the parser recurses, or an integer longer than Python converts:
    the body is refused like any other bad JSON (not a 503, and no field is to blame)."""
    url, _ = server
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, body = raw(url + path, data=data)
        assert (status, body["error"]) == (400, {"message": "request body is not valid JSON",
                                                 "type": "invalid_request_error", "param": None, "code": None})


def test_a_body_that_is_not_utf8_is_a_400_saying_so(server):
    """JSON is UTF-8: a body in another encoding (Latin-1's "é", one byte 0xe9) is refused
    with what is wrong and where, not as bad JSON, which sends the client looking for a
    syntax error that is not there."""
    url, _ = server
    data = '{"messages": [{"role": "user", "content": "café"}], "prompt": "café"}'.encode("latin-1")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"):
        status, body = raw(url + path, data=data)
        assert (status, body["error"]) == (400, {
            "message": f"request body is not valid UTF-8 (byte 0xe9 at offset {data.index(0xe9)}): JSON must be "
                       "sent as UTF-8", "type": "invalid_request_error", "param": None, "code": None})


@pytest.mark.parametrize("name,body,status,param", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests(server, name, body, status, param):
    url, _ = server
    got, answer = raw(url + "/v1/completions", body)
    assert got == status and answer["error"]["param"] == param


def test_null_fields_mean_their_defaults(server, client):
    """OpenAI's SDKs send explicit nulls; each means the field's default."""
    url, _ = server
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                           "repetition_penalty", "n", "seed", "stop", "logprobs", "top_logprobs",
                           "max_completion_tokens", "stream", "stream_options", "tools", "tool_choice",
                           "chat_template_kwargs", "user", "response_format", "logit_bias", "suffix", "best_of"])
    status, body = raw(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 3, "ignore_eos": True, **nulls})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 3  # max_tokens holds beside a null max_completion_tokens
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model=MODEL, max_tokens=2,
                                       temperature=None, top_p=None, seed=None)
    assert r.usage.completion_tokens <= 2
    status, body = raw(url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, **nulls, "echo": None})
    assert status == 200, body


def test_chat_template_kwargs_may_leave_out_the_generation_prompt(server):
    url, engine = server
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello th"}]
    tokenizer = engine.loaded.tokenizer
    for add in (True, False):
        status, body = raw(url + "/v1/completions", {"prompt": tokenizer.apply_chat_template(
            messages, add_generation_prompt=add), "max_tokens": 2, "temperature": 0, "ignore_eos": True})
        expected = body["usage"]["prompt_tokens"]
        status, body = raw(url + "/v1/chat/completions", {
            "messages": messages, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "chat_template_kwargs": {"add_generation_prompt": add}})
        assert status == 200 and body["usage"]["prompt_tokens"] == expected, (add, body)


def test_lower_case_bearer_is_accepted(server):
    url, _ = server
    status, _ = raw(url + "/v1/models", method="GET", key=None, headers={"Authorization": f"bearer {KEY}"})
    assert status == 200
    status, _ = raw(url + "/v1/models", method="GET", key=None, headers={"Authorization": f"Basic {KEY}"})
    assert status == 401


def test_max_tokens_defaults_to_the_rest_of_the_context(server):
    url, engine = server
    context = engine.loaded.context_length
    status, body = raw(url + "/v1/completions", {"prompt": [5] * (context - 3), "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    status, body = raw(url + "/v1/completions", {"prompt": [5] * context})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_a_bug_is_an_openai_shaped_500_and_the_server_goes_on(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = ScriptedEngine(loaded, ["fine"])
    live = LiveServer(create_app(engine, MODEL))
    try:
        engine.submit = lambda request, loop, **_: {}["a bug"]  # any unexpected exception
        status, body = raw(live.url + "/completions", {"prompt": "hi"}, key=None)
        assert status == 500 and body["error"]["type"] == "server_error"

        def runtime_error(request, loop, **_):
            raise RuntimeError("a bug")

        engine.submit = runtime_error  # a RuntimeError while the engine runs is a bug, not a 503
        status, body = raw(live.url + "/completions", {"prompt": "hi"}, key=None)
        assert status == 500 and body["error"]["type"] == "server_error"

        def stopping(request, loop, **_):
            raise EngineStopped("engine is not running")

        engine.submit = stopping  # the loop is ending while `alive` still says true: a 503
        status, body = raw(live.url + "/completions", {"prompt": "hi"}, key=None)
        assert status == 503 and body["error"]["type"] == "server_error"

        class BreaksMidStream(ScriptedStream):
            async def __aiter__(self):
                async for event in super().__aiter__():
                    yield event
                    raise KeyError("a bug")

        engine.submit = lambda request, loop, **_: BreaksMidStream(request, ["one ", "two"])
        req = urllib.request.Request(live.url + "/completions", method="POST", data=json.dumps(
            {"prompt": "hi", "stream": True}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == "one "
        assert json.loads(events[-1])["error"]["type"] == "server_error"  # the stream ends saying so
        del engine.submit
        status, body = raw(live.url + "/completions", {"prompt": "hi"}, key=None)
        assert status == 200 and body["choices"][0]["text"] == "fine"
    finally:
        live.stop()


def test_a_prompt_beyond_the_kv_budget_is_a_400_and_a_long_answer_ends_with_length(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    layers, heads, dim = loaded.model.kv_shape()
    budget = 32 * 2 * layers * heads * dim * 4  # one 32-token slot (block_size 8: the smallest)
    with Engine(loaded, EngineConfig(block_size=8, memory_budget_bytes=budget)) as engine:
        live = LiveServer(create_app(engine, MODEL))
        try:
            status, body = raw(live.url + "/completions", {"prompt": list(range(1, 41)), "max_tokens": 4}, key=None)
            assert status == 400 and body["error"]["param"] == "prompt" and "memory budget" in body["error"]["message"]
            # No max_tokens: the rest of the context, more than the budget holds.
            status, body = raw(live.url + "/completions", {"prompt": [1, 2, 3], "temperature": 0, "ignore_eos": True},
                               key=None)
            assert status == 200 and body["choices"][0]["finish_reason"] == "length"
            # the slot's 32 positions, and the token sampled at its last one (never fed)
            assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 32 + 1
        finally:
            live.stop()


def test_a_lone_surrogate_is_a_400(server, client):
    url, _ = server
    for path, body in (("/v1/completions", {"prompt": "\ud800", "max_tokens": 3}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udfff"}]})):
        status, answer = raw(url + path, body)
        assert status == 400 and "surrogate" in answer["error"]["message"], (path, status, answer)
    assert client.completions.create(prompt="\U0001f600 fine", **GREEDY).choices[0].text  # a real pair is text


def test_unknown_route_and_method_are_openai_errors(server):
    url, _ = server
    status, body = raw(url + "/v1/nothing", {})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = raw(url + "/v1/chat/completions", method="GET")
    assert status == 405 and "error" in body


def test_a_request_being_parsed_holds_up_no_other_stream(server, monkeypatch):
    """Reading a request (its template and tokenization: seconds for a body of megabytes) is
    done off the event loop: while one is stuck there, another request streams to its end."""
    from mlxserve import openai_api

    url, _ = server
    parsing, release = threading.Event(), threading.Event()
    parse_request = openai_api.parse_request

    def slow_parse(body, *args):
        if body.get("user") == "slow":
            parsing.set()
            release.wait()
        return parse_request(body, *args)

    monkeypatch.setattr(openai_api, "parse_request", slow_parse)
    streamed = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, ignore_eos=True, stream=True)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(raw, url + "/v1/completions", {"prompt": "x", "max_tokens": 2, "user": "slow"})
        try:
            assert parsing.wait(30), "the slow request never reached parsing"
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(streamed).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=30) as r:  # times out if the event loop is stuck
                events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
            assert not slow.done()  # still parsing all along
        finally:
            release.set()
        assert slow.result(timeout=60)[0] == 200


def test_server_still_serves_after_errors(server, client):
    url, _ = server
    for _ in range(3):
        raw(url + "/v1/chat/completions", data=b"garbage")
    assert client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **GREEDY).choices[0].message.content


def _cancelled_requests(url) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return sum(s.value for s in families["mlxserve_requests"].samples
               if s.labels.get("finish_reason") == "cancelled") if "mlxserve_requests" in families else 0


def test_disconnect_mid_stream_cancels_the_request(server):
    url, engine = server
    cancelled = _cancelled_requests(url)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = urllib.request.urlopen(req, timeout=60)
    response.readline()  # the stream has started: the request is running
    assert engine.stats()["running"] >= 1 or engine.stats()["decode_tokens"] > 0
    response.close()  # the client goes away
    # The row must be gone within a second (stats are republished when the engine handles
    # the cancellation); poll until then.
    gone = threading.Event()
    for _ in range(20):
        if engine.stats()["running"] == 0:
            gone.set()
            break
        gone.wait(0.05)
    assert gone.is_set(), "the request still runs 1 s after its client went away"
    assert engine.stats()["kv_bytes_in_use"] == 0
    # Counted although nobody read its end (stats are published just before the final event).
    _wait_until(lambda: _cancelled_requests(url) == cancelled + 1, "the cancelled request in /metrics")


def _wait_until(condition, what: str, seconds: float = 5) -> None:
    """Poll `condition` (engine stats are republished at every step) for up to `seconds`."""
    done = threading.Event()
    for _ in range(int(seconds / 0.05)):
        if condition():
            done.set()
            break
        done.wait(0.05)
    assert done.is_set(), what


def test_disconnect_while_waiting_for_a_whole_answer_cancels_the_request(server):
    import socket

    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1900,
                       "temperature": 0, "ignore_eos": True}).encode()
    before = engine.stats()["decode_tokens"]
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_until(lambda: engine.stats()["running"] >= 1, "the request never started")
    # The client has gone before any answer: the row must be gone too.
    _wait_until(lambda: engine.stats()["running"] == 0, "the request still runs after its client went away")
    assert engine.stats()["kv_bytes_in_use"] == 0
    assert engine.stats()["decode_tokens"] - before < 1000  # cancelled, not run to its end


def test_a_client_gone_while_sending_its_body_is_a_cancelled_request(tiny_model_dir):
    """Content-Length promises more than the client sends before it hangs up: nobody is left
    to answer, and that is no server error (no 500, no traceback in the log)."""
    import logging
    import socket

    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    app = create_app(ScriptedEngine(loaded, ["fine"]), MODEL)
    handled, statuses, logged = threading.Event(), [], []

    async def watched(scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        await app(scope, receive, record)
        if scope["type"] == "http":
            handled.set()

    handler = logging.Handler()
    handler.emit = logged.append
    logger = logging.getLogger("mlxserve.server")
    logger.addHandler(handler)
    live = LiveServer(watched)
    try:
        host, port = live.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b'Content-Length: 1000\r\n\r\n{"prompt": "a')
        assert handled.wait(30), "the request was never handled"
        assert statuses == [499] and logged == []
        assert raw(live.url + "/completions", {"prompt": "hi"}, key=None)[0] == 200
    finally:
        logger.removeHandler(handler)
        live.stop()


def test_abort_all_ends_requests_in_flight_with_503(tiny_model_dir):
    from mlxserve.engine import SHUTTING_DOWN

    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded, EngineConfig(max_running=1)) as engine:
        live = LiveServer(create_app(engine, MODEL))
        try:
            long = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
            req = urllib.request.Request(live.url + "/completions", data=json.dumps({**long, "stream": True}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            streaming = urllib.request.urlopen(req, timeout=60)
            streaming.readline()  # it runs; the next request waits for the running slot
            with ThreadPoolExecutor(1) as pool:
                whole = pool.submit(raw, live.url + "/completions", long, key=None)
                _wait_until(lambda: engine.stats()["waiting"] == 1, "the second request never queued")
                engine.abort_all(SHUTTING_DOWN)
                status, body = whole.result(timeout=60)
            assert status == 503 and body["error"]["message"] == SHUTTING_DOWN
            events = [line for line in streaming.read().decode().splitlines() if line.startswith("data: ")]
            assert json.loads(events[-1][6:])["error"]["message"] == SHUTTING_DOWN
            # The streams end at once; the engine frees the rows when it takes the abort
            # from its queue, after the step in progress.
            _wait_until(lambda: engine.stats()["running"] == 0, "the aborted row was never freed", seconds=60)
            assert engine.alive  # the engine itself goes on
            assert raw(live.url + "/completions", {"prompt": "hi", "max_tokens": 2}, key=None)[0] == 200
        finally:
            live.stop()


def test_a_request_whose_body_arrives_after_shutdown_began_gets_a_503(tiny_model_dir, monkeypatch):
    """SIGTERM while a request is still on its way in (its body arriving, or being parsed):
    it was accepted after abort_all had ended the requests in flight, and ran its whole answer
    while uvicorn waited for it, holding up the process's exit (or was cut off without a word
    after the grace period). It is refused with the same 503 instead."""
    import socket

    from mlxserve.engine import SHUTTING_DOWN
    from mlxserve.server import _Server

    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded, EngineConfig()) as engine:
        port = free_port()
        server = _Server(uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port,
                                        log_level="warning", timeout_graceful_shutdown=60), engine)
        aborted = threading.Event()  # set once shutdown has ended the requests in flight
        abort_all = engine.abort_all
        monkeypatch.setattr(engine, "abort_all", lambda *args, **kwargs: (abort_all(*args, **kwargs), aborted.set()))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            _wait_until(lambda: server.started, "the server never started")
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 50, "temperature": 0,
                               "ignore_eos": True}).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
                server.should_exit = True  # (what uvicorn's SIGTERM handler does)
                assert aborted.wait(timeout=60), "shutdown never began"
                sock.sendall(body[10:])
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), head
            assert json.loads(payload)["error"]["message"] == SHUTTING_DOWN
        finally:
            server.should_exit = True
            thread.join()


def test_serve_command_runs_and_stops_cleanly(tiny_model_dir):
    """The real `mlxserve serve` process: binds 127.0.0.1, answers, exits 0 on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxserve", "serve", "--model", str(tiny_model_dir("qwen3", "float32")),
         "--port", str(port), "--served-model-name", "tiny-cli"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:  # wait for the one line that says where it serves
            if "serving" in line:
                assert f"http://127.0.0.1:{port}/v1" in line
                break
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2)
        r = c.completions.create(model="tiny-cli", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        # Ctrl-C with a stream in flight: it ends with an error event saying why, at once.
        stream = c.completions.create(model="tiny-cli", prompt="Hello", max_tokens=1500, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_gives_a_gguf_path_its_short_id_unless_a_name_is_given(monkeypatch, tmp_path):
    """`mlxserve serve --model PATH.gguf` serves the id registry.served_names gives (the
    stem), answering to the others; --served-model-name is the one name."""
    import contextlib

    from mlxserve import cli, server

    gguf = tmp_path / "My-Model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    served = []
    monkeypatch.setattr(cli, "_load", lambda *args: None)  # (what is served is all this test looks at)
    monkeypatch.setattr(cli, "_running_engine", lambda loaded, config: contextlib.nullcontext("engine"))
    monkeypatch.setattr(cli, "_stop_saying_so", lambda engine: None)
    monkeypatch.setattr(server, "serve", lambda engine, name, sock, **options: served.append(
        (name, options["other_model_names"])))
    for extra in ([], ["--served-model-name", "mine"]):
        args = cli.build_parser().parse_args(["serve", "--model", str(gguf), "--port", str(free_port()), *extra])
        assert cli.cmd_serve(args) == 0
    assert served == [("My-Model.Q4_K_M", [str(gguf)]), ("mine", [])]


# ---- tool calls and reasoning: a scripted engine stand-in writes the model's answer ----------


@pytest.fixture(scope="module")
def scripted(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    servers = {name: LiveServer(create_app(ScriptedEngine(loaded, pieces), MODEL))
               for name, pieces in (("good", SCRIPT), ("bad", ["Hi ", "<tool_call>", "{oops}", "</tool_call>"]))}
    yield {name: openai.OpenAI(base_url=live.url, api_key="x", max_retries=0) for name, live in servers.items()}
    for live in servers.values():
        live.stop()


def test_tool_calls_and_reasoning_non_streaming(scripted):
    r = scripted["good"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    assert choice.message.model_extra["reasoning_content"] == "\nCheck the weather.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_calls_and_reasoning_streaming(scripted):
    chunks = list(scripted["good"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me look."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "\nCheck the weather.\n"
    parts = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(parts) > 1 and {p.index for p in parts} == {0}  # arguments arrive in pieces
    assert parts[0].id and parts[0].function.name == "get_weather"
    assert all(p.id is None for p in parts[1:])
    assert json.loads("".join(p.function.arguments for p in parts)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_chat_usage_counts_reasoning_tokens_as_openai_does(tiny_model_dir, client):
    """usage.completion_tokens_details.reasoning_tokens, there in every chat answer as in
    OpenAI's (0 without reasoning): the reasoning text's tokens, whole or streamed, per choice."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    pieces = ["<think>", "Some", " thought", "</think>"] + ["word "] * 20
    live = LiveServer(create_app(ScriptedEngine(loaded, pieces), MODEL))
    try:
        scripted = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
        want = len(loaded.tokenizer.encode("Some thought", add_special_tokens=False))
        assert 0 < want < len(pieces)
        messages = [{"role": "user", "content": "Think."}]
        whole = scripted.chat.completions.create(model=MODEL, messages=messages, n=2)
        assert whole.usage.completion_tokens_details.reasoning_tokens == 2 * want
        chunks = list(scripted.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                       stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == want
    finally:
        live.stop()
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_without_tools_the_markup_is_content(scripted):
    r = scripted["good"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "<tool_call>" in r.choices[0].message.content


def test_malformed_tool_call_is_plain_content(scripted):
    r = scripted["bad"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    assert r.choices[0].message.content == "Hi <tool_call>{oops}</tool_call>"
    assert r.choices[0].finish_reason == "stop"


def test_tool_history_and_tool_choice_are_accepted(scripted):
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client = scripted["good"]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "tool_calls"
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize("arguments", ['{"a": 1', "[" * 30_000, "1" * 5000, "not JSON at all"])
def test_tool_call_arguments_that_are_not_json_are_sent_back_as_written(scripted, arguments):
    """A call the model got wrong keeps its arguments as written (README, "Tool calls"); a
    client sends that turn back as it came, and the template gets the text as it is (JSON
    nested too deep, or an integer too long to convert, is such text too)."""
    from mlxserve import openai_api

    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    assert openai_api._normalize_message(history[1], 1)["tool_calls"][0]["function"]["arguments"] == arguments
    assert openai_api._normalize_message({**history[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}, 1
    )["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    r = scripted["good"].chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert r.choices[0].finish_reason == "tool_calls"


FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object"}}]  # TOOLS in the deprecated form


def test_deprecated_functions_answer_with_a_function_call(scripted):
    """`functions` / `function_call` (the forms before tools): served as tools, and the call
    comes back as the message's `function_call`, streamed or not; their history (an assistant
    `function_call`, a `function` message) reads as a tool call and its result."""
    client = scripted["good"]
    history = [{"role": "user", "content": "Weather?"}]
    for function_call in ("auto", {"name": "get_weather"}):
        r = client.chat.completions.create(model=MODEL, messages=history, functions=FUNCTIONS,
                                           function_call=function_call)
        choice = r.choices[0]
        assert choice.finish_reason == "function_call" and not choice.message.tool_calls
        assert choice.message.function_call.name == "get_weather"
        assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model=MODEL, messages=history, functions=FUNCTIONS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.function_call for d in deltas if d.function_call]
    assert calls[0].name == "get_weather" and all(call.name is None for call in calls[1:])
    assert json.loads("".join(call.arguments for call in calls)) == {"city": "Paris"}
    assert not any(d.tool_calls for d in deltas) and chunks[-1].choices[0].finish_reason == "function_call"
    history += [{"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
                {"role": "function", "name": "get_weather", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, functions=FUNCTIONS, function_call="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.function_call is None


def test_a_named_deprecated_function_call_is_enforced(server):
    """function_call {"name": …} is tool_choice naming that function: a random model writes
    its call, as the grammar holds it."""
    url, _ = server
    status, body = raw(url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 300, "temperature": 1.0,
        "seed": 3, "functions": [FORECAST["function"]], "function_call": {"name": "forecast"}})
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    call = choice["message"]["function_call"]
    assert call["name"] == "forecast" and set(json.loads(call["arguments"])) == {"city", "days"}


# Requests with the deprecated `functions` that are a 400: (what is wrong, the request's
# fields beside messages, the param, the message's start), each naming the fields as sent.
BAD_FUNCTIONS = [
    ("parameters not an object", {"functions": [{"name": "f", "parameters": "x"}]}, "functions",
     "functions[0].parameters must be a JSON Schema object"),
    ("a name with the call tag", {"functions": [{"name": "f"}, {"name": "a</tool_call>b"}]}, "functions",
     "functions[1].name must not contain <tool_call>"),
    # (the named function is the only tool left for its grammar: still named by its place)
    ("the named function's parameters a string schema", {
        "functions": [{"name": "f"}, {"name": "g", "parameters": {"type": "string"}}], "function_call": {"name": "g"}},
     "functions", "functions: functions[1].parameters must describe an object"),
    ("the named function's parameters with a 70-bit integer", {
        "functions": [{"name": "f"}, {"name": "g", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": -(2**70)}}}}], "function_call": {"name": "g"}},
     "functions", "functions: the functions' schemas cannot be used: the integer at functions[1].parameters.properties"
                  ".n.minimum"),
    ("function_call's name a list", {"functions": [{"name": "f"}], "function_call": {"name": ["f"]}},
     "function_call", "function_call must name a function in functions"),
    ("function_call's name an object", {"functions": [{"name": "f"}], "function_call": {"name": {"f": 1}}},
     "function_call", "function_call must name a function in functions"),
]


@pytest.mark.parametrize("fields,param,message", [b[1:] for b in BAD_FUNCTIONS], ids=[b[0] for b in BAD_FUNCTIONS])
def test_errors_of_deprecated_functions_name_them_as_sent(server, fields, param, message):
    """A request with `functions` / `function_call` (served as tools) that is a 400 names
    those fields, not the tools the server made of them."""
    url, _ = server
    status, body = raw(url + "/v1/chat/completions", {"messages": X, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["message"].startswith(message), body


def test_a_named_tool_is_named_by_its_place_in_an_error(server):
    """tool_choice naming a function leaves only it for the grammar: an error about its
    parameters still names it by its place in tools."""
    url, _ = server
    tools = [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {"type": "string"}}}]
    status, body = raw(url + "/v1/chat/completions", {"messages": X, "tools": tools, "tool_choice": {
        "type": "function", "function": {"name": "g"}}})
    assert status == 400 and body["error"]["param"] == "tools", body
    assert body["error"]["message"].startswith("tools: tools[1].function.parameters must describe an object"), body


def test_a_refused_token_of_a_named_deprecated_function_is_a_400_naming_functions(server):
    """The case of test_tool_edge_cases (the grammar allows the closing tag's text but the
    model writes it as a token, which it refuses) with the function in `functions`: the 400
    names functions."""
    url, _ = server
    spelled = {"name": "run", "parameters": {"type": "object", "properties": {"code": {"const": "</tool_call>"}},
                                             "required": ["code"]}}
    status, body = raw(url + "/v1/chat/completions", {"messages": X, "functions": [spelled],
                                                      "function_call": {"name": "run"}, "max_tokens": 40,
                                                      "temperature": 0})
    assert status == 400 and body["error"]["param"] == "functions", body
    assert body["error"]["message"].startswith("the answer could not go on as calls of its functions"), body


def _sse_events(url, body, key=None):
    """The JSON events of a streamed answer (the stream must end with [DONE])."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


TOOL_SCRIPTS = {
    # One piece ends the head and starts the arguments; the call object lacks its final "}".
    "no final brace": (["<tool_call>", '\n{"name": "f", "arguments": {"a": 1}', "\n</tool_call>"],
                       [("f", {"a": 1})], "tool_calls"),
    "a key after the arguments": (["<tool_call>", '{"name":"f","arguments":{"a":1}, "x":2}', "</tool_call>"],
                                  [("f", {"a": 1})], "tool_calls"),
    "well-formed": (["<tool_call>", '{"name": "f", "arguments": {"q": "a}b', '", "n": [1, 2]}}', "</tool_call>"],
                    [("f", {"q": "a}b", "n": [1, 2]})], "tool_calls"),
    "bad JSON after the head": (["<tool_call>", '{"name": "f", "arguments": {"code": "print("hi")"}}', "</tool_call>"],
                                [("f", None)], "stop"),
}


@pytest.mark.parametrize("shape", TOOL_SCRIPTS)
def test_streamed_and_whole_tool_calls_agree(tiny_model_dir, shape):
    """Whatever the model writes, a stream's tool calls are the whole answer's, one entry per call
    in a chunk, and finish_reason "tool_calls" only comes with arguments that are JSON objects."""
    pieces, calls, reason = TOOL_SCRIPTS[shape]
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    live = LiveServer(create_app(ScriptedEngine(loaded, pieces), MODEL))
    try:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
        status, whole = raw(live.url + "/chat/completions", request, key=None)
        assert status == 200, whole
        choice = whole["choices"][0]
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
        chunks = _sse_events(live.url + "/chat/completions", {**request, "stream": True})
        streamed, content = {}, ""
        for chunk in chunks:
            entries = chunk["choices"][0]["delta"].get("tool_calls") or []
            assert len({e["index"] for e in entries}) == len(entries), entries  # one entry per call and chunk
            for e in entries:
                if "id" in e:
                    streamed[e["index"]] = [e["function"]["name"], ""]
                streamed[e["index"]][1] += e["function"]["arguments"]
            content += chunk["choices"][0]["delta"].get("content") or ""
        assert [tuple(streamed[i]) for i in sorted(streamed)] == got
        assert (content or None) == choice["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] == reason
        for (name, arguments), (want_name, want) in zip(got, calls):
            assert name == want_name
            if want is not None:
                assert json.loads(arguments) == want
    finally:
        live.stop()


def test_a_streamed_answer_under_tool_choice_auto_opens_as_the_whole_answer_has_its_content(tiny_model_dir):
    """tool_choice "auto": an answer that is calls opens with content null, as OpenAI streams
    one and as the whole answer has it (it opened with "", which the SDK's accumulated message
    kept); an answer of text opens with "" as before, and so does one that says nothing."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    call = ["<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>"]
    for pieces, content in ((call, None), (["Sunny", " in Paris."], ""), ([""], "")):
        live = LiveServer(create_app(ScriptedEngine(loaded, pieces), MODEL))
        try:
            request = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
            chunks = _sse_events(live.url + "/chat/completions", {**request, "stream": True})
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": content}, pieces
            assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
            whole = raw(live.url + "/chat/completions", request, key=None)[1]["choices"][0]["message"]
            with openai.OpenAI(base_url=live.url, api_key="x", max_retries=0).chat.completions.stream(
                    **request) as stream:
                streamed = stream.get_final_completion().choices[0].message
            assert streamed.content == whole["content"] == (None if content is None else "".join(pieces)), pieces
            assert bool(streamed.tool_calls) == bool(whole.get("tool_calls")) == (content is None)
        finally:
            live.stop()
    # With log-probs, token by token: the call's tag tokens have theirs before the parser has
    # read the call; the role's chunk still comes first, content null.
    live = LiveServer(create_app(TokenScriptedEngine(loaded, "".join(call)), MODEL))
    try:
        chunks = _sse_events(live.url + "/chat/completions", {**request, "stream": True, "logprobs": True})
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert chunks[1]["choices"][0]["logprobs"]["content"] and all(
            "content" not in c["choices"][0]["delta"] for c in chunks[1:])
    finally:
        live.stop()


class TokenStream(ScriptedStream):
    """The engine's events for `text` as the tiny tokenizer splits it (then `stop_token`, if
    given), one token each with a log-prob and, as top alternatives, itself and the tokens in
    `alternatives`; text is released and cut by the request's stop strings as the scheduler does."""

    def __init__(self, request, tokenizer, text, alternatives=(), stop_token=None, ids=None):
        super().__init__(request, [])
        self.tokenizer, self.text, self.alternatives, self.stop_token = tokenizer, text, alternatives, stop_token
        self.ids = ids  # the answer's ids, where no text encodes to them (bytes that are no UTF-8)

    async def __aiter__(self):
        from mlxserve.detokenizer import IncrementalDetokenizer, StopMatcher
        from mlxserve.scheduler import TokenEvent, TokenLogprob

        ids = list(self.ids) if self.ids is not None else self.tokenizer.encode(self.text, add_special_tokens=False)
        ids += [self.stop_token] if self.stop_token is not None else []
        detokenizer, stops = IncrementalDetokenizer(self.tokenizer.decode), StopMatcher(self.request.params.stop)

        def flush():
            text, stopped = stops.feed(detokenizer.flush())
            return text if stopped else text + stops.flush()

        for i, token in enumerate(ids):
            if token == self.stop_token:
                text, reason = flush(), "stop"
            else:
                text, stopped = stops.feed(detokenizer.add(token))
                reason = "stop" if stopped else "length" if i == len(ids) - 1 else None
                text += flush() if reason == "length" else ""
            top = [(token, -0.5)] + [(t, -1.0 - j) for j, t in enumerate(self.alternatives) if t != token]
            yield TokenEvent("scripted", [token], text, [TokenLogprob(token, -0.5, top)], finish_reason=reason,
                             prompt_tokens=len(self.request.prompt_ids), completion_tokens=i + 1)
            if reason:
                return


def _token_server(loaded, text, **kw):
    engine = ScriptedEngine(loaded, [])
    engine.submit = lambda request, loop, **_: TokenStream(request, loaded.tokenizer, text, **kw)
    return LiveServer(create_app(engine, MODEL))


def test_logprob_bytes_of_tokens_that_split_a_character(tiny_model_dir):
    """A token may hold part of a UTF-8 character: its `bytes` are its own raw bytes (joined,
    the answer's UTF-8), its `token` OpenAI's "bytes:\\x.." spelling, and legacy top_logprobs
    keep such tokens apart (all of them used to be "\ufffd")."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    tokenizer = loaded.tokenizer
    text = "Tokyo: 東京 😀!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    partial = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert len(set(partial)) >= 2  # the tiny vocabulary splits these characters
    live = _token_server(loaded, text, alternatives=partial)
    try:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3}
        status, whole = raw(live.url + "/chat/completions", request, key=None)
        assert status == 200 and whole["choices"][0]["message"]["content"] == text
        chunks = _sse_events(live.url + "/chat/completions", {**request, "stream": True})
        streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for e in c["choices"][0]["logprobs"]["content"]]
        for content in (whole["choices"][0]["logprobs"]["content"], streamed):
            assert b"".join(bytes(e["bytes"]) for e in content) == text.encode()
            assert any(e["token"].startswith("bytes:\\x") for e in content)
            alternatives = {bytes(top["bytes"]) for e in content for top in e["top_logprobs"]}
            assert alternatives >= {tokenizer.token_bytes(t) for t in partial}
        status, legacy = raw(live.url + "/completions", {"prompt": "x", "logprobs": 3}, key=None)
        lp = legacy["choices"][0]["logprobs"]
        partial_keys = {k for top in lp["top_logprobs"] for k in top if k.startswith("bytes:")}
        assert len(partial_keys) == len({tokenizer.token_bytes(t) for t in partial})  # no two collide
        assert "\ufffd" not in "".join(lp["tokens"])
        # where each token starts: the character its first byte belongs to
        spelled = [bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode() for t in lp["tokens"]]
        assert b"".join(spelled) == text.encode()
        assert lp["text_offset"] == [len("x") + len(b"".join(spelled[:i]).decode("utf-8", "ignore"))
                                     for i in range(len(spelled))]  # (after the prompt "x")
    finally:
        live.stop()


def _covers_exactly(text, token_bytes):
    """The tokens' bytes are the text's, but for the last token, which a stop string may cut."""
    joined, text = b"".join(token_bytes), text.encode()
    assert joined.startswith(text) and (not token_bytes or len(joined) - len(token_bytes[-1]) < len(text)), \
        (text, token_bytes)


def _legacy_bytes(token):
    return bytes.fromhex(token[6:].replace("\\x", "")) if token.startswith("bytes:") else token.encode()


@pytest.mark.parametrize("case", ["stop string", "stop token"])
def test_logprobs_cover_the_tokens_of_the_answer_only(tiny_model_dir, case):
    """No log-prob for the token that ended the answer (EOS adds no text) or for tokens a stop
    string cut off; streamed and whole answers alike."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    tokenizer = loaded.tokenizer
    if case == "stop string":
        live, stop, content = _token_server(loaded, "1. Red\n2. Blue\n"), "Red\n", "1. "
    else:
        im_end = tokenizer.backend.token_to_id("<|im_end|>")
        live, stop, content = _token_server(loaded, "Hello there", stop_token=im_end), None, "Hello there"
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "stop": stop}
        status, whole = raw(live.url + "/chat/completions", chat, key=None)
        assert whole["choices"][0]["message"]["content"] == content
        assert whole["choices"][0]["finish_reason"] == "stop"
        chunks = _sse_events(live.url + "/chat/completions", {**chat, "stream": True})
        streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for e in c["choices"][0]["logprobs"]["content"]]
        assert streamed == whole["choices"][0]["logprobs"]["content"]
        _covers_exactly(content, [bytes(e["bytes"]) for e in streamed])
        assert "<|im_end|>" not in [e["token"] for e in streamed]

        legacy = {"prompt": "x", "logprobs": 1, "stop": stop}
        status, whole = raw(live.url + "/completions", legacy, key=None)
        lp = whole["choices"][0]["logprobs"]
        assert whole["choices"][0]["text"] == content and len(lp["text_offset"]) == len(lp["tokens"])
        _covers_exactly(content, [_legacy_bytes(t) for t in lp["tokens"]])
        chunks = _sse_events(live.url + "/completions", {**legacy, "stream": True})
        assert [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]
    finally:
        live.stop()


def test_logprobs_of_an_answer_with_broken_utf8_cut_by_a_stop_string(tiny_model_dir):
    """An answer whose bytes are no UTF-8 (a character's first bytes, then another
    character: the text has U+FFFD, 3 bytes, where the token had 2) and that a stop string
    cuts: the tokens it cut off whole have no log-prob (they used to: the answer's text was
    counted in bytes, which U+FFFD adds to)."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    tokenizer = loaded.tokenizer
    partial = tokenizer.encode("東", add_special_tokens=False)[0]  # the character's first bytes only
    assert len(tokenizer.token_bytes(partial)) == 2
    ids = [partial] + tokenizer.encode("Red\nBlue\n", add_special_tokens=False)
    live = _token_server(loaded, None, ids=ids)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "stop": "Red"}
        status, whole = raw(live.url + "/chat/completions", chat, key=None)
        assert status == 200 and whole["choices"][0]["message"]["content"] == "\ufffd"
        chunks = _sse_events(live.url + "/chat/completions", {**chat, "stream": True})
        streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for e in c["choices"][0]["logprobs"]["content"]]
        for content in (whole["choices"][0]["logprobs"]["content"], streamed):
            assert [bytes(e["bytes"]) for e in content] == [tokenizer.token_bytes(partial)]

        legacy = {"prompt": "x", "logprobs": 1, "stop": "Red"}
        status, whole = raw(live.url + "/completions", legacy, key=None)
        lp = whole["choices"][0]["logprobs"]
        assert whole["choices"][0]["text"] == "\ufffd" and lp["tokens"] == ["bytes:\\xe6\\x9d"]
        chunks = _sse_events(live.url + "/completions", {**legacy, "stream": True})
        assert [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]
    finally:
        live.stop()


def test_logprobs_cover_a_token_of_no_text_that_ends_an_answer_cut_by_max_tokens(tiny_model_dir):
    """A token of no text (an id beyond the vocabulary, a GGUF's unused one: random weights
    sample them) has its entry once later text comes. One that ends an answer cut by
    max_tokens had none (no text comes after it): the answer had one entry fewer than
    usage.completion_tokens, streamed or not. Its empty text is in the answer, as such a
    token's in the middle is."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    tokenizer = loaded.tokenizer
    silent = loaded.model.args.vocab_size - 1  # (the vocabulary is padded to a multiple of 64)
    assert tokenizer.token_bytes(silent) == b""
    ids = tokenizer.encode("Hello", add_special_tokens=False) + [silent] + tokenizer.encode(" there", add_special_tokens=False) + [silent]
    live = _token_server(loaded, None, ids=ids)
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True}
        status, whole = raw(live.url + "/chat/completions", chat, key=None)
        assert status == 200 and whole["choices"][0]["finish_reason"] == "length"
        assert whole["choices"][0]["message"]["content"] == "Hello there"
        chunks = _sse_events(live.url + "/chat/completions", {**chat, "stream": True})
        streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for e in c["choices"][0]["logprobs"]["content"]]
        for content in (whole["choices"][0]["logprobs"]["content"], streamed):
            assert [bytes(e["bytes"]) for e in content] == [tokenizer.token_bytes(t) for t in ids]

        legacy = {"prompt": "x", "logprobs": 1}
        status, whole = raw(live.url + "/completions", legacy, key=None)
        lp = whole["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(ids)
        assert lp["text_offset"][-1] == len("x") + len("Hello there")
        chunks = _sse_events(live.url + "/completions", {**legacy, "stream": True})
        assert [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]
    finally:
        live.stop()


def test_logprobs_of_a_real_answer_cut_by_a_stop_string_or_ended_by_eos(server):
    url, engine = server
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    full = raw(url + "/v1/completions", body)[1]["choices"][0]["text"]
    for stop in (full[4:7], full[5:6]):
        status, answer = raw(url + "/v1/completions", {**body, "stop": stop})
        text, lp = answer["choices"][0]["text"], answer["choices"][0]["logprobs"]
        assert answer["choices"][0]["finish_reason"] == "stop" and stop not in text
        _covers_exactly(text, [_legacy_bytes(t) for t in lp["tokens"]])
    eos = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "temperature": 0,
           "logit_bias": {str(engine.loaded.tokenizer.backend.token_to_id("<|im_end|>")): 100}}
    status, answer = raw(url + "/v1/chat/completions", eos)
    assert answer["choices"][0]["message"]["content"] == "" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["logprobs"]["content"] == []
    chunks = _sse_events(url + "/v1/chat/completions", {**eos, "stream": True}, key=KEY)
    assert not any(c["choices"] and c["choices"][0]["logprobs"] for c in chunks)


def test_metrics_parse_as_prometheus_text(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(prompt="Hello", **GREEDY)
    url, _ = server
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mlxserve_requests", "mlxserve_generation_tokens", "mlxserve_time_to_first_token_seconds",
                 "mlxserve_inter_token_latency_seconds", "mlxserve_running", "mlxserve_kv_bytes_in_use"):
        assert name in families, name
    ttft_count = next(s.value for s in families["mlxserve_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    assert ttft_count >= 1
    generated = next(s.value for s in families["mlxserve_generation_tokens"].samples)
    assert generated >= 12
    assert families["mlxserve_preemptions"].type == "counter"
    assert next(s.value for s in families["mlxserve_requests_in_progress"].samples) == 0  # (the one above ended)


def test_health_is_503_when_the_engine_stopped(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = Engine(loaded).start()
    live = LiveServer(create_app(engine, MODEL))
    try:
        assert raw(live.base + "/health", method="GET", key=None)[0] == 200
        engine.stop()  # the engine loop ends: the server must say so
        status, body = raw(live.base + "/health", method="GET", key=None)
        assert status == 503
        status, body = raw(live.url + "/completions", {"prompt": "hi"}, key=None)
        assert status == 503 and body["error"]["type"] == "server_error"
    finally:
        live.stop()


def test_a_request_in_flight_when_the_engine_loop_dies_is_a_503(tiny_model_dir):
    """The loop ending under a request (here: a step raising what only ends a thread) is the
    engine stopping, as /health then says: 503, as for every request after it."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = Engine(loaded).start()
    live = LiveServer(create_app(engine, MODEL))

    def step():
        raise SystemExit

    try:
        engine._scheduler.step = step  # (read by the loop at its next step: this request's first)
        status, body = raw(live.url + "/completions", {"prompt": "hi", "max_tokens": 2}, key=None)
        assert status == 503, body
        assert body["error"] == {"message": "engine stopped", "type": "server_error",
                                                   "param": None, "code": None}, body
        assert raw(live.base + "/health", method="GET", key=None)[0] == 503
    finally:
        live.stop()
        engine.stop()


def test_echo_scoring_equals_a_direct_forward_pass(server, client):
    """lm-evaluation-harness style: echo + logprobs + max_tokens 0 scores the prompt."""
    from tiny_models import reference_prompt_logprobs

    url, engine = server
    text = "The capital of France is Paris."
    r = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=1, max_tokens=0)
    choice = r.choices[0]
    prompt = engine.loaded.tokenizer.encode(text)
    expected = reference_prompt_logprobs(engine.loaded, prompt)
    assert choice.text == text and r.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == len(prompt)
    for i, lp in enumerate(choice.logprobs.token_logprobs[1:]):
        assert abs(lp - expected[i, prompt[i + 1]].item()) < 1e-4
    # with generation: the prompt's logprobs, then the generated tokens'
    r = client.completions.create(prompt=text, echo=True, logprobs=0, **GREEDY)
    assert r.choices[0].text.startswith(text)
    assert len(r.choices[0].logprobs.token_logprobs) == len(prompt) + 12
    status, body = raw(url + "/v1/completions", {"prompt": text, "echo": True, "stream": True})
    assert status == 400 and body["error"]["param"] == "echo"


def test_full_queue_answers_429_and_recovers(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded, EngineConfig(max_running=1, max_waiting=1)) as engine:
        live = LiveServer(create_app(engine, MODEL))
        try:
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500, "stream": True,
                               "temperature": 0, "ignore_eos": True}).encode()
            held = []
            for _ in range(2):  # two long streams fill the running slot and the queue
                req = urllib.request.Request(live.url + "/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                held.append(urllib.request.urlopen(req, timeout=60))
            status, answer = raw(live.url + "/completions", {"prompt": "hi", "max_tokens": 2}, key=None)
            assert status == 429 and answer["error"]["code"] == "server_busy"
            for response in held:
                response.close()  # the clients leave: their requests are cancelled
            client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=5)
            assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
        finally:
            live.stop()


def test_a_429_for_several_answers_counts_the_requests_in_progress_without_its_own(tiny_model_dir):
    """n answers (or embedding inputs) are submitted one by one; the one that finds the server full refuses the
    request whole (the others are given up): its 429 counts the requests in progress as
    they are, not with the request's own answers it had submitted (it said 3 of 3 here, with
    one request in progress)."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    with Engine(loaded, EngineConfig(max_running=1, max_waiting=2)) as engine:
        live = LiveServer(create_app(engine, MODEL))
        try:
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500, "stream": True,
                               "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(live.url + "/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60):  # a long stream holds one place
                status, answer = raw(live.url + "/completions", {"prompt": "hi", "max_tokens": 2, "n": 3}, key=None)
                assert status == 429 and answer["error"]["code"] == "server_busy"
                assert answer["error"]["message"] == ("server busy: 1 requests in progress, and this request's 3 "
                                                      "answers (prompts × n) need a place each (limit 3)")
                status, answer = raw(live.url + "/embeddings", {"input": ["a", "b", "c"]}, key=None)
                assert status == 429 and answer["error"]["message"] == (
                    "server busy: 1 requests in progress, and this request's 3 inputs need a place each (limit 3)")
                assert engine.stats()["requests_in_progress"] == 1
        finally:
            live.stop()


def test_a_speculating_server_streams_the_same_text_and_counts_drafts(server, client, tiny_model_dir):
    """`serve --speculative ngram`: streamed and whole answers are the plain server's, token
    for token, and /metrics counts the drafts checked and accepted."""
    from prometheus_client.parser import text_string_to_metric_families

    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = Engine(loaded, EngineConfig(block_size=8, speculative="ngram")).start()
    live = LiveServer(create_app(engine, MODEL, api_key=KEY))
    try:
        spec = openai.OpenAI(base_url=live.base + "/v1", api_key=KEY, max_retries=0)
        params = dict(GREEDY, max_tokens=64)
        for prompt in ("Hello", "one two three one two three one", "a b c d e f g a b c"):
            expected = client.completions.create(prompt=prompt, **params).choices[0].text
            assert spec.completions.create(prompt=prompt, **params).choices[0].text == expected
            chunks = spec.completions.create(prompt=prompt, stream=True, **params)
            assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        with urllib.request.urlopen(live.base + "/metrics", timeout=30) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        drafted = families["mlxserve_draft_tokens"].samples[0].value
        accepted = families["mlxserve_draft_tokens_accepted"].samples[0].value
        assert drafted >= accepted > 0
    finally:
        live.stop()
        engine.stop()


def test_embeddings_through_the_openai_sdk(server, client):
    import numpy as np

    from mlxserve.scheduler import Request

    engine = server[1]
    texts = ["The capital of France", "is Paris, a city on a river"]
    ids = [engine.loaded.tokenizer.encode(t) for t in texts]
    hidden = [np.array(list(engine.submit(Request(p, embed=True)))[-1].embedding) for p in ids]
    unit = [h / np.linalg.norm(h) for h in hidden]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == MODEL
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(p) for p in ids)
    for d, expected in zip(floats.data, unit):
        np.testing.assert_allclose(d.embedding, expected, atol=1e-6, rtol=0)
    # The SDK's default asks for base64 (float32 bytes) and decodes it: the same numbers.
    by_default = client.embeddings.create(model=MODEL, input=texts)
    for d, f in zip(by_default.data, floats.data):
        np.testing.assert_allclose(d.embedding, f.embedding, atol=1e-7, rtol=0)
    # Token ids in, one input or several.
    as_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    np.testing.assert_allclose(as_ids.data[0].embedding, floats.data[0].embedding, atol=1e-6, rtol=0)
    np.testing.assert_allclose(one.data[0].embedding, floats.data[1].embedding, atol=1e-6, rtol=0)
    # dimensions: the first components, of unit length again.
    cut = client.embeddings.create(model=MODEL, input=texts[0], dimensions=8, encoding_format="float")
    np.testing.assert_allclose(cut.data[0].embedding, hidden[0][:8] / np.linalg.norm(hidden[0][:8]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [1.5]}, 400, "input"),
    ({"input": [[1, 2], []]}, 400, "input"),
    ({"input": [10 ** 9]}, 400, "input"),
    ({"input": [0] * 2049}, 400, "input"),  # past the tiny model's context (2,048)
    ({"input": ["a"] * 321}, 400, "input"),  # more than max_running + max_waiting
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": 65}, 400, "dimensions"),  # the tiny model's hidden size is 64
    ({"input": "x", "dimensions": True}, 400, "dimensions"),
    ({"input": "x", "model": "other"}, 404, "model"),
    ([1, 2], 400, None),
])
def test_bad_embedding_requests(server, body, status, param):
    code, answer = raw(server[0] + "/v1/embeddings", body)
    assert code == status and answer["error"]["param"] == param, answer
    code, answer = raw(server[0] + "/v1/embeddings", {"input": "x"}, key=None)
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"
