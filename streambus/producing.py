"""Helpers for writing producers that talk to model servers.

:class:`Failure` is what one request attempt ends with when it fails: a
stable ``kind`` (``connect``, ``http_status``, ``timeout``, ``truncated``...),
a message, whether retrying may help, and how long the server asked to wait
(``Retry-After``). :class:`RetryPolicy` decides when to try again
(exponential backoff with jitter, or the server's ``Retry-After``, on
tenacity); a producer retries a retryable failure only while it has
published no text, then turns the last one into the stream's ``error``
event (``writer.error(f.kind, f.message, retryable=f.retryable)``).
:func:`retry_after` reads a ``Retry-After`` header. :func:`require_asyncio` gives the clear error a
producer built on an asyncio-only library (aiohttp) owes a trio user.
:func:`stream_attempt` is one streamed HTTP request over aiohttp, with the
timeouts and failure kinds every streaming producer needs; the provider
supplies its sans-I/O parser and what to do with the pieces.
:func:`retrying_stream` runs one bus stream around such attempts: the retry
loop (only before the first delta) and the final ``error`` event.

The failure mapping is written once, here, and shared by the producers and
the proxy: :func:`status_failure` for an HTTP error answer,
:func:`stream_error_failure` for an error the server reports inside a stream.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
import orjson
import structlog
import tenacity

from .errors import AsyncioRequired, WireError
from .formats import EndPiece, ErrorPiece, Piece
from .plugins import NonNegativeFloat, NonNegativeInt, PositiveFloat, check_bounds

if TYPE_CHECKING:
    import aiohttp

    from .bus import Bus
    from .writer import StreamWriter

__all__ = [
    "Failure",
    "HttpProducerOptions",
    "ProducerOptions",
    "RetryPolicy",
    "StreamParser",
    "check_http_url",
    "check_messages",
    "error_message",
    "publish_pieces",
    "read_status_failure",
    "require_asyncio",
    "retry_after",
    "retrying_stream",
    "status_failure",
    "stream_attempt",
    "stream_error_failure",
]

log = structlog.get_logger("streambus.producing")

_ERROR_BODY_LIMIT = 64 * 1024


class ProducerOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The config keys every model producer shares: timeouts, retries and ``start`` tags.

    A producer's ``Options`` derives from this (or :class:`HttpProducerOptions`)
    and adds its provider's keys; a subclass may give a key another default.
    Every number is checked against its bounds when the options are built,
    from a config file or in Python alike (``nan``, ``inf`` and wrong signs are
    refused by name). A subclass that defines ``__post_init__`` calls
    ``super().__post_init__()`` first.
    """

    timeout: PositiveFloat = 60.0
    """Seconds allowed between two chunks once the stream has started."""
    first_chunk_timeout: PositiveFloat = 120.0
    """Seconds allowed from sending the request to the first chunk."""
    retries: NonNegativeInt = 2
    """Attempts after the first, only while no delta was published."""
    retry_backoff: NonNegativeFloat = 0.5
    """Seconds before the first retry (plus up to as much again of random jitter); doubles each time."""
    retry_max_wait: NonNegativeFloat = 30.0
    """The longest wait before a retry; a ``Retry-After`` asking for more ends the stream with the failure."""
    meta: dict[str, Any] = {}
    """Tags for the ``start`` event."""

    def __post_init__(self) -> None:
        check_bounds(self)


class HttpProducerOptions(ProducerOptions):
    """:class:`ProducerOptions` plus what a producer speaking HTTP to its server shares.

    ``base_url`` must be an ``http://`` or ``https://`` URL; ``api_key_env``,
    when given, must name an environment variable (the key itself is read when
    a request is sent, never stored or logged).
    """

    base_url: str = ""
    """The API root."""
    api_key_env: str | None = None
    """The environment variable holding the API key (never logged)."""
    headers: dict[str, str] = {}
    """Extra HTTP headers."""
    connect_timeout: PositiveFloat = 10.0
    """Seconds allowed to open the TCP connection."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_http_url("base_url", self.base_url)
        if self.api_key_env is not None and not self.api_key_env:
            raise ValueError("api_key_env: must name an environment variable (or be left out)")


def check_http_url(key: str, url: str) -> None:
    """Raise ``ValueError("key: ...")`` unless *url* is an ``http://`` or ``https://`` URL."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{key}: expected an http:// or https:// URL, got {url!r}")


def check_messages(
    messages: list[dict[str, Any]] | None,
    prompt: str | None,
    *,
    where: str = "",
    roles: str = "user or assistant",
) -> None:
    """Raise ``ValueError("messages...: ...")`` unless there is a prompt or a list of ``{role, ...}`` messages.

    *where* prefixes the key (``"requests[2]."``); *roles* names the roles
    the provider takes, for the message of a message without one.
    """
    if not messages and prompt is None:
        raise ValueError(f"{where}messages: required (or a prompt)")
    for j, message in enumerate(messages or []):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}messages[{j}].role: required ({roles})")


class Failure(msgspec.Struct, frozen=True):
    """Why one attempt failed: becomes the stream's ``error`` event unless retried."""

    kind: str
    message: str
    retryable: bool = False
    retry_after: float | None = None
    """Seconds the server asked to wait before trying again (``Retry-After`` on a 429 or 503), if it did."""


def retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header value asks for, in seconds.

    *value* is delta-seconds (``"120"``) or an HTTP date (``"Wed, 21 Oct 2026
    07:28:00 GMT"``, compared with *now*, default the wall clock; a date in the
    past gives ``0``). ``None`` when *value* is missing or neither form: then
    back off as usual.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryPolicy:
    """When to try a failed attempt again: exponential backoff with jitter, or what the server asked.

    Retry number *n* (1 for the first) waits ``backoff * 2**(n-1)`` plus a
    random jitter of up to ``backoff`` seconds (so clients that failed
    together do not come back together), at most ``max_wait``. A failure that
    carries :attr:`Failure.retry_after` (the server's ``Retry-After`` on a 429
    or 503) waits exactly that instead; one asking for more than ``max_wait``
    is not retried, and its message says how long the server asked for.
    ``retries`` is how many attempts follow the first (``None``: no limit).

    Built on tenacity, sleeping with ``sleep`` (:func:`anyio.sleep`), so it
    runs on asyncio and trio. Each wait is appended to :attr:`waits` before
    sleeping; a test can replace :attr:`sleep` to skip the waiting::

        policy = RetryPolicy(retries=2, backoff=0.5)
        failure = await policy.run(attempt, may_retry=lambda f: writer.seq == 0)
        if failure is not None:
            await writer.error(failure.kind, failure.message, retryable=failure.retryable)
    """

    def __init__(
        self,
        *,
        retries: int | None = 2,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if retries is not None and retries < 0:
            raise ValueError(f"retries: must be 0 or more, got {retries}")
        if not (backoff >= 0 and math.isfinite(backoff)):
            raise ValueError(f"backoff: must be 0 or more seconds, got {backoff}")
        if not (max_wait >= 0 and math.isfinite(max_wait)):
            raise ValueError(f"max_wait: must be 0 or more seconds, got {max_wait}")
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.sleep = sleep
        """How to wait (``anyio.sleep``)."""
        self.waits: deque[float] = deque(maxlen=100)
        """The waits requested, in seconds, newest last (the last 100)."""

    async def run(
        self,
        attempt: Callable[[], Awaitable[Failure | None]],
        *,
        may_retry: Callable[[Failure], bool] | None = None,
        on_retry: Callable[[Failure, float], object] | None = None,
    ) -> Failure | None:
        """Call *attempt* until it returns ``None`` (success) or a failure not to retry; return that.

        A failure is retried while it is ``retryable``, *may_retry* (if given)
        agrees, retries are left and any ``retry_after`` fits in ``max_wait``.
        *on_retry* is told each failure retried and the seconds it waits. An
        exception from *attempt* is not retried: it propagates.
        """
        # The first attempt runs alone; tenacity's machinery is built only once it failed, with
        # that failure as its first outcome. Built for every call, its objects are reference
        # cycles: a sink sending hundreds of batches a second kept CPython's cyclic collector
        # busy, with a full collection (25-30 ms, every event waits) every few seconds.
        first_outcome = await attempt()
        if first_outcome is None:
            return None
        first = [first_outcome]

        backoff = tenacity.wait_exponential(multiplier=self.backoff) + tenacity.wait_random(0, self.backoff)

        def retry(state: tenacity.RetryCallState) -> bool:
            outcome = state.outcome
            if outcome is None or outcome.failed:
                return False
            failure: Failure | None = outcome.result()
            if failure is None or not failure.retryable or (may_retry is not None and not may_retry(failure)):
                return False
            return failure.retry_after is None or failure.retry_after <= self.max_wait

        def wait(state: tenacity.RetryCallState) -> float:
            failure = state.outcome.result() if state.outcome is not None else None
            if failure is not None and failure.retry_after is not None:
                return float(failure.retry_after)
            return min(self.max_wait, float(backoff(state)))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None and state.next_action is not None:
                on_retry(state.outcome.result(), state.next_action.sleep)

        async def pause(seconds: float) -> None:
            self.waits.append(seconds)
            await self.sleep(seconds)

        async def call() -> Failure | None:
            return first.pop() if first else await attempt()

        retrying = tenacity.AsyncRetrying(
            sleep=pause,
            stop=tenacity.stop_never if self.retries is None else tenacity.stop_after_attempt(self.retries + 1),
            wait=wait,
            retry=retry,
            before_sleep=before_sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome is not None else None,
        )
        failure: Failure | None = await retrying(call)
        if failure is not None and failure.retry_after is not None and failure.retry_after > self.max_wait:
            asked = f"the server asked to wait {failure.retry_after:g} s, more than the {self.max_wait:g} s allowed"
            failure = msgspec.structs.replace(failure, message=f"{failure.message} ({asked})")
        return failure


def require_asyncio(plugin: str) -> None:
    """Raise :class:`~streambus.errors.AsyncioRequired` unless running on asyncio (aiohttp cannot run on trio)."""
    AsyncioRequired.check(f"the {plugin} producer", needs="aiohttp")


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
    *chunk_timeout*), what *status_failure* makes of a non-200 answer (with
    the ``Retry-After`` of a retryable 429 or 503 in ``retry_after``), ``truncated``
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
            refused = await status_failure(response, deadline)
            if response.status in (429, 503) and refused.retryable:
                wait = retry_after(response.headers.get("Retry-After"))
                refused = msgspec.structs.replace(refused, retry_after=wait)
            return refused
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
    retry_max_wait: float = 30.0,
    stream_ids: list[str] | None = None,
) -> None:
    """Run one bus stream: call *attempt* with its writer until it returns ``None``.

    *attempt* publishes deltas and the ``end`` itself and returns ``None``, or
    returns the :class:`Failure` that ended it. A retryable failure is tried
    again as :class:`RetryPolicy` says (backoff with jitter, or the server's
    ``Retry-After``), at most *retries* times and only while the stream has no
    delta (so no text is ever duplicated); the last failure becomes the
    stream's ``error`` event. The new stream's id is appended to *stream_ids*.
    """
    policy = RetryPolicy(retries=retries, backoff=retry_backoff, max_wait=retry_max_wait)
    async with bus.stream(model=model, provider=provider, meta=dict(meta)) as w:
        if stream_ids is not None:
            stream_ids.append(w.stream)

        def retrying(failure: Failure, delay: float) -> None:
            log.warning(
                "producer.retry",
                provider=provider,
                stream=w.stream,
                kind=failure.kind,
                error=failure.message,
                delay=delay,
            )

        failure = await policy.run(lambda: attempt(w), may_retry=lambda _: w.seq == 0, on_retry=retrying)
        if failure is not None:
            log.warning("producer.failed", provider=provider, stream=w.stream, kind=failure.kind, error=failure.message)
            await w.error(failure.kind, failure.message, retryable=failure.retryable)


def error_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of a provider's error *body*, else the body's first 500 characters as text.

    ``{"error": "..."}`` (Ollama); ``{"error": {"message", "code"}}`` (OpenAI);
    ``{"type": "error", "error": {"type", "message"}}`` (Anthropic: the code is
    the error type); ``{"error": {"code": 404, "message", "status"}}``, maybe
    inside a list (Gemini: the code is the status, ``NOT_FOUND``).
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, Mapping):
        error = obj.get("error")
        if isinstance(error, str):
            return error, None
        if isinstance(error, Mapping):
            code = error.get("code")
            message = error.get("message")
            text = message if isinstance(message, str) else orjson.dumps(error).decode()
            if not isinstance(code, str):
                if isinstance(error.get("status"), str):
                    code = error["status"]
                elif obj.get("type") == "error" and isinstance(error.get("type"), str):
                    code = error["type"]
            return text, str(code) if code is not None else None
    return body.decode("utf-8", "replace").strip()[:500], None


async def read_status_failure(response: aiohttp.ClientResponse, deadline: float) -> Failure:
    """The :func:`status_failure` of an HTTP error *response*, its body read (up to 64 KiB) before *deadline*.

    Pass it as :func:`stream_attempt`'s ``status_failure``; a body that does
    not arrive in time or breaks off leaves the status and reason to go by.
    """
    import aiohttp

    raw = b""
    with anyio.CancelScope(deadline=deadline):
        try:
            raw = await response.content.read(_ERROR_BODY_LIMIT)
        except aiohttp.ClientError:
            raw = b""
    return status_failure(response.status, raw, response.reason)


async def publish_pieces(pieces: Iterable[Piece], w: StreamWriter) -> Failure | None:
    """Publish a provider parser's :mod:`streambus.formats` pieces on *w*; pass it as :func:`stream_attempt`'s
    ``handle`` (``lambda pieces: publish_pieces(pieces, w)``).

    Text becomes deltas (choice 0), the :class:`~streambus.formats.EndPiece`
    the ``end`` event; an :class:`~streambus.formats.ErrorPiece` is returned
    as its :func:`stream_error_failure` (not published), so the caller's
    retry policy decides what becomes of it.
    """
    for piece in pieces:
        if isinstance(piece, EndPiece):
            await w.end(piece.reason, usage=piece.usage, timings=piece.timings)
            return None
        if isinstance(piece, ErrorPiece):
            return stream_error_failure(piece.message, piece.code, piece.retryable)
        if piece.choice == 0:
            await w.delta(piece.text, channel=piece.channel)
    return None


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
    missing = missing or code in ("not_found_error", "NOT_FOUND")
    detail = f" ({code})" if code else ""
    if code == "model_not_found" or (status == 404 and "model" in lowered and missing):
        return Failure("model_not_found", f"HTTP {status}{detail}: {message}")
    return Failure("http_status", f"HTTP {status}{detail}: {message}", status in (408, 409, 429) or status >= 500)


def stream_error_failure(message: str, code: str | None = None, retryable: bool = False) -> Failure:
    """The :class:`Failure` for an error the server reported inside its stream (an
    :class:`~streambus.formats.ErrorPiece`): kind ``upstream_error``, retryable
    only when the provider said so (the piece's ``retryable``)."""
    detail = f" ({code})" if code else ""
    return Failure("upstream_error", f"the server reported an error mid-stream{detail}: {message}", retryable)
