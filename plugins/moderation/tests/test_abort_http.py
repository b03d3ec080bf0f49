"""Abort cancels the producer, and its upstream HTTP connection is seen closing.

A tiny aiohttp server streams NDJSON chunks and then waits forever; a
producer reads it with an aiohttp client into the bus. When moderation
aborts the stream, the server's handler must see its client go away.
aiohttp is asyncio-bound, so these tests run on asyncio only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import anyio
import pytest
from aiohttp import web
from streambus_moderation import KeywordModerator, ModerationStage
from streambus_moderation.testing import assert_well_formed, delivered_text

from streambus import AbortEvent, Bus, ModerationEvent

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Upstream:
    """A model server that streams chunks, then keeps the response open."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks
        self.sent = asyncio.Event()
        self.closed = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for chunk in self.chunks:
                await response.write(json.dumps({"response": chunk, "done": False}).encode() + b"\n")
            self.sent.set()
            await asyncio.Event().wait()  # a model that would go on generating
        except (asyncio.CancelledError, ConnectionResetError):
            self.closed.set()  # the client went away: aiohttp cancels the handler
            raise
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream(["Sure. Here is how you ", "ki", "ll a ", "process"])
    app = web.Application()
    app.router.add_get("/generate", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}/generate"
    yield server
    await runner.cleanup()


class HTTPProducer:
    """Reads an NDJSON model stream into one bus stream."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cancelled = False

    async def run(self, bus: Bus) -> None:
        async with aiohttp.ClientSession() as session, bus.stream(stream="chat", model="m") as w:
            try:
                async with session.get(self.url) as response:
                    async for line in response.content:
                        await w.delta(json.loads(line)["response"])
            except asyncio.CancelledError:
                self.cancelled = True
                raise


@pytest.mark.parametrize("mode", ["observe", "gate"])
async def test_abort_cancels_the_producer_and_closes_its_upstream_connection(upstream: Upstream, mode: str) -> None:
    stage = ModerationStage(
        moderator=KeywordModerator(words={"violence": ["kill"]}),
        mode=mode,
        action="abort",
        window_chars=12,
        overlap_chars=8,
    )
    producer = HTTPProducer(upstream.url)
    async with Bus() as bus:
        bus.add_sink(stage)
        raw = bus.subscribe(raw=True, overflow="block")
        moderated = bus.subscribe(overflow="block")
        bus.start_producer(producer)
        with anyio.fail_after(10):
            await upstream.closed.wait()
    assert producer.cancelled
    raw_events = [e async for e in raw]
    events = [e async for e in moderated]
    assert_well_formed(events)
    assert_well_formed(raw_events)
    # the producer's own stream ends with abort by moderation (its writer was cancelled)
    assert isinstance(raw_events[-1], AbortEvent) and raw_events[-1].by == "moderation"
    note, last = events[-2], events[-1]
    assert isinstance(note, ModerationEvent) and note.action == "abort" and note.categories == ["violence"]
    assert isinstance(last, AbortEvent) and last.by == "moderation" and "violence" in last.reason
    assert sum(isinstance(e, AbortEvent) for e in events) == 1
    shown = delivered_text(events)
    if mode == "gate":
        assert "ki" not in shown  # not even the first half of the split term
        assert "process" not in shown
    else:
        assert "kill" in delivered_text(raw_events)
        assert (note.start, note.end) == (len("Sure. Here is how you "), len("Sure. Here is how you kill"))
    assert stage.stats.aborted == 1
