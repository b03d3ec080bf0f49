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

The failure mapping is written once, here, and shared by the producers and
the proxy: :func:`status_failure` for an HTTP error answer,
:func:`stream_error_failure` for an error the server reports inside a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
import orjson

from .errors import WireError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "Failure",
    "StreamParser",
    "error_message",
    "require_asyncio",
    "status_failure",
    "stream_attempt",
    "stream_error_failure",
]


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


def error_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of a provider's error *body*: ``{"error": "..."}`` (Ollama) or
    ``{"error": {"message", "code"}}`` (OpenAI); else the body's first 500 characters as text."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, Mapping):
        error = obj.get("error")
        if isinstance(error, str):
            return error, None
        if isinstance(error, Mapping):
            code = error.get("code")
            message = error.get("message")
            text = message if isinstance(message, str) else orjson.dumps(error).decode()
            return text, str(code) if code is not None else None
    return body.decode("utf-8", "replace").strip()[:500], None


def status_failure(status: int, body: bytes, reason: str | None = None) -> Failure:
    """The :class:`Failure` of an answer with HTTP *status* (400 or more) and error *body*.

    ``model_not_found`` when the provider says so (its code, or a 404 naming a
    missing model), else ``http_status``; retryable for 408, 409, 429 and 5xx.
    *reason* (the HTTP reason phrase) stands in for an empty body.
    """
    message, code = error_message(body)
    message = message or reason or ""
    lowered = message.lower()
    missing = "not found" in lowered or "does not exist" in lowered
    if code == "model_not_found" or (status == 404 and "model" in lowered and missing):
        return Failure("model_not_found", f"HTTP {status}: {message}")
    detail = f" ({code})" if code else ""
    return Failure("http_status", f"HTTP {status}{detail}: {message}", status in (408, 409, 429) or status >= 500)


def stream_error_failure(message: str, code: str | None = None) -> Failure:
    """The :class:`Failure` for an error the server reported inside its stream (an
    :class:`~streambus.formats.ErrorPiece`): kind ``upstream_error``, not retryable."""
    detail = f" ({code})" if code else ""
    return Failure("upstream_error", f"the server reported an error mid-stream{detail}: {message}")
