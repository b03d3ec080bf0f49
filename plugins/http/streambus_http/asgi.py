"""ASGI building blocks: return a bus stream from a FastAPI / Starlette endpoint.

::

    from streambus_http.asgi import EventStreamResponse

    @app.get("/chat/{stream_id}/events")
    async def events(stream_id: str):
        return EventStreamResponse(app.state.hub, "sse", stream=stream_id)

The response is a Starlette ``Response`` (so FastAPI returns it as is) and a
plain ASGI app. It reads ``Last-Event-ID`` (or the ``last_event_id`` query
parameter) from the request itself, answers 404 / 400 / 409 / 204 before any
body when the stream is unknown, the resume id is malformed or evicted, or
the stream already ended at that id, ends cleanly when the client
disconnects, and works under asyncio and trio (it uses anyio only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import anyio
import structlog

try:
    from starlette.responses import Response
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised only without starlette
    raise ImportError(
        'streambus_http.asgi needs Starlette (FastAPI includes it): pip install "streambus-http[asgi]"'
    ) from exc

from streambus import Filter
from streambus.tokens import OPERATOR
from streambus.tokens import Scope as TokenScope

from ._errors import HttpStreamError
from ._formats import Encoder, FormatName, error_body, make_encoder
from ._hub import StreamHub
from ._serve import UNKNOWN_STREAM_TIMEOUT, body, open_stream

__all__ = [
    "EventStreamResponse",
    "ndjson_response",
    "openai_response",
    "sse_response",
    "text_response",
    "ui_message_response",
]

log = structlog.get_logger("streambus.http")


def _resume_from(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"last-event-id":
            text: str = value.decode("latin-1").strip()
            return text or None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("last_event_id")
    return values[0] if values else None


class EventStreamResponse(Response):
    """Stream one bus stream (``stream=``) or a filter over many (``filter=``) in *format*.

    :param hub: the :class:`~streambus_http.StreamHub` attached to the bus.
    :param format: ``sse``, ``text``, ``ndjson``, ``ui`` (Vercel AI SDK) or ``openai``.
    :param resume: an event id to resume after; by default the request's ``Last-Event-ID``.
    :param start_timeout: seconds to wait for a stream matching *filter* to start (then 404).
    :param unknown_stream_timeout: seconds to wait for a *stream* id the hub does not know (then 404).
    :param keepalive: seconds of silence before an SSE comment keeps proxies from closing.
    :param write_interval: seconds between writes, so tokens arriving meanwhile share one write (0: no wait).
    :param token_scope: what the request's scoped token covers (:class:`streambus.tokens.Scope`,
        from :meth:`streambus.tokens.Authenticator.authenticate`): a stream outside it gets 403 before
        any body, a filter is narrowed to it. The app authenticates; the default reads everything.
    :param format_options: passed to the format's encoder (e.g. ``include_usage=True``).
    """

    def __init__(
        self,
        hub: StreamHub,
        format: FormatName | str = "sse",
        *,
        stream: str | None = None,
        filter: Filter | None = None,
        resume: str | None = None,
        start_timeout: float = 30.0,
        unknown_stream_timeout: float = UNKNOWN_STREAM_TIMEOUT,
        keepalive: float = 15.0,
        write_interval: float = 0.005,
        headers: Mapping[str, str] | None = None,
        token_scope: TokenScope = OPERATOR,
        **format_options: Any,
    ) -> None:
        self.hub = hub
        self.token_scope = token_scope
        self.encoder = make_encoder(format, **format_options)
        self.stream = stream
        self.filter = filter
        self.resume = resume
        self.start_timeout = start_timeout
        self.unknown_stream_timeout = unknown_stream_timeout
        self.keepalive = keepalive
        self.write_interval = write_interval
        self.status_code = 200
        self.media_type = self.encoder.media_type
        self.background = None
        self.init_headers({**self.encoder.headers, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the stream until it ends, the bus closes or the client disconnects."""
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                opened = await open_stream(
                    self.hub,
                    self.encoder,
                    stream=self.stream,
                    filter=self.filter,
                    resume=self.resume or _resume_from(scope),
                    start_timeout=self.start_timeout,
                    unknown_stream_timeout=self.unknown_stream_timeout,
                    scope=self.token_scope,
                )
            except HttpStreamError as exc:
                await _send_error(send, exc, self.encoder)
                tg.cancel_scope.cancel()
                return
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in body(opened, keepalive=self.keepalive, write_interval=self.write_interval):
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                log.debug("http.client_gone", stream=self.stream)
            tg.cancel_scope.cancel()


async def _send_error(send: Send, exc: HttpStreamError, encoder: Encoder) -> None:
    body_bytes, headers = b"", []
    if exc.status != 204:
        content_type, body_bytes = error_body(encoder, exc.status, exc.message)
        headers = [(b"content-type", content_type.encode())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body_bytes, "more_body": False})


def sse_response(hub: StreamHub, **options: Any) -> EventStreamResponse:
    """Server-sent wire events with ``id: <stream>:<seq>`` (resumable with ``Last-Event-ID``)."""
    return EventStreamResponse(hub, "sse", **options)


def text_response(hub: StreamHub, **options: Any) -> EventStreamResponse:
    """Plain text chunks of the stream's content (a failure note at an abort or error)."""
    return EventStreamResponse(hub, "text", **options)


def ndjson_response(hub: StreamHub, **options: Any) -> EventStreamResponse:
    """One wire-form event per line."""
    return EventStreamResponse(hub, "ndjson", **options)


def ui_message_response(hub: StreamHub, **options: Any) -> EventStreamResponse:
    """The Vercel AI SDK UI message stream (v1) that ``useChat`` reads."""
    return EventStreamResponse(hub, "ui", **options)


def openai_response(hub: StreamHub, **options: Any) -> EventStreamResponse:
    """OpenAI-compatible ``chat.completion.chunk`` server-sent events."""
    return EventStreamResponse(hub, "openai", **options)
