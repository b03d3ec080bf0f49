"""Events published together (one batch for the sink): complete, in order, and isolated per client.

Publishing does not yield to the event loop, so events published without an
``await`` that blocks reach the broadcaster as one batch. Under asyncio a
client with write credit gets each event through one ``broadcast()`` shared
with every such client; these tests hold that path to the same guarantees as
the queued one.
"""

from __future__ import annotations

import collections
import socket
import struct
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from streambus_websocket import CloseCode
from streambus_websocket.testing import Peer, connect, running
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

pytestmark = pytest.mark.anyio

PIECE = "0123456789abcdef" * 64  # 1 KiB
_wait_readable = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable


async def _read_until_ends(peer: Peer, out: list[dict[str, Any]], streams: int = 1) -> None:
    ended = 0
    while ended < streams:
        frame = await peer.frame(within=60)
        out.append(frame)
        if frame.get("type") in ("end", "error", "abort"):
            ended += 1


def _check_stream(events: list[dict[str, Any]], stream: str, text: str) -> None:
    """*events* of *stream* cover every seq once, in order, and their deltas spell *text*."""
    mine = [e for e in events if e.get("stream") == stream]
    assert mine[0]["type"] == "start" and mine[-1]["type"] == "end"
    expected = mine[0]["seq"]
    for e in mine:
        first = e.get("first_seq", e["seq"])
        assert first == expected, (first, expected)
        expected = e["seq"] + 1
    assert "".join(e["text"] for e in mine if e["type"] == "delta") == text


async def test_events_published_together_arrive_complete_and_in_order() -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id="all")
        # Few enough that a client reading along never falls behind (nothing coalesces).
        pieces = [f"<{i}x>" for i in range(150)]
        async with bus.stream(model="a") as a, bus.stream(model="b") as b:
            # Deltas of two streams interleaved, with no await that yields in between.
            for piece in pieces:
                await a.delta(piece)
                await b.delta(piece.upper())
        events: list[dict[str, Any]] = []
        await _read_until_ends(peer, events, streams=2)
        _check_stream(events, a.stream, "".join(pieces))
        _check_stream(events, b.stream, "".join(pieces).upper())
        # Every event as it was published: none merged, none missing.
        assert len(events) == 2 * (len(pieces) + 2)
        assert all(e.get("n", 1) == 1 for e in events)
        (client,) = sink.connections
        assert client.merged == 0
        assert client.sent == 1 + len(events)  # the "subscribed" answer, then the events


async def test_client_that_stops_taking_data_mid_batch_loses_nothing() -> None:
    async with (
        running(client_buffer_bytes=256 * 2**20, socket_send_buffer=65536) as (bus, sink),
        connect(sink.url, rcvbuf=4096, max_queue=1) as slow,
    ):
        await slow.subscribe(id=1)
        count = 2000
        # 2 MiB in one batch: far more than the sockets take, so the client stops being writable partway.
        async with bus.stream(model="m") as w:
            for i in range(count):
                await w.delta(f"{i:06d}{PIECE}")
        await anyio.wait_all_tasks_blocked()
        (client,) = sink.connections
        assert client.merged > 0, "the client should have fallen behind within the batch"
        events: list[dict[str, Any]] = []
        await _read_until_ends(slow, events)
        _check_stream(events, w.stream, "".join(f"{i:06d}{PIECE}" for i in range(count)))


class _RawPeer:
    """A client on a plain socket, so that a test can reset its connection at once, between two publishes."""

    def __init__(self, url: str, *, rcvbuf: int | None) -> None:
        host, port = url.split("/")[2].rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.sock.setblocking(False)
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self._events: collections.deque[Any] = collections.deque()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)  # a few small frames: the empty socket buffer takes them

    async def _next(self) -> Any:
        while not self._events:
            await _wait_readable(self.sock)
            data = self.sock.recv(65536)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self._events.extend(self.protocol.events_received())
            self._flush()
        return self._events.popleft()

    async def _message(self) -> dict[str, Any]:
        frame = await self._next()
        assert isinstance(frame, Frame)
        decoded: dict[str, Any] = msgspec.json.decode(frame.data)
        return decoded

    async def subscribe(self) -> None:
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        response = await self._next()
        assert isinstance(response, Response) and response.status_code == 101
        assert (await self._message())["op"] == "hello"
        self.protocol.send_text(b'{"op": "subscribe", "id": 1}')
        self._flush()
        assert (await self._message())["op"] == "subscribed"

    def reset(self) -> None:
        """Drop the connection with a TCP reset, right now (no closing handshake)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@pytest.mark.parametrize("stalled", [False, True], ids=["writable", "stalled"])
async def test_client_reset_mid_batch_does_not_disturb_another(stalled: bool) -> None:
    async with (
        running(client_buffer_bytes=64 * 2**20, socket_send_buffer=65536) as (bus, sink),
        connect(sink.url) as peer,
    ):
        await peer.subscribe(id=1)
        # Writable: the doomed client takes everything until it dies. Stalled: it never
        # reads, so when it dies part of what it was sent still waits in the server.
        doomed = _RawPeer(sink.url, rcvbuf=4096 if stalled else None)
        try:
            await doomed.subscribe()
            assert sink.clients == 2
            events: list[dict[str, Any]] = []
            before = 256 if stalled else 4
            pieces = [f"{i:06d}{PIECE if stalled else ''}" for i in range(before + 256)]
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_until_ends, peer, events)
                async with bus.stream(model="m") as w:
                    for piece in pieces[:before]:
                        await w.delta(piece)
                    await anyio.wait_all_tasks_blocked()
                    # One batch, with the reset in its middle: no await in here yields.
                    for i, piece in enumerate(pieces[before:]):
                        if i == 128:
                            doomed.reset()
                        await w.delta(piece)
        finally:
            doomed.sock.close()
        _check_stream(events, w.stream, "".join(pieces))
        with anyio.fail_after(10):
            while sink.clients != 1:  # noqa: ASYNC110 - the sink offers no event for a disconnect
                await anyio.sleep(0.01)
        # The broadcaster goes on serving the survivor.
        async with bus.stream(model="m") as w2:
            await w2.delta("after")
        assert (await peer.events_until_end())[-2]["text"] == "after"


async def test_client_that_catches_up_gets_frames_directly_again(anyio_backend: str) -> None:
    """After its backlog is written, a client that reads along leaves the queue: frames go out at once."""
    deltas, piece = 3000, "x" * 60  # ~300 KiB of frames: the 32 KiB credit runs out several times
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id="all")
        (client,) = sink.connections
        got: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_until_ends, peer, got)
            async with bus.stream(model="a") as w:
                for i in range(deltas):
                    await w.delta(piece)
                    if i % 64 == 63:
                        await anyio.lowlevel.checkpoint()  # tokens arrive over time, as from a model
        _check_stream(got, w.stream, piece * deltas)
        if anyio_backend == "trio":
            assert client.direct == 0  # trio: every frame goes through the sender task
        else:
            # The credit ran out several times (a batch queued each time), and each time the client
            # came back to direct writes once its sender had written the backlog: 2,494 of 3,003
            # frames direct here, against 215 when it stayed queued for good after the first time.
            assert client.sent - client.direct > 0
            assert client.direct > 0.5 * client.sent, (client.direct, client.sent)


@pytest.mark.parametrize("credit", [1, 100, 250, 251, 10_000])
async def test_take_run_is_take_frame_by_frame(credit: int) -> None:
    """A run's direct frames are those take() would grant one by one: a prefix, credit spent alike.

    Async: a client holds anyio events, which anyio 4.4 (the lowest supported) makes only in a loop.
    """
    from streambus_websocket.client import Client

    def client() -> Client:
        return Client(object(), buffer_bytes=1 << 20, peer="t", credit=credit, write_now=lambda *a, **k: None)

    sizes = [100, 50, 100, 1, 300, 7]
    one, run = client(), client()
    granted = [one.take(size) for size in sizes]
    count = run.take_run(sizes)
    assert granted == [True] * count + [False] * (len(sizes) - count)
    assert (run.credit, run.sent, run.direct) == (one.credit, one.sent, one.direct)
    # Anything queued, a send in flight or a close: nothing goes at once.
    for state in ("queued", "sending", "closed"):
        blocked = client()
        if state == "queued":
            blocked.push(b"control frame")
        elif state == "sending":
            blocked.sending = True
        else:
            blocked.close(CloseCode.GOING_AWAY, "bye")
        assert blocked.take_run(sizes) == 0 and blocked.credit == credit


async def test_a_batch_of_tokens_reaches_clients_with_and_without_credit_in_order(anyio_backend: str) -> None:
    """One batch of one stream's tokens: the direct prefix and the queued rest arrive whole, in order, per client."""
    async with running() as (bus, sink), connect(sink.url) as fast, connect(sink.url) as other:
        await fast.subscribe(id="all")
        await other.subscribe(id="all")
        # 200 tokens of 1 KiB published with no await that yields: one batch, far past the 32 KiB credit.
        pieces = [f"<{i}>{PIECE}" for i in range(200)]
        got_fast: list[dict[str, Any]] = []
        got_other: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_until_ends, fast, got_fast)
            tg.start_soon(_read_until_ends, other, got_other)
            async with bus.stream(model="a") as w:
                for piece in pieces:
                    await w.delta(piece)
        for got in (got_fast, got_other):
            _check_stream(got, w.stream, "".join(pieces))
        for client in sink.connections:
            if anyio_backend == "trio":
                assert client.direct == 0  # trio: every frame goes through the sender task
            else:
                assert 0 < client.direct < client.sent  # part at once, the rest through the queue


@pytest.mark.parametrize("buffer_bytes", [300, 1200, 1 << 20])
async def test_push_deltas_is_push_event_one_by_one(buffer_bytes: int) -> None:
    """Queuing a run's rest in one call: the same queue, merges, byte count, and the same lagged close."""
    from streambus_websocket.client import Client

    from streambus import DeltaEvent, encode

    deltas = [DeltaEvent(stream="s", seq=i, ts=float(i), text=f"<{i}>" * 3) for i in range(1, 40)]
    payloads = [encode(d) for d in deltas]
    one = Client(object(), buffer_bytes=buffer_bytes, peer="t", write_now=lambda *a, **k: None)
    run = Client(object(), buffer_bytes=buffer_bytes, peer="t", write_now=lambda *a, **k: None)
    for delta, data in zip(deltas, payloads, strict=True):
        one.push_event("s", delta, data)
    run.push_deltas("s", deltas, payloads)
    assert (run.queued_bytes, run.merged, run.close_code, run.close_reason) == (
        one.queued_bytes,
        one.merged,
        one.close_code,
        one.close_reason,
    )

    def drained(client: Client) -> list[object]:
        out: list[object] = []
        while client.queue:
            item = client.queue.popleft()
            out.append(item if isinstance(item, bytes) else item.event())
        return out

    assert drained(run) == drained(one)
    if buffer_bytes == 300:
        assert run.close_code == CloseCode.LAGGED
    elif buffer_bytes == 1200:
        assert run.merged > 0 and run.close_code is None  # past a quarter of the budget, deltas merge
