"""The stream writer: how producers put one model response on the bus.

::

    async with bus.stream(model="llama3", provider="ollama") as w:
        async for chunk in model_output:
            await w.delta(chunk)
        await w.end(reason="stop", usage=Usage(completion_tokens=42))

The writer numbers ``seq`` (0 for ``start``, +1 for every later event),
stamps ``ts``, and guarantees exactly one terminal event:

- leaving the block normally without calling :meth:`StreamWriter.end`,
  :meth:`~StreamWriter.error` or :meth:`~StreamWriter.abort` publishes
  ``end(reason="stop")``;
- an exception inside the block publishes ``error(kind="exception")`` and
  propagates;
- :meth:`Bus.abort <streambus.Bus.abort>` cancels the block and publishes
  ``abort`` with the reason and ``by`` it was given (the block is exited
  quietly);
- any other cancellation publishes ``abort(by="cancelled")`` and propagates.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from .errors import StreamBusError, StreamClosed
from .events import (
    AbortEvent,
    Channel,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
    Usage,
)
from .hooks import run_start_hooks
from .subscription import Firehose, StreamRoute

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["StreamWriter", "new_stream_id"]


_UNROUTED = StreamRoute(Firehose())  # a writer's route until its start is published: never current
_UNROUTED.current = False


def new_stream_id() -> str:
    """Return a new unique, URL-safe, roughly time-ordered stream id."""
    return f"{time.time_ns() // 1_000_000:011x}-{secrets.token_hex(5)}"


class StreamWriter:
    """Publishes the events of one stream; use it as an async context manager.

    Obtain one from :meth:`Bus.stream <streambus.Bus.stream>`.
    """

    __slots__ = (
        "_abort",
        "_bus",
        "_route",
        "_scope",
        "_seq",
        "_terminal",
        "meta",
        "model",
        "provider",
        "stream",
    )

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str | None = None,
        model: str = "",
        provider: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._bus = bus
        self.stream = stream or new_stream_id()
        self.model = model
        self.provider = provider
        self.meta = dict(meta or {})
        self._seq = -1
        self._terminal: Event | None = None
        self._abort: tuple[str, str] | None = None
        self._scope: anyio.CancelScope | None = None
        self._route = _UNROUTED  # its stream's route, from the bus once the start is published

    @property
    def seq(self) -> int:
        """The seq of the last event written (-1 before ``start``)."""
        return self._seq

    @property
    def finished(self) -> bool:
        """Whether the terminal event was published."""
        return self._terminal is not None

    @property
    def terminal(self) -> Event | None:
        """The terminal event, once published."""
        return self._terminal

    def _next(self) -> int:
        if self._terminal is not None:
            raise StreamClosed(f"stream {self.stream} already ended with {type(self._terminal).__name__}")
        self._seq += 1
        return self._seq

    async def __aenter__(self) -> StreamWriter:
        self._scope = anyio.CancelScope()
        self._scope.__enter__()
        try:
            self._bus.register_writer(self)
            run_start_hooks(self.meta)
            await self._bus.publish(
                StartEvent(
                    stream=self.stream,
                    seq=self._next(),
                    ts=time.time(),
                    model=self.model,
                    provider=self.provider,
                    meta=self.meta,
                )
            )
            self._route = self._bus.route(self.stream)
        except BaseException:
            self._scope.__exit__(None, None, None)
            self._bus.unregister_writer(self)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._scope is not None
        scope = self._scope
        try:
            if self._terminal is None:
                wait = self._bus.offer(self._closing_event(exc, scope))
                if wait is not None:  # a full ``block`` subscriber: wait for room, even while cancelled
                    with anyio.CancelScope(shield=True):
                        await wait
        finally:
            self._bus.unregister_writer(self)
            swallowed = scope.__exit__(exc_type, exc, tb)
        return bool(swallowed)

    def _closing_event(self, exc: BaseException | None, scope: anyio.CancelScope) -> Event:
        # The terminal event that leaving the block publishes (see the module docstring).
        # Built here, and offered without a shielding scope unless the publisher
        # must wait: a scope per stream was a third of a short stream's overhead.
        if exc is None:
            return self._end_event("stop", None, None)
        if self._abort is not None and scope.cancel_called:
            reason, by = self._abort
            return self._abort_event(reason, by)
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return self._abort_event("cancelled", "cancelled")
        if isinstance(exc, Exception):
            return self._error_event("exception", f"{type(exc).__name__}: {exc}", False)
        return self._abort_event(type(exc).__name__, "shutdown")

    async def delta(self, text: str, channel: Channel = "content") -> None:
        """Publish a piece of text on *channel* (``content``, ``reasoning``, ``tool``)."""
        if self._terminal is not None:
            self._next()  # raises StreamClosed
        route = self._route
        if not route.current:  # a stage was interposed, or the bus is stopping (or the block was not entered)
            if self._scope is None:
                raise StreamBusError(
                    f"stream {self.stream!r} is not open: write inside `async with bus.stream() as w:`"
                )
            route = self._route = self._bus.route(self.stream)
        self._seq = seq = self._seq + 1  # what _next() does, without a call per token (after anything that raises)
        # Offered to the stream's route: no look-up of the stream per token (docs/decisions.md).
        wait = route.offer(DeltaEvent(stream=self.stream, seq=seq, ts=time.time(), text=text, channel=channel))
        if wait is not None:  # a full ``block`` subscriber: wait for room
            await wait

    async def moderation(
        self,
        *,
        action: str,
        start: int,
        end: int,
        verdict: str = "flagged",
        categories: list[str] | None = None,
        channel: Channel = "content",
    ) -> None:
        """Publish a moderation verdict about characters ``[start, end)`` of *channel*."""
        await self._bus.publish(
            ModerationEvent(
                stream=self.stream,
                seq=self._next(),
                ts=time.time(),
                verdict=verdict,
                categories=list(categories or []),
                action=action,  # type: ignore[arg-type]
                start=start,
                end=end,
                channel=channel,
            )
        )

    async def end(
        self,
        reason: str = "stop",
        usage: Usage | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> None:
        """Publish the normal end of the stream (its terminal event)."""
        await self._bus.publish(self._end_event(reason, usage, timings))

    async def error(self, kind: str, message: str = "", *, retryable: bool = False) -> None:
        """Publish an ``error`` terminal event with a stable machine-readable *kind*."""
        await self._bus.publish(self._error_event(kind, message, retryable))

    async def abort(self, reason: str = "", by: str = "client") -> None:
        """Publish an ``abort`` terminal event from inside the producer."""
        await self._bus.publish(self._abort_event(reason, by))

    def _end_event(self, reason: str, usage: Usage | None, timings: Mapping[str, float] | None) -> EndEvent:
        event = EndEvent(
            stream=self.stream,
            seq=self._next(),
            ts=time.time(),
            reason=reason,
            usage=usage,
            timings=dict(timings or {}),
        )
        self._terminal = event
        return event

    def _error_event(self, kind: str, message: str, retryable: bool) -> ErrorEvent:
        event = ErrorEvent(
            stream=self.stream, seq=self._next(), ts=time.time(), kind=kind, message=message, retryable=retryable
        )
        self._terminal = event
        return event

    def _abort_event(self, reason: str, by: str) -> AbortEvent:
        event = AbortEvent(stream=self.stream, seq=self._next(), ts=time.time(), reason=reason, by=by)
        self._terminal = event
        return event

    def request_abort(self, reason: str, by: str) -> bool:
        """Abort this stream from outside its producer: what :meth:`Bus.abort <streambus.Bus.abort>` does.

        Cancels the writer's block, which then publishes ``abort`` with
        *reason* and *by*. Returns False if the stream already ended or its
        block was not entered.
        """
        if self._terminal is not None or self._scope is None:
            return False
        if self._abort is None:
            self._abort = (reason, by)
        self._scope.cancel()
        return True
