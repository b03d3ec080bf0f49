"""The ``abort`` operation over real loopback WebSocket connections: replies, errors, resume after a stop."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from streambus_websocket import ErrorCode
from streambus_websocket.testing import Peer, connect, running

from streambus import Bus

pytestmark = pytest.mark.anyio


class Live:
    """A producer that writes *parts* then waits to be stopped."""

    def __init__(self, bus: Bus, stream: str, parts: list[str]) -> None:
        self.bus, self.stream, self.parts = bus, stream, parts
        self.written = anyio.Event()
        self.cancelled = False

    async def run(self) -> None:
        try:
            async with self.bus.stream(model="m", stream=self.stream) as w:
                for part in self.parts:
                    await w.delta(part)
                self.written.set()
                await anyio.sleep_forever()
        finally:
            self.cancelled = True


async def start_live(bus: Bus, stream: str, parts: list[str]) -> Live:
    live = Live(bus, stream, parts)
    bus.start_soon(live.run)
    await live.written.wait()
    return live


async def until(peer: Peer, done: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not done(frames):
        frames.append(await peer.frame())
    return frames


def has_abort(frames: list[dict[str, Any]], stream: str) -> bool:
    return any(f.get("type") == "abort" and f["stream"] == stream for f in frames)


async def test_abort_op_stops_the_stream_every_subscriber_sees_one_abort() -> None:
    async with running() as (bus, sink), connect(sink.url) as stopper, connect(sink.url) as watcher:
        await stopper.subscribe(id="all")
        await watcher.subscribe(id="all")
        live = await start_live(bus, "s1", ["Hel", "lo"])
        await stopper.send({"op": "abort", "stream": "s1", "reason": "user pressed stop", "id": 7})
        frames = await until(stopper, lambda fs: has_abort(fs, "s1") and any(f.get("op") for f in fs))
        replies = [f for f in frames if "op" in f]
        assert replies == [{"op": "aborted", "id": 7, "stream": "s1", "outcome": "stopped"}]
        watched = await watcher.events_until_end("s1")
        for seen in (frames, watched):
            events = [f for f in seen if "type" in f]
            aborts = [e for e in events if e["type"] == "abort"]
            assert len(aborts) == 1 and aborts[0]["by"] == "client" and aborts[0]["reason"] == "user pressed stop"
            assert "".join(e.get("text", "") for e in events) == "Hello"
        assert live.cancelled
        # again: the stream already ended, a clean no-op answer
        await stopper.send({"op": "abort", "stream": "s1", "id": 8})
        assert await stopper.expect("aborted") == {"op": "aborted", "id": 8, "stream": "s1", "outcome": "ended"}


async def test_resume_after_a_stop_gets_the_rest_and_the_single_abort() -> None:
    async with running() as (bus, sink):
        async with connect(sink.url) as first:
            await first.subscribe(id="all")
            await start_live(bus, "s2", ["a", "b", "c"])
            seen = [await first.frame(), await first.frame()]  # start and "a"
            assert [f["seq"] for f in seen] == [0, 1]
        async with connect(sink.url) as stopper:
            await stopper.subscribe(id="s2", streams=["s2"])
            await stopper.send({"op": "abort", "stream": "s2"})
            frames = await until(stopper, lambda fs: has_abort(fs, "s2") and any(f.get("op") for f in fs))
            assert [f["outcome"] for f in frames if f.get("op")] == ["stopped"]
        async with connect(sink.url) as again:
            subscribed = await again.subscribe(id="all", since={"s2": 1})
            assert subscribed["recovered"] is True
            events = await again.events_until_end("s2")
            assert [e.get("text") for e in events if e["type"] == "delta"] == ["b", "c"]
            assert [e["type"] for e in events][-1] == "abort" and sum(e["type"] == "abort" for e in events) == 1


@pytest.mark.parametrize(
    ("message", "code", "field"),
    [
        ({"op": "abort"}, "bad_message", "stream"),
        ({"op": "abort", "stream": ""}, "bad_message", "stream"),
        ({"op": "abort", "stream": 5}, "bad_message", "stream"),
        ({"op": "abort", "stream": "x" * 257, "id": "long"}, "bad_message", "stream"),
        ({"op": "abort", "stream": "s", "reason": "r" * 201}, "bad_message", "reason"),
        ({"op": "abort", "stream": "s", "by": "moderation"}, "bad_message", "by"),
        ({"op": "abort", "stream": "nobody", "id": "q"}, "unknown_stream", "stream"),
    ],
)
async def test_bad_abort_messages_get_clear_errors_and_the_connection_survives(
    message: dict[str, Any], code: str, field: str
) -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        live = await start_live(bus, "s", ["x"])
        await peer.send(message)
        error = await peer.expect("error")
        assert error["code"] == code and error["field"] == field, error
        assert error["message"]
        assert error.get("id") == message.get("id")  # echoed when the frame had one, even a bad frame
        await peer.send({"op": "ping", "id": 1})
        assert await peer.expect("pong") == {"op": "pong", "id": 1}
        assert not live.cancelled and not bus.ended("s")


async def test_allow_stop_false_answers_forbidden() -> None:
    async with running(allow_stop=False) as (bus, sink), connect(sink.url) as peer:
        live = await start_live(bus, "s", ["x"])
        await peer.send({"op": "abort", "stream": "s", "id": 1})
        error = await peer.expect("error")
        assert error["code"] == ErrorCode.FORBIDDEN.value and error["id"] == 1
        assert not live.cancelled


async def test_with_a_token_only_its_bearer_connects_and_may_stop() -> None:
    from websockets.exceptions import ConnectionClosed

    async with running(token="tok-123") as (bus, sink):
        live = await start_live(bus, "s", ["x"])
        async with connect(sink.url, hello=False) as intruder:
            code, frames = await intruder.closed()
            assert code == 4001 and frames[0]["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                await intruder.send({"op": "abort", "stream": "s"})
        assert not live.cancelled
        async with connect(sink.url + "?token=tok-123") as peer:
            await peer.send({"op": "abort", "stream": "s"})
            assert (await peer.expect("aborted"))["outcome"] == "stopped"
