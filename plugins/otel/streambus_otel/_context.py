"""W3C trace context in a stream's ``start.meta``, so a stream's span joins its producer's trace.

With :func:`propagate_trace_context` on, every stream started inside a span
(by any producer, built-in ones included) gets that span's context; a
caller may also pass its meta through :func:`inject_context`. The ``start`` event then
carries ``traceparent`` (and ``tracestate``) as plain strings, which survive
the wire format, recordings and Redis. The otel sink reads them back with
:func:`context_from_meta` and parents the stream's span on them, on whatever
host the sink runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streambus.hooks import add_start_hook

__all__ = ["TRACE_KEYS", "context_from_meta", "inject_context", "propagate_trace_context"]

TRACE_KEYS: Final = ("traceparent", "tracestate")
"""The ``start.meta`` keys that carry the W3C trace context."""

# Always W3C trace context, whatever the application's global propagator is:
# the keys in `meta` are fixed, so both ends must agree without configuration.
_propagator: Final = TraceContextTextMapPropagator()


def inject_context(meta: Mapping[str, Any] | None = None, *, context: Context | None = None) -> dict[str, Any]:
    """Return a copy of *meta* with the current span's ``traceparent``/``tracestate`` added.

    Use it where a stream starts::

        with tracer.start_as_current_span("handle request"):
            async with bus.stream(model="llama3", meta=inject_context({"user": "u1"})) as w:
                ...

    Outside any valid span (or with a non-recording, invalid context) the
    copy is returned unchanged. Keys already present in *meta* are replaced,
    so a stream always names the span it was started in. *context* defaults
    to the current one.
    """
    result = dict(meta or {})
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    for key in TRACE_KEYS:
        result.pop(key, None)
    result.update(carrier)
    return result


def context_from_meta(meta: Mapping[str, Any]) -> Context | None:
    """The parent context a ``start.meta`` names, or ``None`` when it names no valid span.

    Values that are not strings, or a malformed ``traceparent``, are ignored
    (the stream's span becomes a root span) rather than raising: a producer's
    bad tag must not cost the stream its trace.
    """
    carrier = {key: value for key in TRACE_KEYS if isinstance(value := meta.get(key), str)}
    if "traceparent" not in carrier:
        return None
    context = _propagator.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def _inject_hook(meta: dict[str, Any]) -> None:
    if "traceparent" in meta:
        return  # the producer named a parent itself (inject_context, or a stream relayed from elsewhere)
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    meta.update(carrier)


def propagate_trace_context() -> Callable[[], None]:
    """Put the current span's ``traceparent`` into every stream started inside a span, from now on.

    Call it once at start-up, in the process whose producers run inside
    spans (the one handling requests); the otel sink may run elsewhere.
    A ``traceparent`` the producer already put in ``meta`` is kept. Returns
    the function that turns it off again. Process-wide (a
    :func:`streambus.hooks.add_start_hook` hook).
    """
    return add_start_hook(_inject_hook)
