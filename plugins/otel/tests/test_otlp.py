"""A real OTLP/HTTP export to a receiver on loopback, decoded with opentelemetry-proto."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from streambus_otel import OtelSink

from streambus import Bus, Usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The receiver is an aiohttp server: asyncio only (the sink itself runs on both)."""
    return "asyncio"


class Receiver:
    """What an OTLP/HTTP collector was sent: (path, headers, decoded protobuf body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.requests.append((request.path, dict(request.headers), body))
        answer = ExportTraceServiceResponse() if request.path == "/v1/traces" else ExportMetricsServiceResponse()
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every span received, with its resource's attributes."""
        out = []
        for path, _, body in self.requests:
            if path == "/v1/traces":
                for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                    resource = attributes(rs.resource.attributes)
                    out.extend((resource, span) for ss in rs.scope_spans for span in ss.spans)
        return out

    def metric_names(self) -> set[str]:
        names = set()
        for path, _, body in self.requests:
            if path == "/v1/metrics":
                for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                    names.update(m.name for sm in rm.scope_metrics for m in sm.metrics)
        return names


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(x) for x in v.array_value.values)
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", r.handle)
    app.router.add_post("/v1/metrics", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}"
    try:
        yield r
    finally:
        await runner.cleanup()


async def test_spans_and_metrics_reach_an_otlp_http_receiver() -> None:
    async with receiver() as r:
        sink = OtelSink(
            exporter="otlp",
            endpoint=r.url,
            headers={"Authorization": "Basic cGs6c2s="},
            service_name="chat-api",
            read_pause=0,
        )
        async with Bus() as bus:
            bus.add_sink(sink)
            async with bus.stream(model="llama3", provider="ollama") as w:
                await w.delta("Hello")
                await w.end(usage=Usage(prompt_tokens=5, completion_tokens=1))
            async with bus.stream(model="llama3", provider="ollama") as w:
                await w.error("overloaded", "503 from upstream")
        # Leaving the bus tore the sink down: it flushed both providers before returning.
    [(resource, done), (_, failed)] = sorted(r.spans(), key=lambda rs: rs[1].start_time_unix_nano)
    assert resource["service.name"] == "chat-api"
    assert done.name == "chat llama3"
    assert done.kind == Span.SPAN_KIND_CLIENT
    attrs = attributes(done.attributes)
    assert attrs["gen_ai.provider.name"] == "ollama"
    assert attrs["gen_ai.usage.input_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert [e.name for e in done.events] == ["gen_ai.first_chunk"]
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert attributes(failed.attributes)["error.type"] == "overloaded"
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= r.metric_names()
    assert all(headers.get("Authorization") == "Basic cGs6c2s=" for _, headers, _ in r.requests)
    assert {path for path, _, _ in r.requests} == {"/v1/traces", "/v1/metrics"}
