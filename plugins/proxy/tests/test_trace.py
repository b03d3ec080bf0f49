"""W3C trace context through the proxy: the client's traceparent reaches the upstream, the bus and the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from streambus_proxy import serve_proxy

from streambus import Bus, StartEvent
from streambus.testing import EventCapture, Reply, scripted_upstream

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
LINE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"hi"},"done":false}\n'
DONE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done":true}\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp


@pytest.fixture
async def upstream() -> AsyncIterator[Any]:
    async with scripted_upstream("application/x-ndjson") as state:
        state.replies.append(Reply(chunks=[LINE, DONE]))
        yield state


async def _ask(url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        response = await http.post(url + "/api/chat", json={"model": "m", "messages": []}, headers=headers)
        await response.read()
        return response


async def test_the_clients_trace_reaches_upstream_bus_and_answer(upstream: Any) -> None:
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        async with serve_proxy(bus, upstream.url) as url:
            response = await _ask(url, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
        await capture.wait_for(lambda c: len(c.ended) == 1)
        await bus.shutdown()
    assert response.status == 200
    assert response.headers["traceparent"] == TRACEPARENT  # returned with the answer
    assert upstream.headers[0]["traceparent"] == TRACEPARENT  # continued upstream
    assert upstream.headers[0]["tracestate"] == "vendor=1"
    (start,) = [e for e in capture.events if isinstance(e, StartEvent)]
    assert (start.meta["traceparent"], start.meta["tracestate"]) == (TRACEPARENT, "vendor=1")


@pytest.mark.parametrize(
    "value",
    ["garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01", f"00-{TRACE_ID}-{PARENT_ID}"],
)
async def test_a_malformed_traceparent_is_not_taken_for_a_trace(upstream: Any, value: str) -> None:
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        async with serve_proxy(bus, upstream.url) as url:
            response = await _ask(url, {"traceparent": value})
        await capture.wait_for(lambda c: len(c.ended) == 1)
        await bus.shutdown()
    assert response.status == 200
    assert "traceparent" not in response.headers
    (start,) = [e for e in capture.events if isinstance(e, StartEvent)]
    assert "traceparent" not in start.meta


async def test_the_proxied_streams_span_continues_the_clients_trace(upstream: Any) -> None:
    """With the otel sink on the bus, the stream's span is a child of the client's span."""
    pytest.importorskip("streambus_otel", reason="the otel sink comes with plugins/otel")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from streambus_otel import OtelSink

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        bus.add_sink(OtelSink(tracer_provider=provider, read_pause=0, metrics="old"))
        async with serve_proxy(bus, upstream.url) as url:
            await _ask(url, {"traceparent": TRACEPARENT})
        await capture.wait_for(lambda c: len(c.ended) == 1)
        await bus.shutdown()
    provider.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.context is not None and f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
