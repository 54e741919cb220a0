"""`mlxserve serve`: a thin Starlette app over the engine, speaking OpenAI's HTTP API.

Routes only translate: `openai_api` turns the wire JSON into prompt ids + SamplingParams and
events back into JSON; the engine does the rest. Every error is answered in OpenAI's shape and
never stops the server; a client that goes away has its request cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import uuid
from collections.abc import Callable, Collection

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api as wire
from . import responses_api
from .background import BackgroundResponse
from .chat_output import Parsed, merge_parts, parser_for
from .engine import ENGINE_STOPPED, SHUTTING_DOWN, Engine, EngineStopped
from .grammar import ANSWER_REFUSED
from .metrics import Metrics
from .sampling import SamplingParams
from .scheduler import Request, ServerBusy

MAX_BODY_BYTES = 4 * 1024 * 1024  # requests larger than this get 413
# What a 400 says when a grammar of tool calls refused a token it had allowed (see grammar.py's
# Constraint.consume): the start of the engine's ANSWER_REFUSED message, for a tools request
# ({field}: "tools", or "functions" for a request that gave them in that deprecated form).
TOOLS_REFUSED = "the answer could not go on as calls of its {field}"

log = logging.getLogger("mlxserve.server")


def create_app(engine: Engine, served_model: str, *, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               other_model_names: Collection[str] = ()) -> Starlette:
    """`served_model`: the model's id; `other_model_names`: other names requests may give it
    (see registry.served_names), answered as that id."""
    loaded = engine.loaded
    tokenizer = loaded.tokenizer
    metrics = Metrics()

    def error(exc: wire.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_body(request: HTTPRequest) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise wire.APIError(413, f"request body larger than {max_body_bytes} bytes")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise wire.APIError(413, f"request body larger than {max_body_bytes} bytes")
        return body

    def parse(body: bytes, kind: str) -> wire.Completion:
        """The request in a body: JSON, then chat template and tokenization. Runs in a worker
        thread, so that the event loop (every other stream) goes on while a body of megabytes
        is read."""
        return wire.parse_request(read_json(body), kind, tokenizer, loaded.context_length, served_model,
                                  engine.grammars)

    def read_json(body: bytes) -> object:
        try:
            parsed = json.loads(body)
        except UnicodeDecodeError as exc:
            # (Text in another encoding, Latin-1's "é" say: its JSON may be fine, so "not valid
            # JSON" would send the client looking for a syntax error.)
            if exc.encoding != "utf-8":  # (json reads a body that starts as UTF-16 or -32 as such)
                raise wire.APIError(400, "request body is not valid JSON") from None
            raise wire.APIError(400, f"request body is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                                     f"{exc.start}): JSON must be sent as UTF-8") from None
        except (ValueError, RecursionError):
            # ValueError: bad JSON or bad UTF-8, or an integer of more digits than Python converts
            # (4300); RecursionError: arrays or objects nested deeper than the parser goes.
            raise wire.APIError(400, "request body is not valid JSON") from None
        try:
            # JSON lets a string hold half of a UTF-16 pair ("\ud800"), which is no text at all.
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise wire.APIError(400, "request body holds a lone UTF-16 surrogate (e.g. \\ud800), which is "
                                     "not valid Unicode text") from None
        return _named_as_served(parsed, served_model, other_model_names)

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise wire.APIError(401, "invalid or missing API key", type="authentication_error",
                                code="invalid_api_key")

    def key_refusal(request: HTTPRequest) -> JSONResponse | None:
        """The 401 answer for a request without the right API key, or None."""
        try:
            check_key(request)
        except wire.APIError as exc:
            return error(exc)
        return None

    async def read_request(request: HTTPRequest, parse_body: Callable[[bytes], object]) -> tuple:
        """(the request parsed, None), or (None, the answer to give instead): the API key is
        checked, the body read and handed to `parse_body` in a worker thread (so that the
        event loop, every other stream, goes on meanwhile), and their errors answered."""
        try:
            check_key(request)
            body = await read_body(request)
            return await run_in_threadpool(parse_body, body), None
        except wire.APIError as exc:
            return None, error(exc)
        except ClientDisconnect:  # the client went away before it had sent its whole body
            return None, Response(status_code=499)
        except Exception:
            return None, internal_error()  # a bug: answered in OpenAI's shape, the server goes on

    async def completions(request: HTTPRequest, kind: str):
        c, answer = await read_request(request, lambda body: parse(body, kind))
        if answer is not None:
            return answer
        limit = engine.config.request_limit
        if len(c.prompts) > limit:  # (it could never be admitted whole: not a 429 to retry)
            return error(wire.APIError(400, f"this request asks for {len(c.prompts)} answers (prompts × n); this "
                                            f"server holds at most {limit} requests at once",
                                       param="n" if c.n > 1 else "prompt"))
        streams = []
        try:
            loop = asyncio.get_running_loop()
            scoring = c.params.top_logprobs if c.echo and c.params.logprobs else None
            for index, prompt in enumerate(c.prompts):
                # Metrics are counted as the engine ends each request, read to its end or not.
                streams.append(engine.submit(Request(prompt, c.choice_params(index), prompt_logprobs=scoring,
                                                     score_only=c.score_only), loop, on_finish=metrics.record))
        except Exception as exc:  # a multi-prompt request is refused whole
            exc = given_up(exc, streams, f"{len(c.prompts)} answers (prompts × n)")
            return refused(exc, "messages" if kind == "chat" else "prompt")
        if c.stream:
            return StreamingResponse(_stream(c, streams, tokenizer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await whole_answer(request, _collect(c, streams, tokenizer), streams)

    def given_up(exc: Exception, streams: list, what: str) -> Exception:
        """`exc`, raised submitting one of a request's several answers (`what`: how many and
        of what), once the ones submitted before it are cancelled. A ServerBusy then counts
        the requests in progress without them (the engine's count held them)."""
        for stream in streams:
            stream.cancel()
        if not (isinstance(exc, ServerBusy) and streams):
            return exc
        limit = engine.config.request_limit
        return ServerBusy(f"server busy: {engine.stats()['requests_in_progress']} requests in progress, and this "
                          f"request's {what} need a place each (limit {limit})")

    def refused(exc: Exception, param: str) -> JSONResponse:
        """The answer to a request the engine would not take. Only the engine's own refusals
        are the client's or the server's state; anything else raised at submit is a bug."""
        if isinstance(exc, ServerBusy):
            return error(wire.APIError(429, str(exc), type="rate_limit_error", code="server_busy"))
        if isinstance(exc, ValueError):  # the prompt cannot fit the engine's KV budget
            return error(wire.APIError(400, str(exc), param=param))
        if isinstance(exc, EngineStopped):  # (alive may still be true while the loop ends)
            return error(wire.APIError(503, str(exc), type="server_error"))
        return internal_error()

    async def whole_answer(request: HTTPRequest, collecting, streams) -> Response:
        """The JSON that `collecting` makes of the streams, unless the client goes away first
        (then nobody will read the answer, so its requests are stopped)."""
        collect = asyncio.ensure_future(collecting)
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                return Response(status_code=499)
            result = collect.result()
            return result if isinstance(result, Response) else JSONResponse(result)
        except wire.APIError as exc:
            return error(exc)
        except Exception:
            return internal_error()
        finally:
            gone.cancel()
            for s in streams:
                s.cancel()
            if not collect.done():
                collect.cancel()

    async def embeddings(request: HTTPRequest):
        limit = engine.config.request_limit
        e, answer = await read_request(request, lambda body: wire.parse_embeddings(
            read_json(body), tokenizer, loaded.context_length, served_model, loaded.model.args.hidden_size, limit))
        if answer is not None:
            return answer
        streams = []
        try:
            loop = asyncio.get_running_loop()
            for ids in e.inputs:
                streams.append(engine.submit(Request(ids, SamplingParams(max_tokens=1), embed=True), loop,
                                             on_finish=metrics.record))
        except Exception as exc:
            exc = given_up(exc, streams, f"{len(e.inputs)} inputs")
            if isinstance(exc, ValueError):
                exc = ValueError(f"input {len(streams)}: {exc}")
            return refused(exc, "input")
        return await whole_answer(request, _collect_embeddings(e, streams), streams)

    response_store = responses_api.ResponseStore()

    async def responses(request: HTTPRequest):
        """OpenAI's Responses API (responses_api.py): one answer, streamed as typed events or whole."""
        r, answer = await read_request(request, lambda body: responses_api.parse(
            read_json(body), tokenizer, loaded.context_length, served_model, engine.grammars, response_store))
        if answer is not None:
            return answer
        c = r.completion
        try:
            stream = engine.submit(Request(c.prompts[0], c.params), asyncio.get_running_loop(), on_finish=metrics.record)
        except Exception as exc:
            return refused(exc, "input")
        cache_block = engine.config.block_size if engine.config.prefix_cache else None
        builder = responses_api.ResponseBuilder(r, c.model)
        if r.background:
            run = start_background(r, builder, stream, cache_block)
            if c.stream:  # (going away stops nothing: GET ...?stream=true picks the events up again)
                return sse_response(_response_sse(run.follow()))
            return JSONResponse(run.response)
        events = _response_events(r, builder, stream, tokenizer, response_store if r.store else None, cache_block)
        if c.stream:
            return sse_response(_response_sse(events, stream))
        return await whole_answer(request, _last_response(events), [stream])

    def start_background(r: responses_api.ResponseRequest, builder, stream, cache_block) -> BackgroundResponse:
        """A background response, stored from its start (background.py)."""
        def ended(run: BackgroundResponse) -> None:
            final = run.final
            continued = final["status"] in ("completed", "incomplete")
            conversation = responses_api.conversation_after(r, final["output"]) if continued else None
            response_store.update(responses_api.StoredResponse(final, conversation, r.input_items, run))

        run = BackgroundResponse(builder, stream, ended)
        response_store.put(responses_api.StoredResponse(run.response, None, r.input_items, run))
        run.start(_response_events(r, builder, stream, tokenizer, None, cache_block))
        return run

    def find_stored(request: HTTPRequest) -> tuple[responses_api.StoredResponse | None, Response | None]:
        """(the stored response that the path names, None), or (None, the answer instead: a
        401 without the right API key, a 404 for an id not stored)."""
        if (refusal := key_refusal(request)) is not None:
            return None, refusal
        response_id = request.path_params["response_id"]
        found = response_store.get(response_id)
        return (found, None) if found is not None else (None, error(_no_stored_response(response_id)))

    async def stored_response(request: HTTPRequest):
        """GET /v1/responses/{id}: a stored response (with ?stream=true, a background one's
        events after ?starting_after=N, then live); DELETE: forget it (a background one
        still running is cancelled)."""
        found, answer = find_stored(request)
        if answer is not None:
            return answer
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            if found.run is not None:
                await found.run.cancel()
            response_store.delete(response_id)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        try:
            streamed, after = _stream_query(request.query_params)
        except wire.APIError as exc:
            return error(exc)
        if not streamed:
            return JSONResponse(found.current)
        if found.run is None:
            return error(wire.APIError(400, "only a background response can be streamed again (this one was "
                                            "created without background: true)", param="stream"))
        if found.run.events is None:
            return error(wire.APIError(400, f"the events of response '{response_id[:80]}' are no longer kept (only "
                                            f"those of the last {responses_api.EVENTS_KEPT} background responses "
                                            f"that have ended are): GET it without stream", param="stream"))
        if after >= len(found.run.events) and found.run.done:
            return error(wire.APIError(400, f"starting_after: the response's last event is number "
                                            f"{len(found.run.events) - 1}", param="starting_after"))
        return sse_response(_response_sse(found.run.follow(after)))

    async def cancel_response(request: HTTPRequest):
        """POST /v1/responses/{id}/cancel: stop a background response; it comes back as it ended."""
        found, answer = find_stored(request)
        if answer is not None:
            return answer
        if found.run is None:
            return error(wire.APIError(400, "only a background response can be cancelled (this one was created "
                                            "without background: true)", param="response_id"))
        return JSONResponse(await found.run.cancel())

    async def stored_input_items(request: HTTPRequest):
        """GET /v1/responses/{id}/input_items: the input items of a stored response, a page at a time."""
        found, answer = find_stored(request)
        if answer is not None:
            return answer
        try:
            return JSONResponse(responses_api.input_items_page(found.input_items, request.query_params))
        except wire.APIError as exc:
            return error(exc)

    def internal_error() -> JSONResponse:
        log.exception("request failed")
        return error(wire.APIError(500, "internal server error (the server log has the details)",
                                   type="server_error"))

    async def chat(request: HTTPRequest):
        return await completions(request, "chat")

    async def text(request: HTTPRequest):
        return await completions(request, "text")

    model_json = {"id": served_model, "object": "model", "created": 0, "owned_by": "mlxserve",
                  "context_length": loaded.context_length}

    async def models(request: HTTPRequest):
        if (refusal := key_refusal(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [model_json]})

    async def model(request: HTTPRequest):
        """OpenAI's "retrieve model": the served model, or 404 for any other id."""
        if (refusal := key_refusal(request)) is not None:
            return refusal
        name = request.path_params["model"]
        if name != served_model and name not in other_model_names:
            return error(wire.model_not_found(name, served_model))
        return JSONResponse(model_json)

    async def health(request: HTTPRequest):
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    async def stats(request: HTTPRequest):
        if (refusal := key_refusal(request)) is not None:
            return refusal
        return JSONResponse(engine.stats())

    async def prometheus(request: HTTPRequest):
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    async def http_error(request: HTTPRequest, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return error(wire.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))

    async def unexpected_error(request: HTTPRequest, exc: Exception):
        # Outside the completion routes (which answer their own): still OpenAI's shape.
        return error(wire.APIError(500, "internal server error", type="server_error"))

    middleware = [Middleware(_RequestId)]
    if cors_origins:
        middleware.append(Middleware(_CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                                     allow_headers=["*"]))
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", text, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"]),
            Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
            Route("/v1/responses/{response_id}/input_items", stored_input_items, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),  # a model id may hold a "/"
            Route("/v1/stats", stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
    )


class _RequestId:
    """Every HTTP answer with an `x-request-id` header, as OpenAI's API answers (the openai
    SDK's `_request_id` and `with_raw_response` read it): pure ASGI, so streams pass through
    as they are."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = ("req_" + uuid.uuid4().hex).encode("ascii")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (its 400 says "Disallowed CORS origin", in
    plain text) answered in OpenAI's error shape, as every other error of this server is:
    the same status and headers, only the body JSON."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        # (its own Content-Length and Content-Type are the text's: the JSON response sets its own)
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("content-length", "content-type")}
        refusal = wire.APIError(response.status_code, bytes(response.body).decode())
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=headers)


def _named_as_served(body: object, served_model: str, other_names: Collection[str]) -> object:
    """A request body whose `model` is one of the model's other names (the path of the .gguf
    file it was served as before) with the model's id in its place: the one place where every
    body passes, so that each endpoint takes it as its own model and answers with the id."""
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] in other_names:
        body["model"] = served_model
    return body


async def _until_disconnected(request: HTTPRequest) -> None:
    """Returns once the client has gone away. The body has been read, so the next ASGI
    message is the disconnect (uvicorn also sends it once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(message: str | None, c: wire.Completion | None = None) -> wire.APIError:
    """What to answer for a request (`c`, for a completion) the engine ended with an error."""
    message = message or "generation failed"
    if message in (SHUTTING_DOWN, ENGINE_STOPPED):  # (the server cannot answer anything now, as /health says)
        return wire.APIError(503, message, type="server_error")
    if message.startswith(ANSWER_REFUSED):  # its own grammar's doing
        if c is not None and c.calls_constrained:  # the grammar of its tools' calls
            field = wire.tools_param(c.legacy_functions)  # (the field as the client sent it)
            return wire.APIError(400, TOOLS_REFUSED.format(field=field) + message[len(ANSWER_REFUSED):], param=field)
        return wire.APIError(400, message, param="response_format")
    if message.startswith("server busy"):
        return wire.APIError(429, message, type="rate_limit_error")
    return wire.APIError(500, message, type="server_error")


async def _collect(c: wire.Completion, streams, tokenizer) -> dict:
    """The whole answer. Choices are read side by side: the first error ends the request at
    once (the caller cancels the other choices)."""
    tasks = [asyncio.ensure_future(_collect_choice(c, index, stream, tokenizer)) for index, stream in enumerate(streams)]
    try:
        done = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    choices = [choice for choice, _ in done]
    finals = [final for _, final in done]
    firsts = [final for index, final in enumerate(finals) if c.counts_prompt(index)]
    reasoning = sum(wire.reasoning_tokens(tokenizer, choice.get("message", {}).get("reasoning_content", ""),
                                          final.completion_tokens) for choice, final in done)
    return wire.response(c, wire.new_id(c.kind), choices, wire.usage(
        sum(f.prompt_tokens for f in firsts), sum(f.completion_tokens for f in finals),
        sum(f.cached_tokens for f in firsts), reasoning))


async def _collect_choice(c: wire.Completion, index: int, stream, tokenizer) -> tuple[dict, object]:
    """(choice JSON, final event) of one choice; raises the error it ended with."""
    text, logprobs, final = [], [], None
    answer = wire.AnswerLogprobs(tokenizer, c.params)
    async for event in stream:
        text.append(event.text)
        if c.params.logprobs:
            logprobs.extend(answer.feed(event))
        if event.finish_reason:
            final = event
    if final.finish_reason == "error":
        raise _engine_error(final.error, c)
    lp = None
    if c.params.logprobs and c.kind == "chat":
        lp = wire.logprobs_json(c.kind, logprobs, tokenizer)
    elif c.params.logprobs:
        # (Offsets into prompt + answer, echoed or not, as OpenAI's: the first is the prompt's length.)
        start = len(tokenizer.decode(stream.request.prompt_ids))
        lp = wire.logprobs_json(c.kind, logprobs, tokenizer,
                                wire.TextOffsets(tokenizer, start).take([e.token_id for e in logprobs]))
    if c.kind == "chat":
        parser = parser_for(tokenizer, tools_enabled=c.tools_enabled, calls_constrained=c.calls_constrained,
                            calls_only=c.calls_only)
        parsed = _merge(parser.feed("".join(text)), parser.flush())
        # (Calls only: an answer cut before its first call was read is no text either.)
        content = parsed.content or (None if parsed.tool_calls or c.calls_only else "")
        message = {"role": "assistant", "content": content}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [_tool_call_json(call) for call in parsed.tool_calls]
        reason = parser.finish_reason(final.finish_reason)
        if c.legacy_functions:
            message, reason = _legacy_message(message), _legacy_reason(reason)
        return {"index": index, "message": message, "logprobs": lp, "finish_reason": reason}, final
    body = "".join(text)
    if c.echo:
        prompt = stream.request.prompt_ids
        body = tokenizer.decode(prompt) + body
        if c.params.logprobs:
            lp = wire.echoed_logprobs(prompt, final.prompt_logprobs, logprobs, tokenizer, lp["text_offset"])
    return {"index": index, "text": body, "logprobs": lp, "finish_reason": final.finish_reason}, final


async def _collect_embeddings(e: wire.Embeddings, streams) -> JSONResponse:
    """The inputs' embeddings, read side by side (the first error ends the request). The
    answer is made in a worker thread: hundreds of long vectors take the event loop (every
    stream) a second or more to write."""

    async def final(stream):
        async for event in stream:
            if event.finish_reason:
                if event.finish_reason == "error" or event.embedding is None:
                    raise _engine_error(event.error)
                return event

    tasks = [asyncio.ensure_future(final(stream)) for stream in streams]
    try:
        finals = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()

    def answer() -> JSONResponse:
        vectors = [wire.embedding_json(f.embedding, e, index) for index, f in enumerate(finals)]
        return JSONResponse(wire.embeddings_response(e, vectors, sum(f.prompt_tokens for f in finals)))

    return await run_in_threadpool(answer)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _no_stored_response(response_id: str) -> wire.APIError:
    return wire.APIError(404, f"no stored response '{response_id[:80]}'", param="response_id",
                         code="response_not_found")


def sse_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream_query(query) -> tuple[bool, int]:
    """GET /v1/responses/{id}'s `stream` (true or false) and `starting_after` (a sequence
    number; -1 when not given: from the first event)."""
    stream = query.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise wire.APIError(400, f"stream must be true or false, got '{stream[:20]}'", param="stream")
    after = query.get("starting_after")
    if after is None:
        return stream == "true", -1
    if not (after.isascii() and after.isdigit() and len(after) <= 9):
        raise wire.APIError(400, f"starting_after must be an event's sequence number, got '{after[:20]}'",
                            param="starting_after")
    if stream != "true":
        raise wire.APIError(400, "starting_after needs stream=true", param="starting_after")
    return True, int(after)


async def _response_events(r: responses_api.ResponseRequest, builder, stream, tokenizer, store,
                           cache_block: int | None):
    """The Responses API events of one answer (built by `builder`, a
    responses_api.ResponseBuilder), the last carrying the final response, which is put in
    `store` (None: kept nowhere). An answer the engine ended with an error raises it (an
    APIError)."""
    c = r.completion
    for event in builder.start():
        yield event
    parser = parser_for(tokenizer, tools_enabled=c.tools_enabled, incremental=True,
                        calls_constrained=c.calls_constrained, calls_only=c.calls_only)
    answer, waiting = wire.AnswerLogprobs(tokenizer, c.params), []  # (see _message_logprobs)
    async for step in stream:
        if step.finish_reason == "error":
            raise responses_api.in_responses_terms(_engine_error(step.error, c))
        if c.params.logprobs:
            waiting += answer.feed(step)
        parsed = parser.feed(step.text)
        if step.finish_reason:
            parsed = _merge(parsed, parser.flush())
        logprobs, waiting = _message_logprobs(parsed, waiting, tokenizer)
        for event in builder.add(parsed, logprobs):
            yield event
        if step.finish_reason:
            reasoning = responses_api.reasoning_text(builder.output)
            usage = responses_api.usage_json(
                step.prompt_tokens, step.completion_tokens, step.cached_tokens,
                wire.reasoning_tokens(tokenizer, reasoning, step.completion_tokens), cache_block)
            events, final = builder.finish(parser.finish_reason(step.finish_reason), usage)
            if store is not None:
                store.put(responses_api.StoredResponse(final, responses_api.conversation_after(r, builder.output),
                                                       r.input_items))
            for event in events:
                yield event
            return


def _message_logprobs(parsed, waiting: list, tokenizer) -> tuple[list[dict] | None, list]:
    """(the log-probs of `parsed`'s message text, in the chat format, or None; the entries
    still waiting). `waiting`: the entries of the answer's tokens that no parsed piece has
    shown yet. The message text is found among their bytes: the tokens it spans are its
    own; those before it made tags or reasoning (or, with a call in the piece, those after
    it made the call), and are dropped; after it, they wait for the next piece (text the
    parser holds back, such as a tag's first characters). Text that cannot be found there
    (a token's bytes are not valid UTF-8 alone, or the parser dropped spaces inside it):
    every waiting token is the message's unless the piece holds reasoning or a call."""
    if not waiting or not parsed:
        return None, waiting
    call = bool(parsed.tool_call_parts or parsed.tool_calls)
    if not parsed.content:
        return None, [] if parsed.reasoning or call else waiting
    pieces = [tokenizer.token_bytes(entry.token_id) for entry in waiting]
    spans, end = [], 0
    for piece in pieces:
        start, end = end, end + len(piece)
        spans.append((start, end))
    raw = b"".join(pieces)
    text = parsed.content.encode("utf-8")
    at = raw.find(text) if call else raw.rfind(text)
    if at < 0:
        mine = [] if parsed.reasoning or call else waiting
        return wire.logprobs_json("chat", mine, tokenizer)["content"], []
    mine = [e for e, (start, stop) in zip(waiting, spans) if start < at + len(text) and stop > at]
    later = [] if call else [e for e, (start, _) in zip(waiting, spans) if start >= at + len(text)]
    return wire.logprobs_json("chat", mine, tokenizer)["content"], later


async def _last_response(events) -> dict:
    """A whole answer: the response object of the last event."""
    last = None
    async with contextlib.aclosing(events):
        async for event in events:
            last = event
    return last["response"]


async def _response_sse(events, stream=None):
    """The events as SSE (`event:` and `data:` lines); an error ends the stream with an error
    event. When it ends (the client went away, say), `stream`, the engine's, is cancelled:
    None for a background response's events, which run on."""
    sequence = 0
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                sequence = event["sequence_number"] + 1
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
    except Exception as exc:
        if not isinstance(exc, wire.APIError):
            log.exception("stream failed")
            exc = wire.APIError(500, "internal server error (the server log has the details)", type="server_error")
        # The Responses API's error event: its own type, the error's code, message and param.
        body = {"type": "error", "sequence_number": sequence, "code": exc.code or exc.type, "message": exc.message,
                "param": exc.param}
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
    finally:
        if stream is not None:
            stream.cancel()


async def _stream(c: wire.Completion, streams, tokenizer):
    """SSE chunks for each event; cancels the requests if the client goes away."""
    try:
        async for piece in _stream_pieces(c, streams, tokenizer):
            yield piece
    except Exception:  # a bug, after the response has begun: end it with an error event
        log.exception("stream failed")
        yield _sse(wire.APIError(500, "internal server error (the server log has the details)",
                                 type="server_error").body())
    finally:
        # Normal end, error, or the client went away (the generator is closed/cancelled).
        for s in streams:
            s.cancel()


async def _stream_pieces(c: wire.Completion, streams, tokenizer):
    """The SSE chunks of the streams' events, usage, then [DONE]; an error event ends it.
    Several choices (n, or several prompts) are interleaved as their events come."""
    rid = wire.new_id(c.kind)
    totals = [0, 0, 0, 0]  # prompt, completion, cached and reasoning tokens of the finished choices
    pieces = [_choice_pieces(c, rid, index, stream, tokenizer, totals) for index, stream in enumerate(streams)]
    merged = pieces[0] if len(pieces) == 1 else _interleaved(pieces)
    async with contextlib.aclosing(merged):  # (an error ends it early: its tasks end with it)
        async for sse, failed in merged:
            yield sse
            if failed:
                return
    if c.include_usage:
        yield _sse(wire.chunk(c, rid, [], wire.usage(*totals)))
    yield "data: [DONE]\n\n"


async def _choice_pieces(c: wire.Completion, rid: str, index: int, stream, tokenizer, totals: list[int]):
    """(SSE chunk, whether it is an error that ends the response) for one choice's events;
    adds its token counts to `totals` when it finishes."""
    def opening(content: str | None) -> str:
        return _sse(wire.chunk(c, rid, [{"index": index, "delta": {"role": "assistant", "content": content},
                                         "logprobs": None, "finish_reason": None}]))

    # The first chunk gives the role. An answer of calls has no content, as OpenAI streams it:
    # null, not "", which the SDK's accumulated message would keep where the whole answer has
    # null. Calls only: said at once. Under tool_choice "auto" the answer's first piece tells
    # (the parser holds back what may be a call's tag), so the role waits for it, and so do
    # chunks of log-probs alone that come before it.
    opened, held = c.kind != "chat", []  # (held: chunks that came before the answer's first piece)
    if c.kind == "chat" and (c.calls_only or not c.tools_enabled):
        yield opening(None if c.calls_only else ""), False
        opened = True
    parser = parser_for(tokenizer, tools_enabled=c.tools_enabled, incremental=True,
                        calls_constrained=c.calls_constrained, calls_only=c.calls_only) if c.kind == "chat" else None
    # (text_offset counts from the prompt's end, as OpenAI's; see _collect_choice)
    answer = wire.AnswerLogprobs(tokenizer, c.params)
    offsets = wire.TextOffsets(tokenizer, len(tokenizer.decode(stream.request.prompt_ids)) if c.kind == "text" else 0)
    reasoning = ""  # the answer's reasoning so far (its tokens are counted in the usage)
    async for event in stream:
        if event.finish_reason == "error":
            yield _sse(_engine_error(event.error, c).body()), True
            return
        lp, entries = None, answer.feed(event) if c.params.logprobs else []
        if entries:
            lp = wire.logprobs_json(c.kind, entries, tokenizer,
                                    offsets.take([e.token_id for e in entries]) if c.kind == "text" else None)
        reason = event.finish_reason
        if parser is None:
            piece = {"text": event.text}
        else:
            parsed = parser.feed(event.text)
            if reason:
                parsed = _merge(parsed, parser.flush())
                reason = parser.finish_reason(reason)
            reasoning += parsed.reasoning
            delta = _delta(parsed)
            if c.legacy_functions:
                delta, reason = _legacy_message(delta), _legacy_reason(reason)
            piece = {"delta": delta}
        if (piece.get("text") or piece.get("delta")) or reason or lp:
            sse = _sse(wire.chunk(c, rid, [{"index": index, **piece, "logprobs": lp, "finish_reason": reason}]))
            if not opened and not piece["delta"] and not reason:
                held.append(sse)  # log-probs alone (of a call's tag that the parser holds back, say)
            else:
                if not opened:
                    delta = piece["delta"]
                    calls = (delta.get("tool_calls") or delta.get("function_call")) and not delta.get("content")
                    yield opening(None if calls else ""), False
                    opened = True
                    for earlier in held:
                        yield earlier, False
                yield sse, False
        if event.finish_reason:
            first = c.counts_prompt(index)
            totals[0] += event.prompt_tokens if first else 0
            totals[1] += event.completion_tokens
            totals[2] += event.cached_tokens if first else 0
            totals[3] += wire.reasoning_tokens(tokenizer, reasoning, event.completion_tokens)


async def _interleaved(generators: list):
    """The items of several async generators, each in its own order, as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(generator):
        try:
            async for item in generator:
                await queue.put(item)
            await queue.put(done)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(g)) for g in generators]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _merge(a: Parsed, b: Parsed) -> Parsed:
    return Parsed(a.content + b.content, a.reasoning + b.reasoning, a.tool_calls + b.tool_calls,
                  a.tool_call_parts + b.tool_call_parts)


def _tool_call_json(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_part_json(part) -> dict:
    """A streamed piece of a call: the first names it, the rest add to its arguments."""
    out = {"index": part.index, "function": {"arguments": part.arguments}}
    if part.id is not None:
        out.update(id=part.id, type="function")
        out["function"]["name"] = part.name
    return out


def _delta(parsed: Parsed) -> dict:
    delta = {}
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.tool_call_parts:
        delta["tool_calls"] = [_tool_call_part_json(part) for part in merge_parts(parsed.tool_call_parts)]
    return delta


def _legacy_message(message: dict) -> dict:
    """A message or delta as a request with the deprecated `functions` expects it: its call
    (the first: such a request asks for one) as `function_call`, without an id."""
    calls = message.pop("tool_calls", None)
    if calls and calls[0].get("index", 0) == 0:
        message["function_call"] = calls[0]["function"]
    return message


def _legacy_reason(reason: str | None) -> str | None:
    return "function_call" if reason == "tool_calls" else reason


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, made before anything slow happens (loading a model),
    so that a taken port or an unknown host is a one-line error rather than a late failure.
    Raises ValueError with that line."""
    # As uvicorn binds: IPv6 for an address with a colon, else IPv4 (so "localhost" is 127.0.0.1).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # the port is taken, the address is not this machine's, or no such host
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # Listening claims the port at once (a bound socket alone does not keep a second server
    # out); connections made while the model loads wait in the backlog.
    sock.listen(2048)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which first ends the requests in flight when it shuts down: they get
    a 503 error (a final error event when streaming) at once, instead of running on for
    uvicorn's grace period and then being cut off. Requests that reach the engine after
    that (their bodies still arriving when it began) are refused with the same 503."""

    def __init__(self, config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.abort_all(SHUTTING_DOWN, refuse_later=True)
        await super().shutdown(sockets=sockets)


def serve(engine: Engine, served_model: str, sock: socket.socket, **app_options) -> None:
    """Run uvicorn on `sock` (listen_socket) until Ctrl-C/SIGTERM."""
    app = create_app(engine, served_model, **app_options)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = _Server(config, engine)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal into the handler
    # that was installed before it started. Stopping a server on purpose is a clean exit, so
    # that handler does nothing.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if sock.family == socket.AF_INET6 else host  # as a URL writes it
    print(f"mlxserve: serving {served_model} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        # Stopped (uvicorn has handed the signal to the handler above): a further Ctrl-C or
        # SIGTERM, while the engine finishes its step in flight, is one again (it went to that
        # handler, and the process waited for the step: minutes for a long prompt on a CPU).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
