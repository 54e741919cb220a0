"""OpenAI's Responses API (`/v1/responses`, responses_api.py) through the openai SDK and raw
HTTP, on a live server with a tiny random model."""

import http.client
import json
import urllib.parse
import urllib.request

import openai
import pytest
from live_server import SCRIPT, GatedEngine, LiveServer, ScriptedEngine, TokenScriptedEngine

from mlxserve import responses_api
from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.server import create_app

MODEL = "tiny"
CLOCK = {"type": "function", "name": "clock", "description": "the time",
         "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                        "additionalProperties": False}}
DIGIT = {"type": "json_schema", "name": "digit", "schema": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
    "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    engine = Engine(loaded, EngineConfig(block_size=8)).start()
    live = LiveServer(create_app(engine, MODEL))
    yield live
    live.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def scripted(tiny_model_dir):
    """A server whose every answer is SCRIPT: reasoning, text, then a get_weather call."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    live = LiveServer(create_app(ScriptedEngine(loaded, SCRIPT), MODEL))
    yield live
    live.stop()


WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def raw_events(server, body: dict) -> list[dict]:
    """The SSE events of a streamed response, checking that each `event:` line names its data's type."""
    req = urllib.request.Request(server.base + "/v1/responses", data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        blocks = [b for b in r.read().decode().split("\n\n") if b.strip()]
    events = []
    for block in blocks:
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        events.append(json.loads(data[6:]))
        assert events[-1]["type"] == kind[7:]
    return events


def test_a_response_answers_as_the_chat_completion_of_the_same_messages(client):
    """instructions + input are the chat's system and user messages: greedy, the same text and
    prompt tokens; cut by max_output_tokens, the response is incomplete."""
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello there", max_output_tokens=12,
                                temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 12
    assert r.usage.total_tokens == r.usage.input_tokens + 12 and r.instructions == "Be brief."
    assert [item.type for item in r.output] == ["message"] and r.output[0].role == "assistant"


def test_empty_instructions_are_an_empty_system_message(client):
    """instructions "" is the chat's explicit empty system message (no template default), not left out."""
    r = client.responses.create(model=MODEL, instructions="", input="Hi", max_output_tokens=1)
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "system", "content": ""}, {"role": "user", "content": "Hi"}])
    without = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    assert r.usage.input_tokens == chat.usage.prompt_tokens > without.usage.input_tokens
    assert r.instructions == ""


def test_streamed_events_build_the_same_response(client, server):
    body = {"model": MODEL, "input": "Tell me", "max_output_tokens": 12, "temperature": 0}
    events = raw_events(server, body)
    whole = client.responses.create(**body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.content_part.added"]
    assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                                "response.output_item.done", "response.incomplete"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == whole.output_text == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert events[0]["response"]["status"] == "in_progress" and events[-1]["response"]["status"] == "incomplete"


def test_logprobs_of_the_message_text_as_the_chat_completion_gives_them(client, server):
    """include: message.output_text.logprobs (with top_logprobs alternatives) puts the
    message's token log-probs on its output_text part, the chat completion's for the same
    messages; streamed, each text delta carries its own. Not included, there are none."""
    body = {"model": MODEL, "input": "Hello there", "max_output_tokens": 10, "temperature": 0,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = client.responses.create(**body)
    chat = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hello there"}])
    part = r.output[0].content[0]
    expected = chat.choices[0].logprobs.content
    assert r.output_text == chat.choices[0].message.content and len(part.logprobs) == len(expected) == 10
    assert [(lp.token, lp.logprob, lp.bytes) for lp in part.logprobs] == [(lp.token, lp.logprob, lp.bytes) for lp in expected]
    assert all([t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs] and len(a.top_logprobs) == 2
               for a, b in zip(part.logprobs, expected))
    assert r.top_logprobs == 2
    events = raw_events(server, body)
    deltas = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert deltas == done["logprobs"] == events[-1]["response"]["output"][0]["content"][0]["logprobs"]
    assert [lp["token"] for lp in deltas] == [lp.token for lp in expected]
    plain = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4)
    assert plain.output[0].content[0].logprobs == []
    # top_logprobs without the include asks for none either, as OpenAI's (it is echoed).
    alone = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4, top_logprobs=2)
    assert alone.output[0].content[0].logprobs == [] and alone.top_logprobs == 2


@pytest.mark.parametrize("answer, message", [
    ("<think>\nhmm, 42\n</think>\n\nIt is 42 here.", "It is 42 here."),
    ('It is 42 <tool_call>\n{"name": "get_weather", "arguments": {"n": 42}}\n</tool_call>', "It is 42 "),
])
def test_logprobs_are_those_of_the_message_texts_own_tokens(tiny_model_dir, answer, message):
    """Tokens that made reasoning, tags or a call have no log-probs on the message: the
    tokens listed are those of its text, byte for byte, streamed or not (a model's answer
    streamed token by token, TokenScriptedEngine)."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    live = LiveServer(create_app(TokenScriptedEngine(loaded, answer), MODEL))
    try:
        body = {"model": MODEL, "input": "q", "tools": [WEATHER], "include": ["message.output_text.logprobs"]}
        client = openai.OpenAI(base_url=live.base + "/v1", api_key="x", max_retries=0)
        whole = client.responses.create(**body).model_dump()
        streamed = raw_events(live, body)[-1]["response"]
    finally:
        live.stop()
    for response in (whole, streamed):
        (part,) = [item["content"][0] for item in response["output"] if item["type"] == "message"]
        assert part["text"] == message
        assert bytes(b for lp in part["logprobs"] for b in lp["bytes"]).decode() == message


def test_structured_output_through_the_sdk_stream_helper(client):
    with client.responses.stream(model=MODEL, input="A digit", text={"format": DIGIT}, max_output_tokens=100) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.status == "completed"
    assert set(json.loads(final.output_text)) == {"a"}


def test_a_tool_loop_with_previous_response_id(client):
    """Required tool calls come as function_call items; the tool's output goes back as a
    function_call_output item continuing the stored response, whose conversation the next
    prompt holds (its first blocks then come from the prefix cache)."""
    # One call (parallel_tool_calls false): a random model may chain calls past any limit.
    first = client.responses.create(model=MODEL, input="What time is it?", tools=[CLOCK], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=100, temperature=1.0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls and all(c.name == "clock" for c in calls)
    assert all(json.loads(c.arguments)["zone"] in ("UTC", "CET") and c.call_id for c in calls)
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "12:00"} for c in calls]
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=outputs, tools=[CLOCK],
                                      max_output_tokens=8, temperature=0)
    # The same conversation written out as chat messages gives the same prompt.
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, tools=[
        {"type": "function", "function": {k: CLOCK[k] for k in ("name", "description", "parameters")}}], messages=[
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]},
        *({"role": "tool", "tool_call_id": c.call_id, "content": "12:00"} for c in calls)])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens_details.cached_tokens > 0 and second.previous_response_id == first.id
    # The stored responses can be read back and deleted.
    assert client.responses.retrieve(first.id).output[0].call_id == calls[0].call_id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_a_stored_responses_input_items_come_back_a_page_at_a_time(client, server):
    """GET /v1/responses/{id}/input_items (the SDK's input_items.list): the request's input
    as items with ids (the client's kept), text as content parts, newest first unless asked
    otherwise, paged by limit and after; bad queries are 400s naming the parameter."""
    given = [{"role": "system", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}], "id": "msg_mine"},
             {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Time?"}]
    r = client.responses.create(model=MODEL, input=given, max_output_tokens=2)
    items = client.responses.input_items.list(r.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", m["role"]) for m in given]
    assert items[1].id == "msg_mine" and len({i.id for i in items}) == 4
    assert [i.content[0].text for i in items] == ["Be brief.", "Hi", "Hello.", "Time?"]
    assert [i.content[0].type for i in items] == ["input_text", "input_text", "output_text", "input_text"]
    assert [i.id for i in client.responses.input_items.list(r.id).data] == [i.id for i in items][::-1]
    first = client.responses.input_items.list(r.id, order="asc", limit=3)
    assert [i.id for i in first.data] == [i.id for i in items[:3]] and first.has_more
    rest = client.responses.input_items.list(r.id, order="asc", limit=3, after=first.last_id)
    assert [i.id for i in rest.data] == [items[3].id] and not rest.has_more
    # A string input is one user message; a tool output keeps its call id.
    text = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    (only,) = client.responses.input_items.list(text.id).data
    assert (only.role, only.content[0].text, only.status) == ("user", "x", "completed")
    out = client.responses.create(model=MODEL, previous_response_id=text.id, max_output_tokens=2, input=[
        {"type": "function_call", "call_id": "call_1", "name": "clock", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}])
    output, call = client.responses.input_items.list(out.id).data
    assert (output.type, output.call_id, output.output) == ("function_call_output", "call_1", "12:00")
    assert (call.type, call.call_id, call.name) == ("function_call", "call_1", "clock")
    bad = ("limit=0", "limit"), ("limit=x", "limit"), ("limit=%C2%B2", "limit"), ("limit=%EF%BC%93", "limit"), \
        ("order=up", "order"), ("after=nope", "after")
    for query, param in bad:  # (² and a full-width 3: digits to str.isdigit, not to int())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.base}/v1/responses/{r.id}/input_items?{query}", timeout=60)
        assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == param
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r.id)
    # Text parts of any accepted type come back as the API's; the SDK's pages, followed to the end.
    parts = client.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"type": "message", "role": "user", "content": [{"type": "text", "text": "t"}], "status": "bogus"},
        *({"role": "user", "content": str(i)} for i in range(4))])
    listed = list(client.responses.input_items.list(parts.id, limit=2, order="asc"))
    assert [(type(i).__name__, i.content[0].type, i.content[0].text, i.status) for i in listed] == \
        [("ResponseInputMessageItem", "input_text", text, "completed") for text in ("t", "0", "1", "2", "3")]


def test_an_assistant_refusal_part_is_its_text_in_the_input(client, server):
    """A refusal part of an assistant message (a response's output sent back as input) is
    read as its text, as OpenAI takes it; input_items lists it as the refusal part it was."""
    said = "I can't help with that."

    def ask(content):
        return client.responses.create(model=MODEL, temperature=0, max_output_tokens=4, input=[
            {"role": "user", "content": "Hi"}, {"type": "message", "role": "assistant", "content": content},
            {"role": "user", "content": "ok"}])

    plain, refused = ask(said), ask([{"type": "refusal", "refusal": said}])
    assert refused.usage.input_tokens == plain.usage.input_tokens and refused.output_text == plain.output_text
    with urllib.request.urlopen(f"{server.base}/v1/responses/{refused.id}/input_items?order=asc", timeout=60) as r:
        items = json.loads(r.read())["data"]
    assert items[1]["content"] == [{"type": "refusal", "refusal": said}]


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="y", previous_response_id=r.id, max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"


def test_reasoning_text_and_a_call_as_items_and_events(scripted):
    """A thinking model's answer with text and a call: three items, each opened empty (content
    arrives through its own events), reasoning tokens counted; resending the output items
    gives the prompt that continuing by previous_response_id gives, system messages of the
    input included."""
    client = openai.OpenAI(base_url=scripted.base + "/v1", api_key="x", max_retries=0)
    body = {"model": MODEL, "input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            "tools": [WEATHER]}
    r = client.responses.create(**body)
    assert [item.type for item in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].content[0].text == "\nCheck the weather.\n" and r.output_text == "Let me look."
    assert r.output[2].name == "get_weather" and json.loads(r.output[2].arguments) == {"city": "Paris"}
    assert 0 < r.usage.output_tokens_details.reasoning_tokens <= r.usage.output_tokens
    events = raw_events(scripted, body)
    opened = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [i["type"] for i in opened] == ["reasoning", "message", "function_call"]
    assert opened[0]["content"] == [] and opened[1]["content"] == [] and opened[2]["arguments"] == ""
    assert all("logprobs" in e for e in events if e["type"].startswith("response.output_text."))
    with client.responses.stream(**body) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
    assert snapshots[-1] == "Let me look."  # (the SDK's helper adds the deltas to what the added item held)
    answer = {"type": "function_call_output", "call_id": r.output[2].call_id, "output": "sunny"}
    chained = client.responses.create(model=MODEL, previous_response_id=r.id, input=[answer], tools=[WEATHER])
    resent = client.responses.create(model=MODEL, input=[*body["input"], *[i.model_dump() for i in r.output], answer],
                                     tools=[WEATHER])
    assert chained.usage.input_tokens == resent.usage.input_tokens


def test_a_response_cut_inside_a_call_can_be_continued(client):
    """Cut by max_output_tokens inside a call's arguments: the call is "incomplete" and left
    out of the stored conversation, which a next request continues. Cut before the call's
    name is whole, the answer has no item (it had a message of the call's markup)."""
    for cut_at, items in ((12, []), (36, ["function_call"])):
        first = client.responses.create(model=MODEL, input="Time?", tools=[CLOCK], tool_choice="required",
                                        max_output_tokens=cut_at)
        assert first.status == "incomplete" and [o.type for o in first.output] == items
        assert all(o.status == "incomplete" for o in first.output)
        again = client.responses.create(model=MODEL, previous_response_id=first.id, input="again",
                                        max_output_tokens=2)
        assert again.status == "incomplete" and again.usage.output_tokens == 2


def test_errors_in_a_stream_end_it_with_an_error_event(server):
    spelled = {"type": "function", "name": "run", "parameters": {
        "type": "object", "properties": {"code": {"const": "</tool_call>"}}, "required": ["code"]}}
    events = raw_events(server, {"model": MODEL, "input": "x", "tools": [spelled], "tool_choice": "required",
                                 "max_output_tokens": 40, "temperature": 0})
    assert events[-1]["type"] == "error" and events[-1]["param"] == "tools"
    assert events[-1]["message"].startswith("the answer could not go on as calls of its tools")


def test_request_fields_are_echoed(client):
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=2, user="bob", metadata={"k": "v"},
                                text={"verbosity": "low"})
    assert r.user == "bob" and r.metadata == {"k": "v"} and r.text.format.type == "text"
    assert r.truncation == "disabled" and (r.reasoning.effort, r.reasoning.summary) == (None, None)  # (OpenAI's defaults)
    r = client.responses.create(model=MODEL, input="x", max_output_tokens=2, truncation="auto",
                                reasoning={"effort": "low", "summary": "concise"})
    assert r.truncation == "auto" and (r.reasoning.effort, r.reasoning.summary) == ("low", "concise")
    most = {f"{i:064d}": "v" * 512 for i in range(16)}  # (OpenAI's limits, reached)
    assert client.responses.create(model=MODEL, input="x", max_output_tokens=2, metadata=most).metadata == most


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "metadata": "m"}, "metadata"),
    ({"input": "x", "metadata": {"a": 5}}, "metadata"),
    ({"input": "x", "metadata": {"a": None}}, "metadata"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "x", "text": "hello"}, "text"),
    ({"input": "x", "user": 5}, "user"),
    ({"input": "x", "top_logprobs": 30}, "top_logprobs"),
    ({"input": "x", "top_logprobs": False}, "top_logprobs"),
    ({"input": "x", "top_logprobs": 30, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
    ({"input": "x", "truncation": "yes"}, "truncation"),
    ({"input": "x", "reasoning": "low"}, "reasoning"),
    ({"input": "x", "reasoning": {"effort": 5}}, "reasoning.effort"),
    ({"input": [{"role": "user", "content": "a", "id": "m"}, {"role": "user", "content": "b", "id": "m"}]}, "input"),
    ({"input": [{"role": "user", "content": "a", "id": 5}]}, "input"),
    ({"input": "x", "include": "message.output_text.logprobs"}, "include"),
    ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools"),
    ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input"),
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 10**6}, "input"),  # (context_length_exceeded, as chat names messages)
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "x", "instructions": 5}, "instructions"),
    ({"input": "x", "temperature": 2.01}, "temperature"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "background": "yes"}, "background"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param):
    req = urllib.request.Request(server.base + "/v1/responses", data=json.dumps({"model": MODEL, **body}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    answer = json.loads(err.value.read())
    assert err.value.code == 400 and answer["error"]["param"] == param, answer
    message = answer["error"]["message"]
    assert "max_tokens" not in message and "'function': {" not in message and "response_format" not in message


def test_a_function_call_output_must_follow_the_calls_it_answers(server, client):
    """An output with a message between it and its call (which a chat template would render
    as a result of no call) is refused naming the input item; outputs side by side are fine."""
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c", "output": "x"}
    req = urllib.request.Request(server.base + "/v1/responses", data=json.dumps({"model": MODEL, "input": [
        call, {"role": "user", "content": "and?"}, output]}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    answer = json.loads(err.value.read())
    assert err.value.code == 400 and answer["error"]["param"] == "input", answer
    assert answer["error"]["message"].startswith("input[2]: a function_call_output must follow the function_call")
    r = client.responses.create(model=MODEL, input=[call, {**call, "call_id": "d"}, output,
                                                           {**output, "call_id": "d"}], max_output_tokens=2)
    assert r.status in ("completed", "incomplete")  # (2 tokens: cut short, or done)


def test_a_function_call_in_the_input_needs_its_output(server, client):
    """As OpenAI: a function_call item with no function_call_output for it (the template would
    show the model a call that never returned) is a 400 naming the call and its item."""
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    answered = {"type": "function_call_output", "call_id": "d", "output": "x"}
    for given, index in (([call], 1), ([{**call, "call_id": "d"}, call, answered], 2)):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}, *given])
        assert err.value.body["param"] == "input"
        assert err.value.body["message"].startswith(f'No tool output found for function call "c" (input[{index}])')


# ---- background responses ------------------------------------------------------------------------
PIECES = ["Hello", " wor", "ld", "!"]


@pytest.fixture
def gated(tiny_model_dir):
    """A server whose answers are PIECES, each given only when the test lets it through;
    (the server, its engine, an SDK client)."""
    engine = GatedEngine(load_model(str(tiny_model_dir("qwen3", "float32")), progress=False), PIECES)
    live = LiveServer(create_app(engine, MODEL))
    yield live, engine, openai.OpenAI(base_url=live.base + "/v1", api_key="x", max_retries=0)
    engine.close()
    live.stop()


class EventStream:
    """A streamed answer's SSE events, read one at a time as they come."""

    def __init__(self, server, path: str, body: dict | None = None):
        self.connection = http.client.HTTPConnection(urllib.parse.urlsplit(server.base).netloc, timeout=60)
        self.connection.request("POST" if body else "GET", path, body=json.dumps(body) if body else None,
                                headers={"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()

    def next(self) -> dict | None:
        """The next event; None once the stream has ended."""
        line = self.response.readline().decode()
        if not line:
            return None
        kind, data, blank = line, self.response.readline().decode(), self.response.readline().decode()
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}\n" and blank == "\n"
        return event

    def until(self, ends) -> list[dict]:
        """The events up to the first for which `ends` is true."""
        events = [self.next()]
        while not ends(events[-1]):
            events.append(self.next())
        return events

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.connection.close()


def delta(text):
    return lambda event: event["type"] == "response.output_text.delta" and event["delta"] == text


def test_a_background_response_is_polled_followed_and_resumed(gated):
    server, engine, client = gated
    r = client.responses.create(model=MODEL, input="Hi", background=True)
    assert r.status == "queued" and r.background and r.output == []
    follower = EventStream(server, f"/v1/responses/{r.id}?stream=true")
    engine.let_through(2)
    seen = follower.until(delta(" wor"))
    now = client.responses.retrieve(r.id)  # in flight: the output so far
    assert now.status == "in_progress" and now.output[0].content[0].text == "Hello wor"
    with pytest.raises(openai.BadRequestError) as err:  # not to be continued yet
        client.responses.create(model=MODEL, input="go on", previous_response_id=r.id)
    assert "is in progress" in err.value.body["message"]
    follower.close()  # gone: the answer goes on
    engine.let_through(2)
    rest = EventStream(server, f"/v1/responses/{r.id}?stream=true&starting_after={seen[-1]['sequence_number']}").rest()
    events = seen + rest
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "queued" and events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello world!"
    stored = json.loads(urllib.request.urlopen(f"{server.base}/v1/responses/{r.id}", timeout=60).read())
    assert stored == events[-1]["response"] and stored["status"] == "completed" and stored["background"] is True
    # The SDK's resumed stream, from a sequence number on; the whole answer again from the start.
    resumed = list(client.responses.retrieve(r.id, stream=True, starting_after=len(events) - 3))
    assert [e.type for e in resumed] == [e["type"] for e in events[-2:]]
    assert EventStream(server, f"/v1/responses/{r.id}?stream=true").rest() == events
    assert not engine.streams[-1].cancelled


def test_a_background_stream_runs_on_after_its_client_goes_away(gated):
    server, engine, client = gated
    first = EventStream(server, "/v1/responses", {"model": MODEL, "input": "Hi", "stream": True, "background": True})
    engine.let_through(1)
    seen = first.until(delta("Hello"))
    first.close()
    engine.let_through(3)
    rid = seen[0]["response"]["id"]
    rest = EventStream(server, f"/v1/responses/{rid}?stream=true&starting_after={seen[-1]['sequence_number']}").rest()
    assert rest[-1]["type"] == "response.completed" and rest[-1]["response"]["output"][0]["content"][0]["text"] == \
        "Hello world!"
    assert [e["sequence_number"] for e in seen + rest] == list(range(len(seen + rest)))
    assert not engine.streams[-1].cancelled


def test_cancelling_a_background_response(gated):
    server, engine, client = gated
    r = client.responses.create(model=MODEL, input="Hi", background=True)
    follower = EventStream(server, f"/v1/responses/{r.id}?stream=true")
    engine.let_through(1)
    follower.until(delta("Hello"))
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.output[0].content[0].text == "Hello"
    assert engine.streams[-1].cancelled  # the engine stops generating it
    assert follower.rest() == []  # a follower's stream ends
    assert client.responses.retrieve(r.id).status == "cancelled"
    assert client.responses.cancel(r.id).status == "cancelled"  # (again: as it ended)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="go on", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id" and "is cancelled" in err.value.body["message"]
    # Deleting one in flight cancels it too.
    second = client.responses.create(model=MODEL, input="Hi", background=True)
    client.responses.delete(second.id)
    assert engine.streams[-1].cancelled
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_a_background_response_of_the_engine_can_be_continued(client, server):
    """With the real engine: the response followed to its end is stored and continued like
    any other, and its input items listed."""
    r = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0, background=True)
    events = list(client.responses.retrieve(r.id, stream=True))
    done = client.responses.retrieve(r.id)
    assert events[-1].type == "response.incomplete" and done.status == "incomplete" and done.usage.output_tokens == 6
    whole = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0)
    assert done.output_text == whole.output_text
    assert [i.content[0].text for i in client.responses.input_items.list(r.id).data] == ["Hello there"]
    after = client.responses.create(model=MODEL, input="More", previous_response_id=r.id, max_output_tokens=2)
    assert after.status == "incomplete"
    with pytest.raises(openai.BadRequestError) as err:  # only a background response can be cancelled...
        client.responses.cancel(whole.id)
    assert "background" in err.value.body["message"]
    for query, param in [("stream=true", "stream"), ("stream=yes", "stream"), ("starting_after=1", "starting_after")]:
        with pytest.raises(urllib.error.HTTPError) as err:  # ...or streamed again
            urllib.request.urlopen(f"{server.base}/v1/responses/{whole.id}?{query}", timeout=60)
        assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == param
    for query in ("stream=true&starting_after=-1", "stream=true&starting_after=x", f"stream=true&starting_after={len(events)}"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.base}/v1/responses/{r.id}?{query}", timeout=60)
        assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "starting_after"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


def test_only_the_last_ended_background_responses_keep_their_events(client, server, monkeypatch):
    monkeypatch.setattr(responses_api, "EVENTS_KEPT", 1)
    first, second = (client.responses.create(model=MODEL, input=text, max_output_tokens=3, background=True)
                     for text in ("one", "two"))
    for r in (first, second):
        assert list(client.responses.retrieve(r.id, stream=True))[-1].type == "response.incomplete"
    assert [e.sequence_number for e in client.responses.retrieve(second.id, stream=True)][0] == 0
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server.base}/v1/responses/{first.id}?stream=true", timeout=60)
    answer = json.loads(err.value.read())["error"]
    assert err.value.code == 400 and answer["param"] == "stream" and "no longer kept" in answer["message"]
    assert client.responses.retrieve(first.id).status == "incomplete"  # (the response itself stays)


def test_a_response_with_a_call_the_model_got_wrong_can_be_continued(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    broken = ["<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Par', "\n</tool_call>"]
    live = LiveServer(create_app(ScriptedEngine(loaded, broken), MODEL))
    try:
        client = openai.OpenAI(base_url=live.base + "/v1", api_key="x", max_retries=0)
        r = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER])
        (call,) = [item for item in r.output if item.type == "function_call"]
        assert call.arguments == '{"city": "Par\n'  # as the model wrote it
        after = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        assert after.status == "completed"
    finally:
        live.stop()


def test_a_continuation_answers_every_call_of_the_previous_response(tiny_model_dir):
    """As OpenAI: continuing a response that made two calls with the output of one, or with
    a message alone, is a 400 naming the call left without its output."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    two = [f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
           for city in ("Paris", "Rome")]
    live = LiveServer(create_app(ScriptedEngine(loaded, two), MODEL))
    try:
        client = openai.OpenAI(base_url=live.base + "/v1", api_key="x", max_retries=0)
        r = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER])
        first, second = [item.call_id for item in r.output if item.type == "function_call"]
        output = {"type": "function_call_output", "call_id": first, "output": "sunny"}
        for given, missing in (([output], second), ([{"role": "user", "content": "and?"}], first)):
            with pytest.raises(openai.BadRequestError) as err:
                client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], input=given)
            assert err.value.body["param"] == "input" and err.value.body["type"] == "invalid_request_error"
            assert err.value.body["message"].startswith(f"No tool output found for function call {missing}:")
        both = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER],
                                       input=[output, {**output, "call_id": second}])
        assert both.status == "completed"
    finally:
        live.stop()


@pytest.mark.parametrize("body,words", [
    ({"input": [{"type": "reasoning", "summary": []}]}, "'input' holds no message"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}],
      "tool_choice": "required"}, "tools[0].parameters must describe an object"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": 5}]}]},
     "input[0].content[1].text must be a string, got 5"),
    ({"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
     'input[0].content[0]: only text content parts are supported, got type "refusal"'),
    ({"input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": 1}]}]},
     "input[0].content[0].refusal must be a string"),
    # Shapes it asks for as JSON writes them (the client wrote JSON), not as Python does.
    ({"input": "x", "include": "all"}, 'such as ["message.output_text.logprobs"]'),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function"}}, '{"type": "function", "name": …}'),
    ({"input": "x", "tools": [{"type": "function"}]}, '{"type": "function", "name": …, "parameters": {…}}'),
    ({"input": "x", "text": {"format": "json"}}, 'such as {"type": "json_object"}'),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, '{"type": "json_schema", "name": …, "schema": {…}}'),
])
def test_errors_name_the_fields_as_this_api_has_them(server, body, words):
    req = urllib.request.Request(server.base + "/v1/responses", data=json.dumps({"model": MODEL, **body}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    message = json.loads(err.value.read())["error"]["message"]
    assert words in message and "messages" not in message and ".function." not in message, message
    assert "['" not in message and "{'" not in message, message
