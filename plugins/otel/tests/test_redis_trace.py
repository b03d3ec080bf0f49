"""A trace that crosses the Redis engine into a second process."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from streambus_otel import OtelSink
from streambus_redis import RedisSource

from streambus import Bus, Subscription, is_terminal

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

URL = os.environ.get("STREAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
PROC = Path(__file__).with_name("otel_proc.py")
EDGE = Path(__file__).with_name("proxy_proc.py")


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client is asyncio-bound."""
    return "asyncio"


@pytest.fixture
def key() -> Iterator[str]:
    """A unique Redis key, deleted afterwards; skipped only when Redis is unreachable and not on CI."""
    client = redis.Redis.from_url(URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no Redis at {URL}: {exc} (CI=true: Redis tests must run)")
        pytest.skip(f"no Redis reachable at STREAMBUS_REDIS_URL={URL}: {exc}")
    name = f"test:streambus:otel:{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        client.delete(name, name + "#epoch")  # the sink's epoch key too (docs/distributed.md)
        client.close()


class StopAfter:
    """Stops the source once *count* streams have ended."""

    overflow = "block"

    def __init__(self, source: RedisSource, count: int) -> None:
        self.source, self.left = source, count

    async def run(self, events: Subscription) -> None:
        async for event in events:
            if is_terminal(event):
                self.left -= 1
                if self.left == 0:
                    self.source.stop()


async def test_the_consumer_hosts_spans_continue_the_producers_trace(key: str) -> None:
    produced = await anyio.run_process([sys.executable, str(PROC), URL, key], check=False)
    assert produced.returncode == 0, produced.stderr.decode()
    ids = orjson.loads(produced.stdout.splitlines()[-1])

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    source = RedisSource(url=URL, stream=key, consumer="otel-test", start="0", position="none", block_ms=100)
    with anyio.fail_after(30):
        async with Bus() as bus:
            bus.add_sink(OtelSink(tracer_provider=provider, read_pause=0))
            bus.add_sink(StopAfter(source, 3))
            bus.start_producer(source)
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert len(spans) == 3
    for span in spans:
        assert span.context is not None
        assert span.parent is not None
        assert f"{span.context.trace_id:032x}" == ids["trace_id"]
        assert f"{span.parent.span_id:016x}" == ids["span_id"]
        assert span.parent.is_remote
    done, failed, aborted = spans
    assert dict(done.attributes or {})["gen_ai.usage.output_tokens"] == 1
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "overloaded"
    assert dict(aborted.attributes or {})["streambus.abort.by"] == "client"
    provider.shutdown()


async def test_a_proxied_stream_continues_the_clients_trace_across_redis(key: str) -> None:
    """Client -> proxy (its traceparent) -> bus -> Redis -> a second process whose otel sink parents the span."""
    pytest.importorskip("streambus_proxy", reason="the proxy comes with plugins/proxy")
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = f"00-{trace_id}-{parent_id}-01"
    edge = await anyio.run_process([sys.executable, str(EDGE), URL, key, traceparent], check=False)
    assert edge.returncode == 0, edge.stderr.decode()
    assert orjson.loads(edge.stdout.splitlines()[-1]) == {"traceparent": traceparent}

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    source = RedisSource(url=URL, stream=key, consumer="otel-proxy", start="0", position="none", block_ms=100)
    with anyio.fail_after(30):
        async with Bus() as bus:
            bus.add_sink(OtelSink(tracer_provider=provider, read_pause=0))
            bus.add_sink(StopAfter(source, 1))
            bus.start_producer(source)
    (span,) = exporter.get_finished_spans()
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent_id
    assert span.parent.is_remote
    provider.shutdown()
