"""Helpers for writing producers that talk to model servers.

:class:`Failure` is what one request attempt ends with when it fails: a
stable ``kind`` (``connect``, ``http_status``, ``timeout``, ``truncated``...),
a message, and whether retrying may help. A producer retries a retryable
failure only while it has published no text, then turns the last one into
the stream's ``error`` event (``writer.error(f.kind, f.message,
retryable=f.retryable)``). :func:`require_asyncio` gives the clear error a
producer built on an asyncio-only library (aiohttp) owes a trio user.
:func:`stream_attempt` is one streamed HTTP request over aiohttp, with the
timeouts and failure kinds every streaming producer needs; the provider
supplies its sans-I/O parser and what to do with the pieces.
:func:`retrying_stream` runs one bus stream around such attempts: the retry
loop (only before the first delta) and the final ``error`` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
import structlog

from .errors import WireError

if TYPE_CHECKING:
    import aiohttp

    from .bus import Bus
    from .writer import StreamWriter

__all__ = ["Failure", "StreamParser", "require_asyncio", "retrying_stream", "stream_attempt"]

log = structlog.get_logger("streambus.producing")


class Failure(msgspec.Struct, frozen=True):
    """Why one attempt failed: becomes the stream's ``error`` event unless retried."""

    kind: str
    message: str
    retryable: bool = False


def require_asyncio(plugin: str) -> None:
    """Raise a clear error unless running on asyncio (aiohttp cannot run on trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"the {plugin} producer uses aiohttp, which runs only on asyncio: "
            "run the bus under asyncio (anyio.run(main, backend='asyncio'), or the streambus CLI)"
        ) from None


class StreamParser(Protocol):
    """A provider's sans-I/O stream parser: bytes in, pieces out."""

    @property
    def done(self) -> bool:
        """Whether the stream's final marker was seen."""

    def feed(self, data: bytes) -> Iterable[Any]:
        """Parse *data*; return the pieces it completed."""

    def close(self) -> Iterable[Any]:
        """End of input: return what is left, or raise :class:`~streambus.errors.WireError`."""


async def stream_attempt(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    parser: StreamParser,
    handle: Callable[[Iterable[Any]], Awaitable[Failure | None]],
    status_failure: Callable[[aiohttp.ClientResponse, float], Awaitable[Failure]],
    first_chunk_timeout: float,
    chunk_timeout: float,
    server: str,
    end_marker: str,
    unit: str,
) -> Failure | None:
    """POST *body* to *url* and feed the streamed answer through *parser* to *handle*.

    Returns ``None`` once the parser saw the end (*handle* published it), or
    the :class:`Failure` of this attempt: ``connect`` and ``timeout`` (the
    first chunk within *first_chunk_timeout*, each next one within
    *chunk_timeout*), what *status_failure* makes of a non-200 answer, ``truncated``
    (the body ended before *end_marker*, or inside a *unit*), ``malformed``,
    or what *handle* returned. A failed or aborted attempt closes the
    connection, which is how the server learns to stop generating.
    """
    import aiohttp

    deadline = anyio.current_time() + first_chunk_timeout
    try:
        with anyio.CancelScope(deadline=deadline) as scope:
            response = await session.post(url, data=body, headers=dict(headers))
        if scope.cancelled_caught:
            return Failure("timeout", f"no response within first_chunk_timeout={first_chunk_timeout}s", True)
    except aiohttp.ServerTimeoutError as exc:
        return Failure("timeout", f"timed out connecting to {server}: {exc}", True)
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        return Failure("connect", f"cannot reach {server}: {exc}", True)
    except aiohttp.ClientError as exc:
        return Failure("connect", f"request to {url} failed: {type(exc).__name__}: {exc}", True)
    clean = False
    eof = False
    try:
        if response.status != 200:
            return await status_failure(response, deadline)
        first = True
        while True:
            with anyio.CancelScope(deadline=deadline if first else anyio.current_time() + chunk_timeout) as scope:
                data = await response.content.readany()
            if scope.cancelled_caught:
                limit = f"first_chunk_timeout={first_chunk_timeout}s" if first else f"timeout={chunk_timeout}s"
                what = "the first chunk" if first else "the next chunk"
                return Failure("timeout", f"no data for {what} within {limit}", True)
            first = False
            eof = not data
            failure = await handle(parser.close() if eof else parser.feed(data))
            if failure is not None or parser.done:
                clean = failure is None
                return failure
            if eof:
                return Failure("truncated", f"the server closed the stream before {end_marker}", True)
    except WireError as exc:
        if eof:  # the last one was cut short by the end of the body
            return Failure("truncated", f"the stream ended inside {unit}: {exc}", True)
        return Failure("malformed", str(exc))
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        return Failure("truncated", f"the connection broke mid-stream: {type(exc).__name__}: {exc}", True)
    finally:
        # Closing (not releasing) drops the connection at once: that is how
        # an abort or a failure stops the server from generating.
        if clean:
            response.release()
        else:
            response.close()


async def retrying_stream(
    bus: Bus,
    attempt: Callable[[StreamWriter], Awaitable[Failure | None]],
    *,
    model: str,
    provider: str,
    meta: Mapping[str, Any],
    retries: int,
    retry_backoff: float,
    stream_ids: list[str] | None = None,
) -> None:
    """Run one bus stream: call *attempt* with its writer until it returns ``None``.

    *attempt* publishes deltas and the ``end`` itself and returns ``None``, or
    returns the :class:`Failure` that ended it. A retryable failure is tried
    again after ``retry_backoff * 2**n`` seconds, at most *retries* times and
    only while the stream has no delta (so no text is ever duplicated); the
    last failure becomes the stream's ``error`` event. The new stream's id is
    appended to *stream_ids*.
    """
    async with bus.stream(model=model, provider=provider, meta=dict(meta)) as w:
        if stream_ids is not None:
            stream_ids.append(w.stream)
        tries = 0
        while True:
            failure = await attempt(w)
            if failure is None:
                return
            if failure.retryable and tries < retries and w.seq == 0:
                delay = retry_backoff * 2**tries
                tries += 1
                log.warning(
                    "producer.retry",
                    provider=provider,
                    stream=w.stream,
                    kind=failure.kind,
                    error=failure.message,
                    delay=delay,
                )
                await anyio.sleep(delay)
                continue
            log.warning("producer.failed", provider=provider, stream=w.stream, kind=failure.kind, error=failure.message)
            await w.error(failure.kind, failure.message, retryable=failure.retryable)
            return
