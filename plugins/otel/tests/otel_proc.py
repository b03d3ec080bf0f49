"""The producer process of the cross-process trace test.

``python otel_proc.py URL KEY``: inside a span "POST /chat", publish three
streams (ending by end, error and abort) through a RedisSink with the span's
trace context in ``start.meta``, then print the span's ids as one JSON line.
"""

from __future__ import annotations

import sys

import anyio
import orjson
from opentelemetry.sdk.trace import TracerProvider
from streambus_otel import inject_context
from streambus_redis import RedisSink

from streambus import Bus, Usage, configure_logging


async def produce(url: str, key: str) -> None:
    tracer = TracerProvider().get_tracer("producer")
    async with Bus() as bus:
        bus.add_sink(RedisSink(url=url, stream=key, batch_max_ms=1))
        with tracer.start_as_current_span("POST /chat") as request:
            meta = inject_context({"user": "u1"})
            async with bus.stream(model="llama3", provider="ollama", meta=meta) as w:
                await w.delta("Hello")
                await w.end(usage=Usage(prompt_tokens=3, completion_tokens=1))
            async with bus.stream(model="llama3", provider="ollama", meta=meta) as w:
                await w.error("overloaded", "503 from upstream", retryable=True)
            async with bus.stream(model="llama3", provider="ollama", meta=meta) as w:
                await w.delta("Sure, here")
                await w.abort("user pressed stop", by="client")
    ids = request.get_span_context()
    print(orjson.dumps({"trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}).decode(), flush=True)


if __name__ == "__main__":
    configure_logging("warning")  # to stderr: stdout carries the ids
    anyio.run(produce, sys.argv[1], sys.argv[2], backend="asyncio")
