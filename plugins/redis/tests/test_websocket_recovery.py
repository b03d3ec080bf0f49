"""WebSocket ``since`` recovery across two broadcaster processes fed by the same Redis stream."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from streambus_redis import RedisSink, RedisSource

from streambus import Bus

pytestmark = pytest.mark.anyio

websocket = pytest.importorskip("streambus_websocket", reason="streambus-websocket is in this plugin's [test] extra")
testing = pytest.importorskip("streambus_websocket.testing")


async def test_client_resumes_on_another_broadcaster(
    redis_url: str, key: str, make_collector: Any, exactly_once: Any
) -> None:
    seen_by_b = make_collector()
    async with Bus() as edge_a, Bus() as edge_b, Bus() as worker:
        sinks = []
        for name, edge in (("a", edge_a), ("b", edge_b)):
            sink = websocket.WebSocketSink(port=0)
            edge.add_sink(sink, name="websocket")
            source = RedisSource(url=redis_url, stream=key, consumer=name, start="0", position="none", block_ms=100)
            edge.start_producer(source)
            sinks.append((sink, source))
        edge_b.add_sink(seen_by_b)
        for sink, source in sinks:
            with anyio.fail_after(10):
                await sink.wait_ready()
                await source.wait_ready()
        (sink_a, source_a), (sink_b, source_b) = sinks
        worker.add_sink(RedisSink(url=redis_url, stream=key, batch_max_ms=0))
        async with worker.stream(model="m") as w:
            async with testing.connect(sink_a.url) as peer:
                await peer.subscribe(id=1)
                await w.delta("The ")
                await w.delta("quick ")
                seen = [await peer.frame() for _ in range(3)]  # start, seq 1, seq 2 (through Redis and A)
            # The client dropped; the stream goes on without it.
            await w.delta("brown ")
            await w.delta("fox")
        # B is another process reading the same Redis stream: it holds the same seqs.
        await seen_by_b.wait_terminals(1)
        async with testing.connect(sink_b.url) as peer:
            subscribed = await peer.subscribe(id=1, since={w.stream: seen[-1]["seq"]})
            assert subscribed["recovering"] and subscribed["recovered"] and subscribed["replayed"] == 3
            rest = await peer.events_until_end(w.stream)
        source_a.stop()
        source_b.stop()
    events = seen + rest
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert "".join(e.get("text", "") for e in events) == "The quick brown fox"
    assert events[-1]["type"] == "end"
