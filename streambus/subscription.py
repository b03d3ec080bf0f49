"""Subscriptions: a bounded per-subscriber buffer with an overflow policy.

A :class:`Subscription` is what :meth:`Bus.subscribe <streambus.Bus.subscribe>`
returns and what a sink's ``run`` receives. Read it with ``async for``, or
:meth:`Subscription.receive_batch` to take everything buffered at once (the
fast path for sinks that write in batches), or :meth:`Subscription.text` to
read the text of one stream.

Overflow policies (what happens when the buffer is full):

``block``
    Lossless: the publisher waits for room. Use it for recorders and stats.
``coalesce`` (default)
    A new ``delta`` merges into the subscriber's last buffered delta of the
    same stream and channel (text concatenated, ``n`` summed), so a slow
    reader gets bigger chunks but never loses a character. Control events are
    never merged or dropped. Past ``max_bytes`` of buffered text the
    subscriber is closed with :class:`~streambus.errors.Overflowed`.
``drop_oldest``
    Lossy: the oldest buffered ``delta`` is dropped; the gap shows in ``seq``.
``disconnect``
    The subscriber is closed with :class:`~streambus.errors.Overflowed`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgspec

from .errors import Overflowed, StreamBusError, SubscriptionClosed
from .events import DeltaEvent, Event, StartEvent, is_terminal

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["Filter", "OverflowPolicy", "StreamFailed", "Subscription"]

_CONTROL_SIZE = 256
_DELTA_OVERHEAD = 64
_YIELD_EVERY = 256


class OverflowPolicy(enum.Enum):
    """What a full subscription buffer does with the next event."""

    BLOCK = "block"
    COALESCE = "coalesce"
    DROP_OLDEST = "drop_oldest"
    DISCONNECT = "disconnect"

    @classmethod
    def parse(cls, value: OverflowPolicy | str) -> OverflowPolicy:
        """Accept a policy or its name; raise ``ValueError`` naming the choices."""
        if isinstance(value, OverflowPolicy):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown overflow policy {value!r}; expected one of {choices}") from None


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    """Which streams a subscriber wants. Empty fields match everything.

    ``meta`` maps a tag to a value, or a list of accepted values, that the
    stream's ``start.meta`` must carry. All given fields must match.
    """

    streams: frozenset[str] | None = None
    models: frozenset[str] | None = None
    providers: frozenset[str] | None = None
    meta: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        *,
        streams: Iterable[str] | str | None = None,
        models: Iterable[str] | str | None = None,
        providers: Iterable[str] | str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Filter:
        """Build a filter from strings or iterables of strings."""

        def norm(v: Iterable[str] | str | None) -> frozenset[str] | None:
            if v is None:
                return None
            return frozenset([v]) if isinstance(v, str) else frozenset(v)

        return cls(
            streams=norm(streams),
            models=norm(models),
            providers=norm(providers),
            meta=dict(meta) if meta else None,
        )

    @property
    def matches_all(self) -> bool:
        """Whether this filter lets every stream through."""
        return not (self.streams or self.models or self.providers or self.meta)

    def matches(self, start: StartEvent) -> bool:
        """Return whether the stream opened by *start* passes this filter."""
        if self.streams is not None and start.stream not in self.streams:
            return False
        if self.models is not None and start.model not in self.models:
            return False
        if self.providers is not None and start.provider not in self.providers:
            return False
        if self.meta:
            for key, want in self.meta.items():
                have = start.meta.get(key)
                if isinstance(want, list | tuple | set | frozenset):
                    if have not in want:
                        return False
                elif have != want:
                    return False
        return True


class StreamFailed(StreamBusError):
    """Raised by :meth:`Subscription.text` when the stream ends in ``error`` or ``abort``.

    ``event`` is the terminal event; the text before it was already yielded.
    """

    def __init__(self, event: Event) -> None:
        detail = getattr(event, "message", "") or getattr(event, "reason", "")
        super().__init__(f"stream {event.stream} ended with {type(event).__name__}: {detail}")
        self.event = event


class _Merged:
    """A delta being coalesced; materialised into a DeltaEvent when read.

    Pieces are kept in a list so merging stays O(1) however far the reader lags.
    """

    __slots__ = ("channel", "first_seq", "n", "pieces", "seq", "stream", "ts")

    def __init__(self, first: DeltaEvent) -> None:
        self.stream = first.stream
        self.channel = first.channel
        self.first_seq = first.seq if first.first_seq is None else first.first_seq
        self.seq = first.seq
        self.ts = first.ts
        self.n = first.n
        self.pieces = [first.text]

    def add(self, delta: DeltaEvent) -> None:
        self.pieces.append(delta.text)
        self.seq = delta.seq
        self.ts = delta.ts
        self.n += delta.n

    def event(self) -> DeltaEvent:
        return DeltaEvent(
            stream=self.stream,
            seq=self.seq,
            ts=self.ts,
            text="".join(self.pieces),
            channel=self.channel,
            n=self.n,
            first_seq=self.first_seq,
        )


def _size(item: Event | _Merged) -> int:
    if type(item) is DeltaEvent:
        return len(item.text) + _DELTA_OVERHEAD
    if type(item) is _Merged:
        return sum(map(len, item.pieces)) + _DELTA_OVERHEAD
    return _CONTROL_SIZE


class Subscription:
    """A subscriber's bounded buffer of events, read as an async iterator.

    Created by :meth:`Bus.subscribe <streambus.Bus.subscribe>`; do not build
    it directly. Iteration ends when the bus closes the subscription cleanly
    (after everything buffered was read); it raises
    :class:`~streambus.errors.Overflowed` when the reader fell behind past its
    policy. Use ``async with`` (or :meth:`close`) to unsubscribe.
    """

    __slots__ = (
        "_all",
        "_buf",
        "_bus",
        "_bytes",
        "_closed",
        "_error",
        "_policy",
        "_since_yield",
        "_space_waiter",
        "_streams",
        "_waiter",
        "buffer",
        "dropped",
        "filter",
        "max_bytes",
        "name",
        "raw",
    )

    def __init__(
        self,
        bus: Bus | None,
        filter: Filter,
        *,
        buffer: int,
        overflow: OverflowPolicy,
        max_bytes: int,
        name: str,
        raw: bool = False,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self._bus = bus
        self.filter = filter
        self.buffer = buffer
        self.max_bytes = max_bytes
        self.name = name
        self.raw = raw
        self.dropped = 0
        """How many events ``drop_oldest`` discarded."""
        self._policy = overflow
        self._all = filter.matches_all
        self._streams: set[str] = set()
        self._buf: deque[Event | _Merged] = deque()
        self._bytes = 0
        self._closed = False
        self._error: SubscriptionClosed | None = None
        self._waiter: anyio.Event | None = None
        self._space_waiter: anyio.Event | None = None
        self._since_yield = 0

    # -- publisher side -------------------------------------------------
    @property
    def overflow(self) -> OverflowPolicy:
        """This subscriber's overflow policy."""
        return self._policy

    @property
    def closed(self) -> bool:
        """Whether the subscription was closed (it may still hold buffered events)."""
        return self._closed

    @property
    def pending(self) -> int:
        """How many items are buffered and not yet read."""
        return len(self._buf)

    def _wants(self, event: Event) -> bool:
        return self._all or event.stream in self._streams

    def _offer(self, event: Event) -> bool:
        """Buffer *event*; return False only if a ``block`` subscriber is full."""
        if self._closed:
            return True
        buf = self._buf
        if len(buf) < self.buffer:
            buf.append(event)
            if self._policy is OverflowPolicy.COALESCE:
                self._bytes += _size(event)
                if self._bytes > self.max_bytes:
                    self._overflow(f"buffered more than {self.max_bytes} bytes")
                    return True
            waiter = self._waiter
            if waiter is not None:
                self._waiter = None
                waiter.set()
            return True
        return self._full(event)

    def _full(self, event: Event) -> bool:
        policy = self._policy
        if policy is OverflowPolicy.BLOCK:
            return False
        if policy is OverflowPolicy.DISCONNECT:
            self._overflow(f"buffer of {self.buffer} events full")
            return True
        buf = self._buf
        if policy is OverflowPolicy.COALESCE:
            if type(event) is DeltaEvent:
                merged = self._merge(event)
                if merged:
                    self._bytes += len(event.text)
                    if self._bytes > self.max_bytes:
                        self._overflow(f"buffered more than {self.max_bytes} bytes")
                    return True
            # Not mergeable (control event, or the stream's last buffered item
            # is not a delta of this channel): keep it anyway; the byte cap bounds memory.
            buf.append(event)
            self._bytes += _size(event)
            if self._bytes > self.max_bytes:
                self._overflow(f"buffered more than {self.max_bytes} bytes")
            return True
        # DROP_OLDEST: drop the oldest delta; control events are kept so streams stay well formed.
        for i, item in enumerate(buf):
            if type(item) is not DeltaEvent and type(item) is not _Merged:
                continue
            del buf[i]
            self.dropped += 1
            break
        buf.append(event)
        return True

    def _merge(self, delta: DeltaEvent) -> bool:
        buf = self._buf
        stream = delta.stream
        # Scan from the newest item for the last one of this stream: merging
        # past an event of the same stream would reorder that stream.
        for i in range(len(buf) - 1, -1, -1):
            item = buf[i]
            if item.stream != stream:
                continue
            if type(item) is _Merged:
                if item.channel != delta.channel:
                    return False
                item.add(delta)
                return True
            if type(item) is DeltaEvent:
                if item.channel != delta.channel:
                    return False
                merged = _Merged(item)
                merged.add(delta)
                buf[i] = merged
                return True
            return False
        return False

    def _overflow(self, why: str) -> None:
        self._buf.clear()
        self._bytes = 0
        self._close(Overflowed(f"subscription {self.name!r} overflowed ({self._policy.value}): {why}"))

    def _close(self, error: SubscriptionClosed | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        if self._bus is not None:
            self._bus._forget(self)
        for attr in ("_waiter", "_space_waiter"):
            waiter = getattr(self, attr)
            if waiter is not None:
                setattr(self, attr, None)
                waiter.set()

    async def _wait_space(self) -> None:
        # Several publishers may wait on one full subscriber: they share one
        # event, and each re-checks for room after waking.
        while len(self._buf) >= self.buffer and not self._closed:
            waiter = self._space_waiter
            if waiter is None:
                waiter = self._space_waiter = anyio.Event()
            await waiter.wait()

    # -- reader side ----------------------------------------------------
    def close(self) -> None:
        """Unsubscribe: nothing more is buffered, iteration ends after the buffer."""
        self._close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def __aiter__(self) -> Subscription:
        return self

    async def _wait(self) -> None:
        while not self._buf:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = anyio.Event()
            await waiter.wait()
        self._since_yield = 0

    def _popped(self, n: int, size: int) -> None:
        if self._policy is OverflowPolicy.COALESCE:
            self._bytes -= size
        waiter = self._space_waiter
        if waiter is not None:
            self._space_waiter = None
            waiter.set()

    async def __anext__(self) -> Event:
        if not self._buf:
            await self._wait()
        else:
            self._since_yield += 1
            if self._since_yield >= _YIELD_EVERY:
                # A reader that never finds its buffer empty would never yield.
                self._since_yield = 0
                await anyio.lowlevel.checkpoint()
                if not self._buf:
                    await self._wait()
        item = self._buf.popleft()
        if type(item) is _Merged:
            self._popped(1, _size(item))
            return item.event()
        self._popped(1, _size(item) if self._policy is OverflowPolicy.COALESCE else 0)
        return item  # type: ignore[return-value]

    async def receive(self) -> Event:
        """Return the next event; raise ``EndOfStream``-like ``StopAsyncIteration`` at the end."""
        return await self.__anext__()

    async def receive_batch(self, limit: int | None = None) -> list[Event]:
        """Wait for at least one event, then return everything buffered (up to *limit*).

        Returns an empty list when the subscription was closed cleanly and
        drained; raises :class:`~streambus.errors.Overflowed` after an overflow.
        """
        try:
            if not self._buf:
                await self._wait()
            else:
                await anyio.lowlevel.checkpoint()
        except StopAsyncIteration:
            return []
        buf = self._buf
        if limit is None or limit >= len(buf):
            items = list(buf)
            buf.clear()
        else:
            items = [buf.popleft() for _ in range(limit)]
        coalesce = self._policy is OverflowPolicy.COALESCE
        size = 0
        out: list[Event] = []
        for item in items:
            if type(item) is _Merged:
                if coalesce:
                    size += _size(item)
                out.append(item.event())
            else:
                if coalesce:
                    size += _size(item)
                out.append(item)  # type: ignore[arg-type]
        self._popped(len(out), size)
        return out

    async def text(self, channel: str = "content", *, raise_on_failure: bool = True) -> AsyncIterator[str]:
        """Yield the text of the first stream this subscription sees, until its end.

        Subscribe with ``Filter.of(streams=stream_id)`` before the stream starts
        to read it whole. Raises :class:`StreamFailed` if it ends in ``error``
        or ``abort`` (unless *raise_on_failure* is false).
        """
        stream: str | None = None
        async for event in self:
            if stream is None:
                stream = event.stream
            elif event.stream != stream:
                continue
            if type(event) is DeltaEvent:
                if event.channel == channel and event.text:
                    yield event.text
            elif is_terminal(event):
                if raise_on_failure and type(event).__name__ != "EndEvent":
                    raise StreamFailed(event)
                return
