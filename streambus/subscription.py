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

from ._signal import Signal, new_signal
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


class _Tier:
    """A shared log of events and the subscribers reading it.

    Unfiltered subscribers that keep up are *attached*: publishing appends an
    event once, whatever their number, and each reads the log from its own
    cursor (batches are C-level slices). Every ``check_every`` events the bus
    looks for attached readers lagging past their buffer: a ``block`` reader
    makes the publisher wait; any other is *detached* into a private buffer,
    where its overflow policy applies event by event. Filtered subscribers
    are always private. A private reader that drains its buffer re-attaches.
    """

    __slots__ = ("attached", "base", "check_every", "items", "next_check", "private", "wakeup")

    def __init__(self) -> None:
        self.items: list[Event] = []
        self.base = 0
        self.attached: list[Subscription] = []
        self.private: list[Subscription] = []
        self.wakeup: Signal | None = None  # one event all parked attached readers share
        self.check_every = 1
        self.next_check = 0

    @property
    def end(self) -> int:
        return self.base + len(self.items)

    def append(self, event: Event) -> bool:
        """Append for attached readers; return True when a lag check is due."""
        self.items.append(event)
        wakeup = self.wakeup
        if wakeup is not None:
            self.wakeup = None
            wakeup.set()
        return self.base + len(self.items) >= self.next_check

    def check(self) -> list[Subscription]:
        """Detach or report lagging readers, trim the log; return blocked ``block`` readers."""
        end = self.end
        blocked: list[Subscription] = []
        lowest = end
        for sub in list(self.attached):
            if end - sub._cursor > sub.buffer:
                if sub._policy is OverflowPolicy.BLOCK:
                    blocked.append(sub)
                else:
                    sub._detach()
                    continue
            lowest = min(lowest, sub._cursor)
        if lowest > self.base:
            del self.items[: lowest - self.base]
            self.base = lowest
        self.check_every = max(1, min((s.buffer for s in self.attached), default=64) // 4)
        self.next_check = end + self.check_every
        return blocked


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
        "_cursor",
        "_error",
        "_policy",
        "_pushers",
        "_since_yield",
        "_space_waiter",
        "_streams",
        "_tier",
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
        self._waiter: Signal | None = None
        self._space_waiter: Signal | None = None
        self._since_yield = 0
        self._tier: _Tier | None = None
        self._cursor = -1  # >= 0 while attached to the tier's shared log
        self._pushers = 0  # publishers waiting to push to this private buffer

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
        shared = self._tier.end - self._cursor if self._cursor >= 0 and self._tier is not None else 0
        return shared + len(self._buf)

    @property
    def idle(self) -> bool:
        """Whether nothing is buffered and the reader is waiting for more.

        A reader parks only after handling everything it took, so an idle
        ``block`` subscription has processed every event published before now:
        a source may then commit its read position (see the redis plugin).
        """
        waiter = self._waiter
        return not self.pending and waiter is not None and not waiter.is_set()

    def _join(self, tier: _Tier) -> None:
        """Join *tier*: attached to its log when unfiltered, private otherwise."""
        self._tier = tier
        if self._all:
            self._cursor = tier.end
            tier.attached = [*tier.attached, self]
            every = max(1, self.buffer // 4)
            if len(tier.attached) == 1:
                tier.check_every, tier.next_check = every, tier.end + every
            else:
                tier.check_every = min(tier.check_every, every)
                tier.next_check = min(tier.next_check, tier.end + every)
        else:
            tier.private = [*tier.private, self]

    def _leave(self) -> None:
        """Leave the tier, keeping unread shared events in the private buffer (in order)."""
        tier = self._tier
        if tier is None:
            return
        if self._cursor >= 0:
            self._buf.extend(tier.items[self._cursor - tier.base :])
            self._cursor = -1
            tier.attached = [s for s in tier.attached if s is not self]
        else:
            tier.private = [s for s in tier.private if s is not self]
        self._tier = None

    def _detach(self) -> None:
        """Move from the shared log to a private buffer, applying the overflow policy."""
        tier = self._tier
        assert tier is not None
        unread = tier.items[self._cursor - tier.base :]
        self._cursor = -1
        tier.attached = [s for s in tier.attached if s is not self]
        tier.private = [*tier.private, self]
        for event in unread:
            self._offer(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def _reattach(self) -> bool:
        # Called by the reader when its private buffer is empty: back to the fast path.
        tier = self._tier
        if tier is None or not self._all or self._closed or self._pushers:
            return False
        tier.private = [s for s in tier.private if s is not self]
        self._cursor = tier.end
        tier.attached = [*tier.attached, self]
        tier.next_check = min(tier.next_check, tier.end + max(1, self.buffer // 4))
        return True

    def _offer(self, event: Event) -> bool:
        """Buffer *event* privately; return False only if a ``block`` subscriber is full."""
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
        self._leave()  # a clean close still delivers what was published before it
        if error is not None:
            self._buf.clear()
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
        while not self._closed:
            if self._cursor >= 0:
                tier = self._tier
                assert tier is not None
                if tier.end - self._cursor <= self.buffer:
                    return
            elif len(self._buf) < self.buffer:
                return
            waiter = self._space_waiter
            if waiter is None:
                waiter = self._space_waiter = new_signal()
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

    def _ready(self) -> bool:
        if self._buf:
            return True
        if self._cursor >= 0:
            tier = self._tier
            assert tier is not None
            return self._cursor < tier.end
        return False

    async def _wait(self) -> None:
        while not self._ready():
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            if self._cursor < 0 and self._all and self._reattach():
                continue
            if self._cursor >= 0:
                # Attached readers share one wake-up event per log: a publish
                # sets one event, however many readers are parked on it.
                tier = self._tier
                assert tier is not None
                waiter = tier.wakeup
                if waiter is None or waiter.is_set():
                    waiter = tier.wakeup = new_signal()
                self._waiter = waiter
            else:
                waiter = self._waiter
                if waiter is None or waiter.is_set():
                    waiter = self._waiter = new_signal()
            await waiter.wait()
        self._since_yield = 0

    def _popped(self, size: int) -> None:
        if self._policy is OverflowPolicy.COALESCE:
            self._bytes -= size
        waiter = self._space_waiter
        if waiter is not None:
            self._space_waiter = None
            waiter.set()

    async def __anext__(self) -> Event:
        tier = self._tier
        cursor = self._cursor
        if cursor >= 0 and tier is not None and not self._buf:
            # Attached (the common case), inlined: this runs once per delivery. An
            # attached reader can still hold buffered events (one that re-attached while a
            # publisher was between its snapshot of private readers and delivering to them):
            # those come first, through the general path.
            items = tier.items
            index = cursor - tier.base
            if index < len(items):
                self._since_yield += 1
                if self._since_yield < _YIELD_EVERY:
                    self._cursor = cursor + 1
                    if self._space_waiter is not None:
                        self._popped(0)
                    return items[index]
            elif not self._closed:
                # Park on the log's shared signal; the next publish sets it.
                waiter = tier.wakeup
                if waiter is None or waiter.is_set():
                    waiter = tier.wakeup = new_signal()
                self._waiter = waiter
                await waiter.wait()
                if (
                    self._tier is tier
                    and self._cursor == cursor
                    and not self._buf
                    and cursor - tier.base < len(tier.items)
                ):
                    self._since_yield = 0
                    self._cursor = cursor + 1
                    if self._space_waiter is not None:
                        self._popped(0)
                    return tier.items[cursor - tier.base]
        return await self._next_slow()

    async def _next_slow(self) -> Event:
        if not self._ready():
            await self._wait()
        else:
            self._since_yield += 1
            if self._since_yield >= _YIELD_EVERY:
                # A reader that never finds its buffer empty would never yield.
                self._since_yield = 0
                await anyio.lowlevel.checkpoint()
                if not self._ready():
                    await self._wait()
        if self._buf:
            item = self._buf.popleft()
            if type(item) is _Merged:
                self._popped(_size(item))
                return item.event()
            self._popped(_size(item) if self._policy is OverflowPolicy.COALESCE else 0)
            return item  # type: ignore[return-value]
        tier = self._tier
        assert tier is not None
        event = tier.items[self._cursor - tier.base]
        self._cursor += 1
        if self._space_waiter is not None:
            self._popped(0)
        return event

    async def receive(self) -> Event:
        """Return the next event; raise ``StopAsyncIteration`` at a clean end."""
        return await self.__anext__()

    async def receive_batch(self, limit: int | None = None) -> list[Event]:
        """Wait for at least one event, then return everything buffered (up to *limit*).

        Returns an empty list when the subscription was closed cleanly and
        drained; raises :class:`~streambus.errors.Overflowed` after an overflow.
        """
        try:
            if not self._ready():
                await self._wait()
            else:
                await anyio.lowlevel.checkpoint()
                if not self._ready():
                    await self._wait()
        except StopAsyncIteration:
            return []
        buf = self._buf
        if not buf:
            # Attached: one C-level slice of the shared log.
            tier = self._tier
            assert tier is not None
            start = self._cursor - tier.base
            stop = len(tier.items) if limit is None else min(len(tier.items), start + limit)
            events = tier.items[start:stop]
            self._cursor += len(events)
            if self._space_waiter is not None:
                self._popped(0)
            return events
        if limit is None or limit >= len(buf):
            items = list(buf)
            buf.clear()
        else:
            items = [buf.popleft() for _ in range(limit)]
        coalesce = self._policy is OverflowPolicy.COALESCE
        size = 0
        out: list[Event] = []
        for item in items:
            if coalesce:
                size += _size(item)
            out.append(item.event() if type(item) is _Merged else item)  # type: ignore[arg-type]
        self._popped(size)
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
