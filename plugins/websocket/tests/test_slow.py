"""Slow and stalled clients: per-client buffers, coalescing, the lagged close, and isolation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from streambus_websocket import CloseCode
from streambus_websocket.testing import Peer, connect, running

pytestmark = pytest.mark.anyio

PIECE = "0123456789abcdef" * 64  # 1 KiB


async def _read_stream(peer: Peer, out: list[dict[str, Any]]) -> None:
    while True:
        frame = await peer.frame(within=60)
        out.append(frame)
        if frame.get("type") in ("end", "error", "abort"):
            return


async def test_stalled_client_is_closed_as_lagged_and_never_delays_the_others() -> None:
    async with running(client_buffer_bytes=128 * 1024) as (bus, sink):
        fast_events: list[dict[str, Any]] = []
        async with connect(sink.url) as fast, connect(sink.url, rcvbuf=4096, max_queue=1) as stalled:
            await fast.subscribe(id=1)
            await stalled.subscribe(id=1)
            sent = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_stream, fast, fast_events)
                async with bus.stream(model="m") as w:
                    # Bounded: 40 MiB is far more than the kernel buffers can hide.
                    while sink.clients == 2 and sent < 40_000:
                        await w.delta(PIECE)
                        sent += 1
                        if sent % 64 == 0:
                            await anyio.wait_all_tasks_blocked()
                    assert sink.clients == 1, "the stalled client should have been closed"
                    await w.delta("tail")
            code, frames = await stalled.closed(within=30)
        assert code == CloseCode.LAGGED
        assert frames[-1] == {**frames[-1], "op": "error", "code": "lagged"}
        text = "".join(e["text"] for e in fast_events if e["type"] == "delta")
        assert text == PIECE * sent + "tail"
        seqs = [e["seq"] for e in fast_events]
        assert seqs == sorted(set(seqs))


async def test_slow_client_gets_coalesced_deltas_without_losing_a_character() -> None:
    async with running(client_buffer_bytes=256 * 1024 * 1024) as (bus, sink):
        async with connect(sink.url, rcvbuf=4096, max_queue=1) as slow:
            await slow.subscribe(id=1)
            sent = 0
            async with bus.stream(model="m") as w:
                while sent < 40_000:
                    await w.delta(f"{sent:06d};")
                    sent += 1
                    if sent % 256 == 0:
                        await anyio.wait_all_tasks_blocked()
                        if sum(c.merged for c in sink.connections) > 100:
                            break
                assert sum(c.merged for c in sink.connections) > 0
            events: list[dict[str, Any]] = []
            await _read_stream(slow, events)
        deltas = [e for e in events if e["type"] == "delta"]
        assert "".join(e["text"] for e in deltas) == "".join(f"{i:06d};" for i in range(sent))
        assert any(e.get("n", 1) > 1 for e in deltas)
        # Coalesced deltas cover their source seqs exactly: no gap, no overlap.
        expected = 1
        for e in deltas:
            first = e.get("first_seq", e["seq"])
            assert first == expected
            assert e.get("n", 1) == e["seq"] - first + 1
            expected = e["seq"] + 1
        assert expected == sent + 1


async def test_socket_send_buffer_is_applied_on_both_backends() -> None:
    async with running(socket_send_buffer=65536) as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id=1)
        (client,) = sink.connections
        transport = getattr(client.ws, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else client.ws.stream.socket
        import socket

        # Linux doubles the requested size for its own bookkeeping.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) in (65536, 131072)
        async with bus.stream(model="m") as w:
            await w.delta("ok")
        events = await peer.events_until_end()
        assert events[-2]["text"] == "ok"
