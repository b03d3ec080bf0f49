"""WebSocket ``since`` recovery on another edge fed by the same NATS JetStream stream, a fresh one included."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from streambus_nats import NatsSink, NatsSource

from streambus import Bus

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

pytestmark = pytest.mark.anyio

websocket = pytest.importorskip("streambus_websocket", reason="streambus-websocket is in this plugin's [test] extra")
testing = pytest.importorskip("streambus_websocket.testing")


async def test_client_resumes_on_another_edge_started_after_the_drop(
    nats_server: Callable[..., NatsServer], make_collector: Callable[[], Collector]
) -> None:
    """A client reads part of a stream on edge A and drops; edge B starts only afterwards (a fresh process
    filling its history from what JetStream retains) and answers its ``since`` with exactly the missing rest."""
    server = nats_server()
    async with Bus() as edge_a, Bus() as worker:
        sink_a = websocket.WebSocketSink(port=0)
        edge_a.add_sink(sink_a, name="websocket")
        source_a = NatsSource(url=server.url, consumer="a", start="0", position="none")
        edge_a.start_producer(source_a)
        with anyio.fail_after(10):
            await sink_a.wait_ready()
            await source_a.wait_ready()
        worker.add_sink(NatsSink(url=server.url, batch_max_ms=0))
        async with worker.stream(model="m") as w:
            async with testing.connect(sink_a.url) as peer:
                await peer.subscribe(id=1)
                await w.delta("The ")
                await w.delta("quick ")
                seen: list[dict[str, Any]] = [await peer.frame() for _ in range(3)]  # start, seq 1, seq 2
            # The client dropped; the stream goes on without it, and edge A goes away.
            await w.delta("brown ")
            source_a.stop()
            await w.delta("fox")
    seen_by_b = make_collector()
    async with Bus() as edge_b:
        sink_b = websocket.WebSocketSink(port=0)
        edge_b.add_sink(sink_b, name="websocket")
        edge_b.add_sink(seen_by_b)
        source_b = NatsSource(url=server.url, consumer="b", start="0", position="none")
        edge_b.start_producer(source_b)
        with anyio.fail_after(10):
            await sink_b.wait_ready()
        await seen_by_b.wait_terminals(1)
        async with testing.connect(sink_b.url) as peer:
            subscribed = await peer.subscribe(id=1, since={w.stream: seen[-1]["seq"]})
            assert subscribed["recovering"] and subscribed["recovered"] and subscribed["replayed"] == 3
            rest = await peer.events_until_end(w.stream)
        source_b.stop()
    events = seen + rest
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert "".join(e.get("text", "") for e in events) == "The quick brown fox"
    assert events[-1]["type"] == "end"
