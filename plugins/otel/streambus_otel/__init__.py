"""streambus-otel: OpenTelemetry traces and GenAI metrics for every stream on the bus.

- :class:`OtelSink` (entry point ``otel`` in ``streambus.sinks``): one span
  per stream, following the GenAI semantic conventions, and the GenAI client
  metrics;
- :func:`propagate_trace_context` (every stream) or :func:`inject_context`
  (one ``meta``): put the current span's W3C ``traceparent`` into a stream's
  ``start.meta``, so the stream's span joins the caller's trace on whichever
  host the sink runs.

See ``docs/plugins/otel.md``.
"""

from __future__ import annotations

from ._context import TRACE_KEYS, context_from_meta, inject_context, propagate_trace_context
from ._metrics import NEW_NAMES, OLD_NAMES
from ._sink import INSTRUMENTATION_NAME, SEMCONV_VERSION, OtelSink

__all__ = [
    "INSTRUMENTATION_NAME",
    "NEW_NAMES",
    "OLD_NAMES",
    "SEMCONV_VERSION",
    "TRACE_KEYS",
    "OtelSink",
    "context_from_meta",
    "inject_context",
    "propagate_trace_context",
]
