"""One span per stream, attribute by attribute against the GenAI semantic conventions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from streambus_otel import inject_context, propagate_trace_context

from streambus import (
    AbortEvent,
    Bus,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    StartEvent,
    Usage,
)

if TYPE_CHECKING:
    from conftest import Telemetry  # the `telemetry` fixture's type (conftest is not importable at run time)

pytestmark = pytest.mark.anyio

NS = 1_000_000_000


async def publish(bus: Bus, events: list[Event]) -> None:
    for event in events:
        await bus.publish(event)


def start(stream: str = "s1", ts: float = 1000.0, **meta: object) -> StartEvent:
    return StartEvent(stream=stream, seq=0, ts=ts, model="llama3", provider="ollama", meta=dict(meta))


async def test_a_finished_stream_is_one_span_with_the_conventions_attributes(telemetry: Telemetry) -> None:
    events: list[Event] = [
        start(upstream="http://gpu-1.internal:11434/api/chat", conversation_id="c-42"),
        DeltaEvent(stream="s1", seq=1, ts=1000.25, text="", channel="content"),  # empty: not a chunk
        DeltaEvent(stream="s1", seq=2, ts=1000.5, text="Let me think", channel="reasoning"),
        DeltaEvent(stream="s1", seq=3, ts=1000.75, text="Hello", channel="content"),
        DeltaEvent(stream="s1", seq=4, ts=1001.0, text=" world", channel="content"),
        EndEvent(stream="s1", seq=5, ts=1001.5, reason="length", usage=Usage(prompt_tokens=12, completion_tokens=3)),
    ]
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        await publish(bus, events)
    [span] = telemetry.spans()
    assert span.name == "chat llama3"
    assert span.kind is SpanKind.CLIENT
    assert span.parent is None
    assert span.start_time == 1000 * NS
    assert span.end_time == int(1001.5 * NS)
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3",
        "gen_ai.response.model": "llama3",
        "gen_ai.request.stream": True,
        "gen_ai.conversation.id": "c-42",
        "server.address": "gpu-1.internal",
        "server.port": 11434,
        "streambus.stream.id": "s1",
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
        "streambus.usage.source": "provider",
        "gen_ai.response.time_to_first_chunk": 0.5,
        "streambus.chunks": 3,
    }
    [first] = span.events
    assert first.name == "gen_ai.first_chunk"
    assert first.timestamp == int(1000.5 * NS)
    assert dict(first.attributes or {}) == {"gen_ai.response.time_to_first_chunk": 0.5}


async def test_cached_and_reasoning_tokens_are_set_when_known(telemetry: Telemetry) -> None:
    usage = Usage(
        prompt_tokens=100,
        completion_tokens=40,
        cached_input_tokens=64,
        cache_creation_input_tokens=8,
        reasoning_tokens=25,
    )
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        await publish(bus, [start(), EndEvent(stream="s1", seq=1, ts=1001.0, usage=usage)])
    [span] = telemetry.spans()
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 64
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 8
    assert attributes["gen_ai.usage.reasoning.output_tokens"] == 25


async def test_server_and_request_model_from_explicit_meta_keys(telemetry: Telemetry) -> None:
    events: list[Event] = [
        start(**{"server.address": "api.example.com", "server.port": 443, "request_model": "gpt-4o"}),
        EndEvent(stream="s1", seq=1, ts=1001.0),
    ]
    async with Bus() as bus:
        bus.add_sink(telemetry.sink(operation="text_completion"))
        await publish(bus, events)
    [span] = telemetry.spans()
    attrs = dict(span.attributes or {})
    assert span.name == "text_completion gpt-4o"
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.model"] == "gpt-4o"
    assert attrs["gen_ai.response.model"] == "llama3"
    assert (attrs["server.address"], attrs["server.port"]) == ("api.example.com", 443)
    assert "gen_ai.response.time_to_first_chunk" not in attrs  # no chunk came
    assert span.events == ()


async def test_an_error_ends_the_span_with_error_status_and_its_kind(telemetry: Telemetry) -> None:
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        with pytest.raises(RuntimeError):
            async with bus.stream(model="m", provider="openai") as w:
                await w.delta("partial")
                raise RuntimeError("upstream went away")
        async with bus.stream(model="m", provider="openai") as w:
            await w.error("rate_limited", "429 from upstream", retryable=True)
    crashed, limited = telemetry.spans()
    assert crashed.status.status_code is StatusCode.ERROR
    assert crashed.status.description == "RuntimeError: upstream went away"
    assert dict(crashed.attributes or {})["error.type"] == "exception"
    attrs = dict(limited.attributes or {})
    assert limited.status.status_code is StatusCode.ERROR
    assert limited.status.description == "429 from upstream"
    assert attrs["error.type"] == "rate_limited"
    assert attrs["streambus.error.retryable"] is True
    assert "gen_ai.response.finish_reasons" not in attrs
    durations = telemetry.metrics()["gen_ai.client.operation.duration"].data.data_points
    assert sorted(dict(p.attributes)["error.type"] for p in durations) == ["exception", "rate_limited"]


async def test_an_abort_records_who_aborted(telemetry: Telemetry) -> None:
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        sub = bus.subscribe()
        async with bus.stream(model="m", provider="p") as w:
            await w.delta("unsafe")
            assert bus.abort(w.stream, reason="policy violation", by="moderation")
            await anyio.lowlevel.checkpoint()  # the abort cancels the block here
            await w.delta("never published")
        abort = None
        async for event in sub:
            if isinstance(event, AbortEvent):
                abort = event
                break
    assert abort is not None
    [span] = telemetry.spans()
    attrs = dict(span.attributes or {})
    assert attrs["streambus.abort.by"] == "moderation"
    assert attrs["streambus.abort.reason"] == "policy violation"
    assert span.status.status_code is StatusCode.UNSET  # stopped on purpose, not failed
    assert [e.name for e in span.events] == ["gen_ai.first_chunk", "streambus.abort"]
    assert span.events[1].timestamp == int(abort.ts * NS)
    assert span.end_time == int(abort.ts * NS)


async def test_span_times_are_the_streams_even_when_the_sink_reads_late(telemetry: Telemetry) -> None:
    # Events an hour old (a Redis backlog, a replay): the span still covers the stream's own times.
    events: list[Event] = [
        start(ts=5000.0),
        DeltaEvent(stream="s1", seq=1, ts=5002.0, text="late"),
        ErrorEvent(stream="s1", seq=2, ts=5003.0, kind="timeout", message="no chunk in 30 s"),
    ]
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        await publish(bus, events)
    [span] = telemetry.spans()
    assert (span.start_time, span.end_time) == (5000 * NS, 5003 * NS)
    assert dict(span.attributes or {})["gen_ai.response.time_to_first_chunk"] == 2.0


async def test_a_stream_that_never_ends_still_ends_its_span_marked(telemetry: Telemetry) -> None:
    events: list[Event] = [start(ts=100.0), DeltaEvent(stream="s1", seq=1, ts=101.0, text="cut")]
    sink = telemetry.sink()
    async with Bus() as bus:
        bus.add_sink(sink)
        await publish(bus, events)  # no terminal event: the source of these events went away
    [span] = telemetry.spans()
    assert sink.open_streams == 0
    assert span.end_time == 101 * NS
    assert span.status.status_code is StatusCode.ERROR
    attrs = dict(span.attributes or {})
    assert attrs["streambus.incomplete"] is True
    assert attrs["error.type"] == "incomplete"


async def test_a_shutdown_abort_of_a_live_stream_ends_its_span(telemetry: Telemetry) -> None:
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        streaming = anyio.Event()

        async def producer() -> None:
            async with bus.stream(model="m", provider="p") as w:
                await w.delta("half")
                streaming.set()
                await anyio.sleep_forever()

        bus.start_soon(producer)
        await streaming.wait()
        await bus.shutdown()
    [span] = telemetry.spans()
    assert dict(span.attributes or {})["streambus.abort.by"] == "shutdown"


async def test_events_of_a_stream_started_before_the_sink_are_ignored(telemetry: Telemetry) -> None:
    async with Bus() as bus:
        await bus.publish(start(stream="early"))
        bus.add_sink(telemetry.sink())
        await publish(
            bus, [DeltaEvent(stream="early", seq=1, ts=1000.1, text="x"), EndEvent(stream="early", seq=2, ts=1000.2)]
        )
    assert telemetry.spans() == []


async def test_a_stream_started_inside_a_span_is_its_child(telemetry: Telemetry) -> None:
    tracer = telemetry.tracer_provider.get_tracer("app")
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        with tracer.start_as_current_span("POST /chat") as request:
            meta = inject_context({"user": "u1"})
            async with bus.stream(model="m", provider="p", meta=meta) as w:
                await w.delta("hi")
        async with bus.stream(model="m", provider="p", meta={"traceparent": "00-garbage-01"}) as w:
            await w.delta("no valid parent")
    assert meta["user"] == "u1"
    assert meta["traceparent"].startswith("00-")
    [stream_span, orphan] = telemetry.spans("chat")
    parent = request.get_span_context()
    assert stream_span.context is not None
    assert stream_span.context.trace_id == parent.trace_id
    assert stream_span.parent is not None
    assert stream_span.parent.span_id == parent.span_id
    assert orphan.parent is None
    assert orphan.context is not None
    assert orphan.context.trace_id != parent.trace_id


def test_inject_context_outside_a_span_changes_nothing() -> None:
    assert trace.get_current_span().get_span_context().is_valid is False
    assert inject_context({"traceparent": "stale", "user": "u1"}) == {"user": "u1"}
    assert inject_context() == {}


async def test_content_is_captured_only_when_asked(telemetry: Telemetry) -> None:
    events: list[Event] = [
        start(),
        DeltaEvent(stream="s1", seq=1, ts=1000.1, text="hmm", channel="reasoning"),
        DeltaEvent(stream="s1", seq=2, ts=1000.2, text='{"city":', channel="tool"),
        DeltaEvent(stream="s1", seq=3, ts=1000.3, text="Bonjour", channel="content"),
        DeltaEvent(stream="s1", seq=4, ts=1000.4, text=" à tous", channel="content"),
        EndEvent(stream="s1", seq=5, ts=1000.5),
    ]
    async with Bus() as bus:
        bus.add_sink(telemetry.sink())
        bus.add_sink(telemetry.sink(capture_content=True, operation="captured"))
        bus.add_sink(telemetry.sink(capture_content=True, max_content_chars=5, operation="cut"))
        await publish(bus, events)
    [plain] = telemetry.spans("chat")
    [captured] = telemetry.spans("captured")
    [cut] = telemetry.spans("cut")
    assert "gen_ai.output.messages" not in dict(plain.attributes or {})
    messages = orjson.loads(str(dict(captured.attributes or {})["gen_ai.output.messages"]))
    assert messages == [
        {
            "role": "assistant",
            "parts": [{"type": "reasoning", "content": "hmm"}, {"type": "text", "content": "Bonjour à tous"}],
            "finish_reason": "stop",
        }
    ]
    cut_attrs = dict(cut.attributes or {})
    assert orjson.loads(str(cut_attrs["gen_ai.output.messages"]))[0]["parts"] == [
        {"type": "reasoning", "content": "hmm"},
        {"type": "text", "content": "Bo"},
    ]
    assert cut_attrs["streambus.content_truncated"] is True


class Countdown:
    """A producer that knows nothing of tracing, like the built-in ones."""

    async def run(self, bus: Bus) -> None:
        async with bus.stream(model="countdown", provider="example", meta={"user": "u1"}) as w:
            await w.delta("3, 2, 1")


async def test_with_propagation_on_any_producer_started_inside_a_span_parents_its_stream(
    telemetry: Telemetry,
) -> None:
    tracer = telemetry.tracer_provider.get_tracer("app")
    stop = propagate_trace_context()
    try:
        async with Bus() as bus:
            bus.add_sink(telemetry.sink())
            with tracer.start_as_current_span("agent step") as step:
                bus.start_producer(Countdown())
            bus.start_producer(Countdown())  # outside any span: a root span
            with tracer.start_as_current_span("relay"):
                # A traceparent already in meta (relayed from elsewhere) is kept.
                relayed = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                async with bus.stream(model="m", meta={"traceparent": relayed}):
                    pass
    finally:
        stop()
    children = telemetry.spans("chat countdown")
    assert len(children) == 2
    [child] = [s for s in children if s.parent is not None]
    [root] = [s for s in children if s.parent is None]
    assert child.parent is not None
    assert child.parent.span_id == step.get_span_context().span_id
    assert root.context is not None
    assert root.context.trace_id != step.get_span_context().trace_id
    [kept] = telemetry.spans("chat m")
    assert kept.parent is not None
    assert f"{kept.parent.span_id:016x}" == "b7ad6b7169203331"
