"""A real uvicorn server on a free loopback port, in a background thread, for tests."""

import socket
import threading

import uvicorn

from mlxserve.engine import EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:  # uvicorn sets this once it accepts connections
            if not self._thread.is_alive():
                raise RuntimeError("server failed to start")
            threading.Event().wait(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()


class ScriptedEngine:
    """Stands in for the engine in the server: each request streams the scripted text pieces
    (the model's output as the detokenizer would deliver it)."""

    grammars = None  # (a response_format's grammar is then checked for its form only)
    config = EngineConfig()

    def __init__(self, loaded, pieces):
        self.loaded, self.pieces, self.alive = loaded, pieces, True

    def stats(self):
        return {}

    def submit(self, request, loop, on_finish=None):
        return ScriptedStream(request, self.pieces)


class ScriptedStream:
    def __init__(self, request, pieces):
        self.request, self.pieces = request, pieces

    def cancel(self):
        pass

    async def __aiter__(self):
        from mlxserve.scheduler import TokenEvent

        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield TokenEvent("scripted", [i], piece, finish_reason="stop" if last else None,
                             prompt_tokens=len(self.request.prompt_ids), completion_tokens=i + 1)


# A Qwen-style answer: reasoning, some content, one tool call, cut into uneven pieces.
SCRIPT = ["<think>", "\nCheck the", " weather.\n", "</think>", "\n\nLet me look.", "<tool_call>", '\n{"name": "get_',
          'weather", "arguments": {"city": ', '"Paris"}}\n', "</tool_call>"]


class TokenScriptedEngine(ScriptedEngine):
    """Like ScriptedEngine, but each request streams `text` one token at a time, as the
    engine does: each event the token's id, its new text (held back while it ends in an
    incomplete character) and, when asked for, a log-prob (token i: -i)."""

    def __init__(self, loaded, text):
        super().__init__(loaded, None)
        self.text = text

    def submit(self, request, loop, on_finish=None):
        return TokenScriptedStream(request, self.loaded.tokenizer, self.text)


class TokenScriptedStream(ScriptedStream):
    def __init__(self, request, tokenizer, text):
        super().__init__(request, None)
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        self.tokenizer = tokenizer

    async def __aiter__(self):
        from mlxserve.scheduler import TokenEvent, TokenLogprob

        shown = ""
        for i, token in enumerate(self.ids):
            text = self.tokenizer.decode(self.ids[: i + 1])
            piece = "" if text.endswith("\ufffd") else text[len(shown):]
            shown += piece
            last = i == len(self.ids) - 1
            logprobs = [TokenLogprob(token, -float(i), [(token, -float(i))])] if self.request.params.logprobs else None
            yield TokenEvent("scripted", [token], piece, logprobs=logprobs, finish_reason="stop" if last else None,
                             prompt_tokens=len(self.request.prompt_ids), completion_tokens=i + 1)



class GatedEngine(ScriptedEngine):
    """Like ScriptedEngine, but each request's stream gives a piece only when the test lets
    one through (`let_through`): a test can look at a request in flight. `streams`: every
    request's stream, in order; a stream's `cancelled` says whether the server cancelled it."""

    def __init__(self, loaded, pieces):
        super().__init__(loaded, pieces)
        self.streams: list[GatedStream] = []

    def submit(self, request, loop, on_finish=None):
        self.streams.append(GatedStream(request, self.pieces))
        return self.streams[-1]

    def let_through(self, pieces: int = 1) -> None:
        """Let the newest request's stream give that many more pieces."""
        for _ in range(pieces):
            self.streams[-1].permits.release()

    def close(self) -> None:
        """Free every stream's waiting thread (at a test's end)."""
        for stream in self.streams:
            stream.permits.release(len(self.pieces))


class GatedStream(ScriptedStream):
    def __init__(self, request, pieces):
        super().__init__(request, pieces)
        self.permits = threading.Semaphore(0)
        self.given = 0
        self.cancelled = False  # cancelled before its last piece (after it, as the engine's, a no-op)

    def cancel(self):
        if self.given < len(self.pieces):
            self.cancelled = True
            self.permits.release(len(self.pieces))  # (frees a thread waiting for a permit)

    async def __aiter__(self):
        import asyncio

        async for event in super().__aiter__():
            await asyncio.to_thread(self.permits.acquire)
            self.given += 1
            yield event
