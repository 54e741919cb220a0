"""BackgroundResponse (background.py) in one event loop, with the answer's events fed by hand."""

import asyncio

from mlxserve.background import BackgroundResponse
from mlxserve.openai_api import APIError


class Builder:
    """What BackgroundResponse uses of a ResponseBuilder: response objects and numbered events."""

    def __init__(self):
        self.sequence, self.output = 0, []

    def response(self, status, error=None):
        return {"id": "resp_1", "status": status, "output": list(self.output), "error": error}

    def event(self, kind, **fields):
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}


class EngineStream:
    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


class Feed:
    """The answer's events (server._response_events' part), given one at a time by the test."""

    def __init__(self, builder):
        self.builder, self.queue = builder, asyncio.Queue()

    def send(self, kind, **fields):
        event = self.builder.event(kind, **fields)
        self.queue.put_nowait(event)
        return event

    def fail(self, exc):
        self.queue.put_nowait(exc)

    async def events(self):
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.get("response", {}).get("status") in ("completed", "incomplete"):
                return


def started():
    builder, stream, ended = Builder(), EngineStream(), []
    run = BackgroundResponse(builder, stream, ended.append)
    feed = Feed(builder)
    run.start(feed.events())
    return run, feed, stream, ended


async def take(iterator, n):
    return [await anext(iterator) for _ in range(n)]


def test_followers_get_every_event_in_order_and_leaving_stops_nothing():
    async def main():
        run, feed, stream, ended = started()
        assert run.response["status"] == "queued"
        sent = [feed.send("response.created", response={"status": "queued"}),
                feed.send("response.in_progress", response={"status": "in_progress"}),
                feed.send("response.output_text.delta", delta="Hel")]
        first = run.follow()
        assert await take(first, 3) == sent
        assert run.response["status"] == "in_progress"
        await first.aclose()  # a client that went away
        sent.append(feed.send("response.output_text.delta", delta="lo"))
        again = run.follow(after=2)  # resumed after the last event it had
        assert await take(again, 1) == sent[3:]
        assert stream.cancelled == 0 and not run.done
        final = {"status": "completed", "output": ["Hello"]}
        sent.append(feed.send("response.completed", response=final))
        assert [e async for e in again] == sent[4:]  # ...and it ends with the response
        assert [e async for e in run.follow()] == sent  # a late follower: all, then the end
        assert run.done and run.response is final and ended == [run]
        assert await run.cancel() is final  # the end stays as it was
        assert stream.cancelled == 1 and ended == [run]  # (the engine's stream: cancelled once at the end)

    asyncio.run(main())


def test_cancel_stops_the_answer_keeps_the_output_so_far_and_ends_the_followers():
    async def main():
        run, feed, stream, ended = started()
        feed.send("response.created", response={"status": "queued"})
        follower = run.follow()
        await take(follower, 1)
        run._builder.output.append("Hel")  # (what the builder holds of the answer so far)
        cancelled = await run.cancel()
        assert cancelled["status"] == "cancelled" and cancelled["output"] == ["Hel"]
        assert stream.cancelled == 1 and ended == [run] and run.response is cancelled
        assert [e async for e in follower] == []  # the follower ends, with no event after
        assert (await run.cancel()) is cancelled and ended == [run]

    asyncio.run(main())


def test_a_cancel_before_the_task_has_run_ends_the_response_as_cancelled():
    """cancel() before the loop has run the task's first step (its coroutine never starts,
    nor its try/finally): the response still ends as cancelled, the engine's stream cancelled,
    on_end called once and the followers ended."""
    async def main():
        builder, stream, ended, began = Builder(), EngineStream(), [], []
        feed = Feed(builder)

        async def events():
            began.append(True)
            async for event in feed.events():
                yield event

        run = BackgroundResponse(builder, stream, ended.append)
        run.start(events())
        follower = run.follow()
        cancelled = await run.cancel()  # (nothing has awaited since start: the task has not run)
        assert not began and run._task.cancelled()
        assert cancelled["status"] == "cancelled" and run.status == "cancelled" and run.response is cancelled
        assert stream.cancelled == 1 and ended == [run]
        assert [e async for e in follower] == []
        assert (await run.cancel()) is cancelled and stream.cancelled == 1 and ended == [run]

    asyncio.run(main())


def test_an_error_ends_the_response_as_failed_with_an_event_saying_so():
    async def main():
        run, feed, stream, ended = started()
        feed.send("response.created", response={"status": "queued"})
        feed.fail(APIError(400, "the answer could not go on", code="bad_answer"))
        events = [e async for e in run.follow()]
        assert [e["type"] for e in events] == ["response.created", "response.failed"]
        assert [e["sequence_number"] for e in events] == [0, 1]
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and run.response is failed
        assert failed["error"] == {"code": "bad_answer", "message": "the answer could not go on"}
        assert stream.cancelled == 1 and ended == [run]

    asyncio.run(main())
