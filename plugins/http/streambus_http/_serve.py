"""What every I/O layer shares: resolve a request to a cursor, then produce body bytes.

:func:`open_stream` does everything that may still fail with an HTTP status
(unknown stream, bad or evicted ``Last-Event-ID``) *before* the response
headers go out; :func:`body` then yields the encoded bytes until the stream
ends, the hub closes or the reader falls behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import anyio

from streambus import Filter
from streambus.tokens import OPERATOR, OutOfScope, Scope

from ._errors import HttpStreamError, ResumeError
from ._formats import Encoder, OpenAIChunkEncoder, SSEEncoder, make_encoder
from ._hub import Cursor, StreamHub, parse_event_id

__all__ = ["UNKNOWN_STREAM_TIMEOUT", "Opened", "body", "open_stream"]

UNKNOWN_STREAM_TIMEOUT = 3.0
"""Seconds a request naming a stream id the hub does not know waits for it, then 404."""


@dataclasses.dataclass
class Opened:
    """A request resolved to a cursor and an encoder, ready to stream."""

    cursor: Cursor
    encoder: Encoder
    stream: str | None
    """The stream served (``None`` for a filter over many streams)."""
    recovered: bool = True
    """False when a resume position was evicted (SSE then sends ``event: reset``)."""


async def open_stream(
    hub: StreamHub,
    fmt: str | Encoder,
    *,
    stream: str | None = None,
    filter: Filter | None = None,
    resume: str | None = None,
    start_timeout: float = 30.0,
    unknown_stream_timeout: float = UNKNOWN_STREAM_TIMEOUT,
    scope: Scope = OPERATOR,
    **format_options: Any,
) -> Opened:
    """Resolve what to serve; raise :class:`HttpStreamError` with the status to answer otherwise.

    *stream* serves one stream; *filter* serves every matching stream for
    ``sse``/``ndjson``, and the oldest live (or next) matching stream for the
    one-stream formats. *resume* is an event id ``<stream>:<seq>`` (the
    ``Last-Event-ID``): serve what follows it. A filter waits up to
    *start_timeout* seconds for a matching stream to start; a *stream* id the
    hub does not know waits *unknown_stream_timeout* seconds (the producer
    may not have started it yet), then 404.

    *scope* is what the request's token covers (:mod:`streambus.tokens`): a
    *filter* is narrowed to it, and a stream outside it (named, resumed or
    picked) is refused with 403 before any body.
    """
    encoder = make_encoder(fmt, **format_options) if isinstance(fmt, str) else fmt
    if stream is None and filter is None:
        filter = Filter()
    if not scope.unrestricted:
        try:
            if filter is not None:
                filter = scope.narrow(filter)
            if stream is not None:
                scope.check_ids([stream])
        except OutOfScope as exc:
            raise HttpStreamError(exc.message, status=403) from None
    sse = encoder if isinstance(encoder, SSEEncoder) else None
    resume = resume.strip() if resume else None
    if stream is None and encoder.single:
        assert filter is not None
        if resume:
            stream = parse_event_id(resume)[0]
        else:
            stream = await hub.wait_stream(flt=filter, max_wait=start_timeout)
    if stream is not None:
        after = -1
        if resume:
            resumed, after = parse_event_id(resume)
            if resumed != stream:
                raise ResumeError(f"Last-Event-ID {resume!r} names another stream than {stream!r}", status=400)
        if not hub.known(stream):
            await hub.consult_archive(stream)  # an edge that never saw it asks the engine (if the bus has one)
        await hub.wait_stream(stream, max_wait=unknown_stream_timeout)
        if not scope.unrestricted:
            # Judged on the stream's start: a resume id or a stream id may name any stream.
            known = hub.start_of(stream)
            try:
                if known is None:
                    raise OutOfScope(
                        f"the start of stream {stream[:64]!r} is unknown here, so its scope cannot be judged"
                    )
                scope.check_read(known)
            except OutOfScope as exc:
                raise HttpStreamError(exc.message, status=403) from None
        try:
            cursor = hub.stream_cursor(stream, after=after)
        except ResumeError as exc:
            if sse is None:
                raise
            sse.preamble = SSEEncoder.reset_frame(exc.message)
            cursor = hub.stream_cursor(stream, after=hub.last_seq(stream))
            return Opened(cursor, encoder, stream, recovered=False)
        if resume and hub.ended(stream) and after >= hub.last_seq(stream):
            raise HttpStreamError(f"stream {stream} already ended", status=204)
        start = hub.start_of(stream)
        if after >= 0 and start is not None and isinstance(encoder, OpenAIChunkEncoder):
            encoder.resume(start)
        return Opened(cursor, encoder, stream)
    assert filter is not None
    try:
        cursor = hub.filter_cursor(filter, resume=resume)
    except ResumeError as exc:
        if sse is None or exc.status != 409:
            raise
        sse.preamble = SSEEncoder.reset_frame(exc.message)
        return Opened(hub.filter_cursor(filter), encoder, None, recovered=False)
    return Opened(cursor, encoder, None)


async def body(
    opened: Opened, *, keepalive: float = 15.0, tick: float | None = None, write_interval: float = 0.005
) -> AsyncIterator[bytes]:
    """Yield the response body; an empty ``bytes`` marks an idle *tick* (a chance to check the client).

    Sends the format's keepalive (an SSE comment) after *keepalive* seconds of
    silence. After a write, waits *write_interval* seconds before the next one
    so that events arriving meanwhile go out in one write (the first event
    after a pause goes out at once; 0 writes every batch as it comes). Ends
    after the stream's terminal event (one stream), when the hub closes, or
    when the reader fell behind the bounded history.
    """
    encoder = opened.encoder
    cursor = opened.cursor
    tick = min(tick or keepalive, keepalive)
    hub = cursor.hub
    hub.readers += 1
    try:
        async for chunk in _body(encoder, cursor, opened.stream, keepalive, tick, write_interval):
            yield chunk
    finally:
        hub.readers -= 1
        cursor.close()


async def _body(
    encoder: Encoder, cursor: Cursor, stream: str | None, keepalive: float, tick: float, write_interval: float
) -> AsyncIterator[bytes]:
    head = encoder.begin()
    if head:
        yield head
    last = anyio.current_time()
    while True:
        batch = await cursor.next_batch(max_wait=tick)
        if batch:
            data = encoder.encode(batch)
            if data:
                last = anyio.current_time()
                yield data
                if write_interval > 0 and not cursor.done:
                    # Nagle-like: one syscall per window instead of one per token under load.
                    await anyio.sleep(write_interval)
            continue
        if cursor.done:
            if cursor.lost:
                tail = encoder.finish("lost")
            elif stream is not None and not cursor.complete:
                tail = encoder.finish("closed")
            else:
                tail = b""
            if tail:
                yield tail
            return
        now = anyio.current_time()
        if encoder.keepalive and now - last >= keepalive:
            last = now
            yield encoder.keepalive
        else:
            yield b""
