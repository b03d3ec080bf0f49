"""The guarantees every sink keeps; the otel sink's text is read back from its spans' captured content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from streambus_otel import OtelSink

from streambus.contract import SinkContract


class TestOtelSinkContract(SinkContract):
    entry_point = "otel"

    def make_sink(self, tmp_path: Path) -> OtelSink:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        return OtelSink(tracer_provider=provider, capture_content=True, read_pause=0)

    def delivered_text(self, sink: Any, tmp_path: Path) -> dict[str, str]:
        result = {}
        for span in self.exporter.get_finished_spans():
            attrs = dict(span.attributes or {})
            [message] = orjson.loads(str(attrs["gen_ai.output.messages"]))
            text = "".join(part["content"] for part in message["parts"] if part["type"] == "text")
            result[str(attrs["streambus.stream.id"])] = text
        return result
