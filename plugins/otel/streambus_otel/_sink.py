"""The ``otel`` sink: one OpenTelemetry span per stream, and the GenAI client metrics.

::

    from streambus_otel import OtelSink, inject_context

    async with Bus() as bus:
        bus.add_sink(OtelSink(exporter="otlp", endpoint="http://127.0.0.1:4318"))
        with tracer.start_as_current_span("handle request"):
            async with bus.stream(model="llama3", provider="ollama", meta=inject_context()) as w:
                ...

Spans follow the OpenTelemetry GenAI semantic conventions
(:data:`SEMCONV_VERSION`). Their start and end times are the ``ts`` of the
stream's ``start`` and terminal events (the producer's clock), so a span is
right however late the sink reads. The sink is backend-neutral (asyncio or
trio): the SDK exports from its own threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import anyio
import msgspec
import orjson
import structlog
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

from streambus.events import (
    AbortEvent,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
)
from streambus.plugins import PluginBase, install_hint
from streambus.subscription import Subscription

from ._context import context_from_meta
from ._metrics import GenAIMetrics

if TYPE_CHECKING:
    from streambus import Bus

__all__ = ["INSTRUMENTATION_NAME", "SEMCONV_VERSION", "OtelSink"]

log = structlog.get_logger("streambus.otel")

SEMCONV_VERSION: Final = "semantic-conventions-genai 0.1.0"
"""The GenAI semantic conventions followed: their own repository's first release, after they moved
out of the main semantic conventions (``gen_ai.provider.name``, not ``gen_ai.system`` of v1.36 and before)."""
INSTRUMENTATION_NAME: Final = "streambus_otel"
"""The tracer and meter name the sink's spans and metrics carry."""

_NS: Final = 1_000_000_000
_INCOMPLETE: Final = "incomplete"


class _Open:
    """What the sink keeps of a live stream until its terminal event."""

    __slots__ = ("attrs", "chars", "chunks", "first", "gaps", "last", "parts", "seen", "span", "start", "truncated")

    def __init__(
        self, span: Span, start: float, attrs: dict[str, AttributeValue], *, each_gap: bool, capture: bool
    ) -> None:
        self.span = span
        self.start = start
        self.attrs = attrs  # the metric attributes
        self.first: float | None = None  # the first output chunk's ts
        self.last = start  # the last output chunk's ts
        self.seen = start  # the last event's ts
        self.chunks = 0
        self.gaps: list[float] | None = [] if each_gap else None
        self.parts: dict[str, list[str]] | None = {} if capture else None
        self.chars = 0  # captured so far
        self.truncated = False


@dataclass
class _Owned:
    """Providers the sink built itself (exporter = "otlp"); it flushes and shuts them down."""

    tracer_provider: Any
    meter_provider: Any


class OtelSink(PluginBase):
    """Turns every stream into one OpenTelemetry span and records GenAI client metrics.

    With ``exporter = "global"`` (the default) spans and metrics go to the
    providers the application installed (``opentelemetry.trace.set_tracer_provider``);
    with ``exporter = "otlp"`` the sink builds its own and exports over
    OTLP/HTTP to ``endpoint`` (install the ``otlp`` extra). Code may pass
    ``tracer_provider`` / ``meter_provider`` directly instead.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``otel`` sink (see ``docs/plugins/otel.md``)."""

        exporter: Literal["global", "otlp"] = "global"
        """``global``: the application's providers; ``otlp``: the sink's own, exporting over OTLP/HTTP."""
        endpoint: str = "http://127.0.0.1:4318"
        """OTLP/HTTP base URL; traces go to ``/v1/traces``, metrics to ``/v1/metrics``."""
        headers: dict[str, str] = {}
        """Extra HTTP headers for the OTLP export (Langfuse: ``Authorization = "Basic ..."``)."""
        service_name: str = "streambus"
        """``service.name`` of the sink's own resource (``exporter = "otlp"``)."""
        operation: str = "chat"
        """``gen_ai.operation.name`` of every span (``chat``, ``text_completion``, ...)."""
        capture_content: bool = False
        """Record the generated text as ``gen_ai.output.messages`` (off: content is often private)."""
        max_content_chars: Annotated[int, msgspec.Meta(ge=1, le=16_777_216)] = 65_536
        """Characters of captured content kept per stream; the rest is cut and the span says so."""
        metrics: Literal["old", "new", "both"] = "new"
        """Metric names: ``new`` (the GenAI conventions), ``old`` (the stats sink's), or ``both``."""
        chunk_gaps: Literal["mean", "each", "off"] = "mean"
        """``time_per_output_chunk`` samples: each stream's mean gap (one sample), every gap, or none.

        ``each`` is what the conventions describe, but one histogram sample per token costs
        more than the rest of the sink together (docs/decisions.md)."""
        metric_interval: Annotated[float, msgspec.Meta(ge=0.1, le=86_400.0)] = 60.0
        """Seconds between OTLP metric exports (``exporter = "otlp"``)."""
        export_timeout: Annotated[float, msgspec.Meta(ge=0.1, le=600.0)] = 10.0
        """Seconds one OTLP export may take."""
        read_pause: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.02
        """Seconds to let events pile up between reads (0: read each at once); spans keep the events' times."""

        def __post_init__(self) -> None:
            url = urlsplit(self.endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"endpoint: expected an http:// or https:// URL with a host, got {self.endpoint!r}")
            if not self.operation:
                raise ValueError("operation: must not be empty (it is gen_ai.operation.name)")
            if not self.service_name:
                raise ValueError("service_name: must not be empty")

    overflow = "block"  # every delta, uncoalesced: chunk gaps and TTFT depend on it
    buffer = 65_536  # room for `read_pause` of events at ~1M events/s before the bus waits for the sink

    def __init__(
        self,
        options: Options | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        **keys: Any,
    ) -> None:
        self.options: OtelSink.Options = self.resolve_options(options, keys)
        self._owned: _Owned | None = None
        self._tracer: Tracer | None = None
        self._metrics: GenAIMetrics | None = None
        if tracer_provider is None and meter_provider is None and self.options.exporter == "otlp":
            _otlp_exporters()  # fail here, with the install line, not when the bus starts the sink
        else:
            self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(INSTRUMENTATION_NAME)
            meter = (meter_provider or metrics.get_meter_provider()).get_meter(INSTRUMENTATION_NAME)
            self._metrics = GenAIMetrics(meter, self.options.metrics)
        self._open: dict[str, _Open] = {}

    def _providers(self) -> tuple[Tracer, GenAIMetrics]:
        # The sink's own OTLP providers start export threads: built when the sink starts,
        # not when a config is merely checked (`streambus check` builds every plugin).
        if self._tracer is None or self._metrics is None:
            self._owned = _otlp_providers(self.options)
            self._tracer = self._owned.tracer_provider.get_tracer(INSTRUMENTATION_NAME)
            self._metrics = GenAIMetrics(
                self._owned.meter_provider.get_meter(INSTRUMENTATION_NAME), self.options.metrics
            )
        return self._tracer, self._metrics

    @property
    def open_streams(self) -> int:
        """How many streams have a span open (started, no terminal event yet)."""
        return len(self._open)

    async def run(self, events: Subscription) -> None:
        """Open a span at each ``start``, note chunks, end the span at the terminal event."""
        self._providers()
        live = self._open
        pause = self.options.read_pause
        while batch := await events.receive_batch():
            for event in batch:
                if type(event) is DeltaEvent:
                    # The hot path: a dict lookup and a few float operations.
                    state = live.get(event.stream)
                    if state is None or not event.text:
                        continue
                    if state.first is None:
                        state.first = event.ts
                        state.span.add_event(
                            "gen_ai.first_chunk",
                            {"gen_ai.response.time_to_first_chunk": event.ts - state.start},
                            timestamp=int(event.ts * _NS),
                        )
                    elif state.gaps is not None:
                        gap = (event.ts - state.last) / event.n  # a coalesced delta: n chunks, evenly spread
                        state.gaps.extend([gap] * event.n)
                    state.last = state.seen = event.ts
                    state.chunks += event.n
                    if state.parts is not None:
                        self._capture(state, event)
                else:
                    self._control(event)
            if pause:
                # Waking up per token costs more than the span work itself (one more task switch
                # per token on a per-user bus: bench/bench_otel.py); the times come from the events.
                await anyio.sleep(pause)

    async def teardown(self) -> None:
        """End the spans of streams that never ended (marked), then flush what the sink owns."""
        for stream in list(self._open):
            self._close_incomplete(stream)
        if self._owned is not None:
            owned, self._owned = self._owned, None
            self._tracer = self._metrics = None  # a next bus gets fresh providers
            await anyio.to_thread.run_sync(_shutdown, owned)

    async def setup(self, bus: Bus) -> None:
        """Build the sink's own OTLP providers (``exporter = "otlp"``); they export from their own threads."""
        self._providers()

    # -- per event -----------------------------------------------------------------
    def _control(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self._start(event)
            return
        state = self._open.get(event.stream)
        if state is None:
            return  # a stream that started before the sink subscribed
        state.seen = max(state.seen, event.ts)
        if isinstance(event, EndEvent | ErrorEvent | AbortEvent):
            del self._open[event.stream]
            self._finish(state, event)
        elif isinstance(event, ModerationEvent):
            state.span.add_event(
                "streambus.moderation",
                {
                    "streambus.moderation.action": event.action,
                    "streambus.moderation.verdict": event.verdict,
                    "streambus.moderation.categories": list(event.categories),
                },
                timestamp=int(event.ts * _NS),
            )

    def _start(self, event: StartEvent) -> None:
        if event.stream in self._open:
            self._close_incomplete(event.stream)  # a stream id reused: the old one is over
        meta = event.meta
        request_model = meta.get("request_model")
        request_model = request_model if isinstance(request_model, str) and request_model else event.model
        metric_attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": self.options.operation,
            "gen_ai.provider.name": event.provider or "unknown",
            "gen_ai.request.model": request_model,
        }
        if event.model:
            metric_attrs["gen_ai.response.model"] = event.model
        metric_attrs.update(_server(meta))
        attrs: dict[str, AttributeValue] = {
            **metric_attrs,
            "gen_ai.request.stream": True,
            "streambus.stream.id": event.stream,
        }
        for key in ("conversation_id", "conversation", "session"):
            if isinstance(value := meta.get(key), str) and value:
                attrs["gen_ai.conversation.id"] = value
                break
        parent: Context | None = context_from_meta(meta)
        name = f"{self.options.operation} {request_model}" if request_model else self.options.operation
        tracer, _ = self._providers()
        span = tracer.start_span(
            name,
            # An explicit empty context: without a traceparent the stream is a
            # root span, never a child of whatever runs the sink.
            context=parent if parent is not None else Context(),
            kind=SpanKind.CLIENT,
            attributes=attrs,
            start_time=int(event.ts * _NS),
        )
        self._open[event.stream] = _Open(
            span,
            event.ts,
            metric_attrs,
            each_gap=self.options.chunk_gaps == "each",
            capture=self.options.capture_content,
        )

    def _finish(self, state: _Open, event: EndEvent | ErrorEvent | AbortEvent) -> None:
        span = state.span
        input_tokens = output_tokens = None
        reason: str | None = None
        final: dict[str, AttributeValue] = {}  # set in one call: each set_attribute takes the span's lock
        if isinstance(event, EndEvent):
            reason = event.reason
            final["gen_ai.response.finish_reasons"] = [event.reason]
            if event.usage is not None:
                input_tokens, output_tokens = event.usage.prompt_tokens, event.usage.completion_tokens
                if input_tokens is not None:
                    final["gen_ai.usage.input_tokens"] = input_tokens
                if output_tokens is not None:
                    final["gen_ai.usage.output_tokens"] = output_tokens
                usage = event.usage
                for name, count in (
                    ("gen_ai.usage.cache_read.input_tokens", usage.cached_input_tokens),
                    ("gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_input_tokens),
                    ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens),
                ):
                    if count is not None:
                        final[name] = count
                final["streambus.usage.source"] = event.usage.source
        elif isinstance(event, ErrorEvent):
            state.attrs["error.type"] = event.kind
            final["error.type"] = event.kind
            final["streambus.error.retryable"] = event.retryable
            span.set_status(Status(StatusCode.ERROR, event.message or event.kind))
        else:
            final["streambus.abort.by"] = event.by
            final["streambus.abort.reason"] = event.reason
            span.add_event(
                "streambus.abort",
                {"streambus.abort.by": event.by, "streambus.abort.reason": event.reason},
                timestamp=int(event.ts * _NS),
            )
        self._end(state, event.ts, reason, input_tokens, output_tokens, final)

    def _close_incomplete(self, stream: str) -> None:
        state = self._open.pop(stream)
        state.attrs["error.type"] = _INCOMPLETE
        state.span.set_status(Status(StatusCode.ERROR, "the stream had no terminal event when the sink stopped"))
        final: dict[str, AttributeValue] = {"error.type": _INCOMPLETE, "streambus.incomplete": True}
        self._end(state, state.seen, None, None, None, final)

    def _end(
        self,
        state: _Open,
        end: float,
        reason: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
        final: dict[str, AttributeValue],
    ) -> None:
        span = state.span
        ttfc = None if state.first is None else state.first - state.start
        if ttfc is not None:
            final["gen_ai.response.time_to_first_chunk"] = ttfc
        final["streambus.chunks"] = state.chunks
        if state.parts is not None:
            final["gen_ai.output.messages"] = _output_messages(state.parts, reason)
            if state.truncated:
                final["streambus.content_truncated"] = True
        span.set_attributes(final)
        span.end(end_time=int(end * _NS))
        attrs = state.attrs
        _, recorder = self._providers()
        recorder.finished(
            attrs,
            duration=max(0.0, end - state.start),
            ttfc=ttfc,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        if state.gaps:
            recorder.chunk_gaps(state.gaps, attrs)
        elif self.options.chunk_gaps == "mean" and state.first is not None and state.chunks > 1:
            recorder.chunk_gaps([(state.last - state.first) / (state.chunks - 1)], attrs)

    def _capture(self, state: _Open, event: DeltaEvent) -> None:
        assert state.parts is not None
        if event.channel == "tool":
            return  # tool-call fragments have no name or id here: not a valid tool_call part
        room = self.options.max_content_chars - state.chars
        text = event.text
        if len(text) > room:
            text, state.truncated = text[: max(room, 0)], True
        if text:
            state.parts.setdefault(event.channel, []).append(text)
            state.chars += len(text)


def _server(meta: dict[str, Any]) -> dict[str, AttributeValue]:
    """``server.address``/``server.port`` from ``meta`` (those keys, or an ``upstream`` URL)."""
    address, port = meta.get("server.address"), meta.get("server.port")
    if not isinstance(address, str) and isinstance(upstream := meta.get("upstream"), str):
        try:
            url = urlsplit(upstream)
            address, port = url.hostname, url.port or {"http": 80, "https": 443}.get(url.scheme)
        except ValueError:  # a malformed URL (bad port) is a bad tag, not a reason to lose the span
            address = None
    result: dict[str, AttributeValue] = {}
    if isinstance(address, str) and address:
        result["server.address"] = address
        if isinstance(port, int) and not isinstance(port, bool):
            result["server.port"] = port
    return result


def _output_messages(parts: dict[str, list[str]], reason: str | None) -> str:
    """``gen_ai.output.messages``: one assistant message, reasoning part first (the conventions' JSON)."""
    message: dict[str, Any] = {"role": "assistant", "parts": []}
    for channel, kind in (("reasoning", "reasoning"), ("content", "text")):
        if channel in parts:
            message["parts"].append({"type": kind, "content": "".join(parts[channel])})
    if reason is not None:
        message["finish_reason"] = reason
    return orjson.dumps([message]).decode()


def _otlp_exporters() -> tuple[Any, Any]:
    """The OTLP/HTTP span and metric exporter classes, or an ImportError with the install line."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError(
            f"otel: exporter = 'otlp' needs the OTLP exporter: {install_hint('streambus-otel', 'otlp')}"
        ) from exc
    return OTLPSpanExporter, OTLPMetricExporter


def _otlp_providers(options: OtelSink.Options) -> _Owned:
    OTLPSpanExporter, OTLPMetricExporter = _otlp_exporters()
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    base = options.endpoint.rstrip("/")
    resource = Resource.create({"service.name": options.service_name})
    tracer_provider = SdkTracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=options.headers, timeout=options.export_timeout)
        )
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=options.headers, timeout=options.export_timeout),
        export_interval_millis=options.metric_interval * 1000,
    )
    meter_provider = SdkMeterProvider(resource=resource, metric_readers=[reader])
    return _Owned(tracer_provider, meter_provider)


def _shutdown(owned: _Owned) -> None:
    """Export what is batched, then stop the exporters' threads (blocking: run in a worker thread)."""
    owned.tracer_provider.force_flush()
    owned.tracer_provider.shutdown()
    owned.meter_provider.force_flush()
    owned.meter_provider.shutdown()
