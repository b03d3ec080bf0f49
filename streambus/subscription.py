"""Subscriptions: a bounded per-subscriber buffer with an overflow policy.

A :class:`Subscription` is what :meth:`Bus.subscribe <streambus.Bus.subscribe>`
returns and what a sink's ``run`` receives. Read it with ``async for``, or
:meth:`Subscription.receive_batch` to take everything buffered at once (the
fast path for sinks that write in batches), or :meth:`Subscription.text` to
read the text of one stream. All three take from the same buffer the same
way.

The bus hands each event to :meth:`Subscription.offer`, which applies the
overflow policy; a subscription is only offered the events of the streams
its filter follows (see ``docs/architecture.md``).

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
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from ._signal import Parking
from .coalesce import MergedDelta
from .errors import Overflowed, StreamBusError, SubscriptionClosed
from .events import DeltaEvent, Event, StartEvent, is_terminal

__all__ = ["Filter", "Firehose", "OverflowPolicy", "StreamFailed", "StreamRoute", "Subscription"]

_CONTROL_SIZE = 256
_DELTA_OVERHEAD = 64
_YIELD_EVERY = 256
_CHECK_EVERY = 256  # at most this many events between the shared log's lag checks (and trims)
_RELAY_STEPS = 3  # the relay's steps with more than _FEW_READERS attached readers, else 1 (docs/decisions.md)
_FEW_READERS = 12
_NOBODY_WAITS = Parking()  # never waited on: see Subscription._space


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


# A meta value that is a collection lists the accepted values (one tuple, not a union built per call: an
# interest edge matches every start it indexes against every client's filters).
_ACCEPTED = (list, tuple, set, frozenset)


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
        meta = self.meta
        if meta:
            have_meta = start.meta
            for key, want in meta.items():
                have = have_meta.get(key)
                if isinstance(want, _ACCEPTED):
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


def _size(item: Event | MergedDelta[Event]) -> int:
    if type(item) is DeltaEvent:
        return len(item.text) + _DELTA_OVERHEAD
    if type(item) is MergedDelta:
        return item.size + _DELTA_OVERHEAD
    return _CONTROL_SIZE


class Firehose:
    """The unfiltered subscribers of one side of a bus, offered every event.

    Readers that keep up are *attached*: an event is appended once to a
    shared log that each reads from its own cursor (a batch is one slice),
    and publishing costs about the same for 1 or 100 of them. Parked readers
    are released in relay (``Parking.relay``). With more than 12 attached,
    one at once, then one per loop turn for two turns, then the rest, so a
    producer that yields after every token hands most of them four tokens
    per wake-up; with 2 to 12, one at once and the rest a loop turn later
    (the extra turns cost them more than they save); one alone is woken at
    once. Every ``buffer / 4``
    events (256 at most) the log drops what every reader has read and looks
    for attached readers lagging past their buffer: a ``block`` reader makes
    the publisher wait; any other is *detached* and offered events one by
    one, so its overflow policy applies; it re-attaches once it has read
    everything. The bus calls :meth:`add`, :meth:`remove` and :meth:`offer`.

    An offer is a list append and one comparison with :attr:`mark`: the log
    length at which the next offer must also relay parked readers, check for
    lag, offer detached readers, or (nobody attached) not keep the event.
    Whatever makes one of those due sets the mark to 0; the offer that does
    them sets it back (see ``docs/decisions.md``).
    """

    __slots__ = ("attached", "detached", "items", "live", "mark", "next_check", "parking", "steps")

    def __init__(self) -> None:
        self.items: list[Event] = []  # the shared log; an attached reader's cursor indexes it
        self.attached: list[Subscription] = []
        self.detached: list[Subscription] = []
        self.live = False
        """Whether any subscriber is here (the bus skips an empty firehose)."""
        self.parking = Parking()  # attached readers with nothing to read
        self.next_check = 0  # log length at the next lag check
        self.mark = 0
        """Log length at which an offer takes its slow steps (0: the next one does)."""
        self.steps = 0
        """The steps of the parked readers' relay (``Parking.relay``), set by how many readers are attached.

        0 with one reader attached: its release is a plain ``Parking.wake``, a call less per token."""
        # The lists are replaced, never changed in place: offer() iterates them
        # while a delivery may close (and remove) a subscriber.

    def add(self, sub: Subscription) -> None:
        """Offer *sub* every event from now on."""
        sub._firehose = self
        self._attach(sub)

    def remove(self, sub: Subscription) -> None:
        """Stop offering events to *sub*; what it had not read yet moves to its own buffer, in order."""
        if sub._cursor >= 0:
            unread = self.items[sub._cursor :]
            sub._buf.extend(unread)
            if sub._coalesce:
                sub._bytes += sum(map(_size, unread))
            sub._cursor = -1
            self.attached = [s for s in self.attached if s is not sub]
            if not self.attached:
                self.items = []
            if self.parking.waiting:
                self.parking.wake()  # its reader may be parked here (the others look again, and park again)
        else:
            self.detached = [s for s in self.detached if s is not sub]
        sub._firehose = None
        self.live = bool(self.attached or self.detached)
        self._remark()

    def offer(self, event: Event) -> Awaitable[None] | None:
        """Deliver *event* to every unfiltered subscriber; return an awaitable if the publisher must wait."""
        items = self.items
        items.append(event)
        if len(items) < self.mark:
            return None
        parking = self.parking
        if parking.waiting and self.attached and not self.detached and len(items) < self.next_check:
            # The commonest step, alone: the readers caught up and parked.
            if self.steps:
                parking.relay(self.steps)
            else:
                parking.wake()  # one reader
            self.mark = self.next_check
            return None
        return self._offer_steps(event)

    def _offer_steps(self, event: Event) -> Awaitable[None] | None:
        # The offer's steps past the append, once the mark says one is due.
        parking = self.parking
        detached = self.detached  # before the lag check: a reader it detaches has this event already
        wait = None
        if self.attached:
            if parking.waiting:
                parking.relay(self.steps)  # one parked reader: relay() wakes it
            if len(self.items) >= self.next_check:
                blocked = self._check()
                if blocked:
                    wait = _wait_all([sub._log_room() for sub in blocked])
        else:
            self.items.pop()  # nobody reads the log
        if detached:
            for sub in detached:
                sub.offer(event)  # never a ``block`` subscriber: those are never detached
        self._remark()
        return wait

    def _remark(self) -> None:
        # The log length of the next offer's slow steps: the lag check's, unless one is due sooner.
        if self.detached or not self.attached or self.parking.waiting:
            self.mark = 0
        else:
            self.mark = self.next_check
        # Each step of a relay after the first costs a loop turn and lets the readers released last
        # find one more event per wake-up: worth it with many readers, not with a few.
        self.steps = _RELAY_STEPS if len(self.attached) > _FEW_READERS else 1 if len(self.attached) > 1 else 0

    def _attach(self, sub: Subscription) -> None:
        end = len(self.items)
        sub._cursor = end
        sub._yield_at = end + _YIELD_EVERY
        self.detached = [s for s in self.detached if s is not sub]
        self.attached = [*self.attached, sub]
        self.live = True
        self.next_check = min(self.next_check, end + _check_interval(sub.buffer)) if len(self.attached) > 1 else end
        self._remark()

    def _check(self) -> list[Subscription]:
        """Detach lagging readers, trim the log; return the ``block`` readers the publisher must wait for."""
        end = len(self.items)
        blocked: list[Subscription] = []
        lowest = end
        for sub in self.attached:
            if end - sub._cursor > sub.buffer:
                if sub._policy is OverflowPolicy.BLOCK:
                    blocked.append(sub)
                else:
                    self._detach(sub)
                    continue
            lowest = min(lowest, sub._cursor)
        if lowest:  # what every reader read goes; the cursors move with the rest
            del self.items[:lowest]
            for sub in self.attached:
                sub._cursor -= lowest
                sub._yield_at -= lowest
            end -= lowest
        self.next_check = end + _check_interval(min((s.buffer for s in self.attached), default=4))
        return blocked

    def _detach(self, sub: Subscription) -> None:
        unread = self.items[sub._cursor :]
        sub._cursor = -1
        self.attached = [s for s in self.attached if s is not sub]
        self.detached = [*self.detached, sub]
        for event in unread:
            sub.offer(event)


class StreamRoute:
    """Where one live stream's events go: the unfiltered readers (a :class:`Firehose`) and its followers.

    The bus keeps one per live stream: its ``start`` decides which filtered
    subscribers follow it, and subscribers that join or leave while it is
    live update :attr:`followers`. :meth:`Bus.route <streambus.Bus.route>`
    hands a stream's route to its producer, which offers each delta to it
    directly: a token then costs no look-up of its stream and no checks that
    only a ``start`` or an end needs (:class:`~streambus.StreamWriter` does
    this). The bus offers every other event through its route too.
    """

    __slots__ = ("current", "firehose", "followers")

    def __init__(self, firehose: Firehose, followers: tuple[Subscription, ...] = ()) -> None:
        self.firehose = firehose
        self.followers = followers
        """The filtered subscribers that follow the stream (a tuple: replaced, never changed in place)."""
        self.current = True
        """False once the bus no longer routes its producers' events here.

        That happens when a processing stage is interposed (producers'
        events then take the raw side's route), when the bus stops, and when
        the stream ends or its ``start`` comes again. A holder that finds it
        False asks :meth:`Bus.route <streambus.Bus.route>` again, which
        raises :class:`~streambus.errors.BusClosed` once nobody can receive
        the stream's events and ``KeyError`` once the stream ended."""

    def offer(self, event: Event) -> Awaitable[None] | None:
        """Deliver *event* to the firehose and the followers; return an awaitable if the publisher must wait.

        As :meth:`Bus.offer <streambus.Bus.offer>`: await what it returns
        before offering the stream's next event.
        """
        firehose = self.firehose
        wait = firehose.offer(event) if firehose.live else None
        followers = self.followers
        if followers:  # most streams have no filtered follower, or one
            for sub in followers:
                more = sub.offer(event)
                if more is not None:
                    wait = more if wait is None else _in_turn(wait, more)
        return wait


async def _in_turn(first: Awaitable[None], then: Awaitable[None]) -> None:
    try:
        await first
    finally:
        await then  # even when cancelled: a coroutine left unawaited would warn


def _check_interval(buffer: int) -> int:
    # A quarter of the smallest buffer, so a lagging reader is seen before it is far past its own;
    # but never more than _CHECK_EVERY, or one sink with a big buffer (the stats and otel sinks
    # keep tens of thousands) would keep that many events alive in the log after every reader
    # read them, a working set that slowed the whole bus by 3% (docs/decisions.md).
    return max(1, min(buffer // 4, _CHECK_EVERY))


async def _wait_all(waits: list[Awaitable[None]]) -> None:
    for wait in waits:
        await wait


class Subscription:
    """A subscriber's bounded buffer of events, read as an async iterator.

    Normally created by :meth:`Bus.subscribe <streambus.Bus.subscribe>`; a
    standalone one (fed with :meth:`offer`) is handy in tests. Iteration ends
    when the subscription is closed cleanly and everything buffered was
    read; it raises :class:`~streambus.errors.Overflowed` when the reader fell
    behind past its policy. Use ``async with`` (or :meth:`close`) to
    unsubscribe.

    :param filter: which streams it follows (everything by default); the bus
        decides this once per stream, on its ``start``.
    :param on_close: called once with the subscription when it closes (the
        bus uses it to stop routing events to it).
    """

    __slots__ = (
        "_buf",
        "_bytes",
        "_closed",
        "_coalesce",
        "_cursor",
        "_error",
        "_firehose",
        "_on_close",
        "_parked",
        "_policy",
        "_reader",
        "_since_yield",
        "_space",
        "_yield_at",
        "buffer",
        "dropped",
        "filter",
        "max_bytes",
        "name",
        "raw",
    )

    def __init__(
        self,
        filter: Filter | None = None,
        *,
        buffer: int = 1024,
        overflow: OverflowPolicy | str = OverflowPolicy.COALESCE,
        max_bytes: int = 8 * 1024 * 1024,
        name: str = "subscriber",
        raw: bool = False,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self.filter = filter or Filter()
        self.buffer = buffer
        self.max_bytes = max_bytes
        self.name = name
        self.raw = raw
        self.dropped = 0
        """How many events ``drop_oldest`` discarded."""
        self._policy = OverflowPolicy.parse(overflow)
        # A bool, not `self._policy is OverflowPolicy.COALESCE`: an enum member's
        # look-up costs more than the rest of a delivery's bookkeeping.
        self._coalesce = self._policy is OverflowPolicy.COALESCE
        self._on_close = on_close
        self._buf: deque[Event | MergedDelta[Event]] = deque()
        self._bytes = 0  # buffered text, counted for the ``coalesce`` byte cap only
        self._closed = False
        self._error: SubscriptionClosed | None = None
        self._reader = Parking()  # woken when something arrives
        # Publishers waiting for room in a full ``block`` buffer: a Parking of its own
        # only once one waits; the shared NOBODY_WAITS until then (read on every take).
        self._space = _NOBODY_WAITS
        self._since_yield = 0
        self._yield_at = 0  # the shared-log cursor at which the reader next lets others run
        self._parked = False
        self._firehose: Firehose | None = None  # set while unfiltered on a bus
        self._cursor = -1  # index of its next event in the firehose's shared log while attached to it

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
        firehose = self._firehose
        shared = len(firehose.items) - self._cursor if firehose and self._cursor >= 0 else 0
        return len(self._buf) + shared

    @property
    def idle(self) -> bool:
        """Whether nothing is buffered and the reader is waiting for more.

        A reader parks only after handling everything it took, so an idle
        ``block`` subscription has processed every event published before now:
        a source may then commit its read position (see the redis plugin).
        """
        return self._parked and not self._available()

    # -- publisher side -------------------------------------------------
    def offer(self, event: Event) -> Awaitable[None] | None:
        """Buffer *event* under the overflow policy; wake the reader if it waits.

        This is how the bus delivers every event. Returns ``None`` once the
        event is buffered, merged, dropped, or refused because the
        subscription is closed. Only a full ``block`` subscription returns an
        awaitable instead: await it before offering this subscription another
        event; it finishes once the event is buffered (or the subscription
        closed).
        """
        if self._closed:
            return None
        buf = self._buf
        if len(buf) >= self.buffer:
            return self._full(event)
        buf.append(event)
        if self._coalesce:
            self._bytes += len(event.text) + _DELTA_OVERHEAD if type(event) is DeltaEvent else _CONTROL_SIZE
            if self._bytes > self.max_bytes:
                self._overflow(f"buffered more than {self.max_bytes} bytes")
                return None
        if self._reader.waiting:
            self._reader.wake()
        return None

    def _full(self, event: Event) -> Awaitable[None] | None:
        policy = self._policy
        if policy is OverflowPolicy.BLOCK:
            return self._put_when_room(event)
        if policy is OverflowPolicy.DISCONNECT:
            self._overflow(f"buffer of {self.buffer} events full")
            return None
        buf = self._buf
        if policy is OverflowPolicy.COALESCE:
            if type(event) is DeltaEvent and self._merge(event):
                self._bytes += len(event.text)
            else:
                # Not mergeable (control event, or the stream's last buffered item
                # is not a delta of this channel): keep it anyway; the byte cap bounds memory.
                buf.append(event)
                self._bytes += _size(event)
            if self._bytes > self.max_bytes:
                self._overflow(f"buffered more than {self.max_bytes} bytes")
            return None
        # DROP_OLDEST: drop the oldest delta; control events are kept so streams stay well formed.
        for i, item in enumerate(buf):
            if type(item) is DeltaEvent or type(item) is MergedDelta:
                del buf[i]
                self.dropped += 1
                break
        buf.append(event)
        return None

    async def _put_when_room(self, event: Event) -> None:
        # Several publishers (of different streams) may wait on one full
        # subscriber: they share one signal, and each re-checks for room after waking.
        while not self._closed and len(self._buf) >= self.buffer:
            await self._space_to_wait().wait()
        if not self._closed:
            self._buf.append(event)
            if self._reader.waiting:
                self._reader.wake()

    def _merge(self, delta: DeltaEvent) -> bool:
        buf = self._buf
        stream = delta.stream
        # Scan from the newest item for the last one of this stream: merging
        # past an event of the same stream would reorder that stream.
        for i in range(len(buf) - 1, -1, -1):
            item = buf[i]
            if item.stream != stream:
                continue
            if type(item) is MergedDelta:
                if item.channel != delta.channel:
                    return False
                item.add(delta)
                return True
            if type(item) is DeltaEvent:
                if item.channel != delta.channel:
                    return False
                merged: MergedDelta[Event] = MergedDelta(item)
                merged.add(delta)
                buf[i] = merged
                return True
            return False
        return False

    def _overflow(self, why: str) -> None:
        self._close(Overflowed(f"subscription {self.name!r} overflowed ({self._policy.value}): {why}"))

    def _close(self, error: SubscriptionClosed | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        if self._on_close is not None:
            self._on_close(self)  # a clean close still delivers what was published before it
        if error is not None:
            self._buf.clear()
            self._bytes = 0
        if self._firehose is not None:
            self._firehose.remove(self)
        self._reader.wake()
        self._space.wake()

    # -- reader side ----------------------------------------------------
    def close(self) -> None:
        """Unsubscribe: nothing more is buffered; reading ends after what already was."""
        self._close(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close(None)

    def __aiter__(self) -> Subscription:
        return self

    def _available(self) -> bool:
        if self._buf:
            return True
        firehose = self._firehose
        return self._cursor >= 0 and firehose is not None and self._cursor < len(firehose.items)

    def _space_to_wait(self) -> Parking:
        # Where a publisher waits for room (see ``_space``).
        if self._space is _NOBODY_WAITS:
            self._space = Parking()
        return self._space

    def _parking(self) -> Parking | None:
        """Where the reader must wait for its next item: ``None`` if one is buffered.

        The one rule every read follows. Raises ``StopAsyncIteration`` after a
        clean close once everything was read, or the overflow error. A reader
        detached from the firehose that read everything re-attaches here.
        """
        while not self._available():
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            firehose = self._firehose
            if firehose is None:
                return self._reader
            if self._cursor >= 0:
                return self._park_where()
            firehose._attach(self)  # detached, and read everything: back to the shared log
        return None

    async def _log_room(self) -> None:
        # A ``block`` reader attached to the firehose: the publisher waits until it catches up.
        while (firehose := self._firehose) is not None and len(firehose.items) - self._cursor > self.buffer:
            await self._space_to_wait().wait()

    async def __anext__(self) -> Event:
        while True:
            # Take the next item: the subscription's own buffer first, then the
            # shared log (a reader can hold buffered events while attached, when it
            # re-attached as a publisher waited for a full ``block`` subscriber).
            # A reader that always finds events waiting must still let others run:
            # every _YIELD_EVERY items it takes, counted here, and from the log by
            # its cursor passing ``_yield_at``.
            buf = self._buf
            if buf:
                if self._since_yield >= _YIELD_EVERY:
                    await anyio.lowlevel.checkpoint()
                    self._since_yield = 0
                    continue
                self._since_yield += 1
                item = buf.popleft()
                if self._coalesce:
                    self._bytes -= len(item.text) + _DELTA_OVERHEAD if type(item) is DeltaEvent else _size(item)
                if self._space.waiting:
                    self._space.wake()
                return item.event() if type(item) is MergedDelta else item  # type: ignore[return-value]
            cursor = self._cursor
            if cursor >= 0:  # attached to the shared log (never while closed)
                firehose: Firehose = self._firehose  # type: ignore[assignment]
                items = firehose.items
                if cursor < len(items):
                    if cursor >= self._yield_at:
                        await anyio.lowlevel.checkpoint()
                        self._yield_at = self._cursor + _YIELD_EVERY
                        continue
                    self._cursor = cursor + 1
                    if self._space.waiting:
                        self._space.wake()
                    return items[cursor]
                # Caught up: _park_where()'s first rule, here to save a call per token.
                firehose.mark = 0  # the next offer releases it
                self._yield_at = cursor + _YIELD_EVERY  # parking lets others run
                parking = firehose.parking
            else:
                where = self._park_where()
                if where is None:
                    continue
                parking = where
            # Parked here, not in a helper coroutine: one coroutine less per
            # wake-up is a tenth of a token's CPU (docs/decisions.md).
            self._parked = True
            try:
                await parking.wait()
            finally:
                self._parked = False
            self._since_yield = 0

    def _park_where(self) -> Parking | None:
        # Where every read path waits once it found nothing to take: _parking()'s rule without
        # its availability check, which the caller just made (the shared log's parking while
        # attached; closed, or a detached reader re-attaching: _parking() itself, None meaning
        # look again; else the reader's own). A plain call: the readers park inline.
        firehose = self._firehose
        if firehose is not None and self._cursor >= 0:
            firehose.mark = 0  # the next offer releases it
            self._yield_at = self._cursor + _YIELD_EVERY  # parking lets others run
            return firehose.parking
        if self._closed or firehose is not None:
            return self._parking()
        return self._reader

    async def receive(self) -> Event:
        """Return the next event; raise ``StopAsyncIteration`` at a clean end."""
        return await self.__anext__()

    async def receive_batch(self, limit: int | None = None, *, linger: float = 0.0) -> list[Event]:
        """Wait for at least one event, then return everything buffered (up to *limit*).

        Returns an empty list when the subscription was closed cleanly and
        drained; raises :class:`~streambus.errors.Overflowed` after an overflow.

        With *linger* (seconds), once the first events are in it waits up to
        that long for more, until the batch holds *limit* events (the
        subscription's ``buffer`` without a limit): fewer, fuller batches for
        a sink that pays per batch (a network send), at up to *linger* more
        latency. A close during the wait ends it early with what arrived; a
        cancellation during it loses nothing (an event is taken only once it
        is returned).
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if linger:
            return await self._linger(limit, linger)
        waited = False  # parked, or let other tasks run, at least once in this call
        while True:  # the steps of __anext__, then everything buffered at once
            cursor = self._cursor
            firehose = self._firehose
            if self._buf or (firehose is not None and 0 <= cursor < len(firehose.items)):
                if waited:
                    break
                await anyio.lowlevel.checkpoint()  # a reader that always finds events waiting must still let others run
            else:
                try:
                    parking = self._park_where()
                except StopAsyncIteration:
                    return []
                if parking is None:
                    continue
                self._parked = True
                try:
                    await parking.wait()
                finally:
                    self._parked = False
            waited = True
        self._since_yield = 0
        buf = self._buf
        if not buf:
            assert firehose is not None
            events = firehose.items[cursor : None if limit is None else cursor + limit]
            self._cursor = cursor + len(events)
            if self._space.waiting:
                self._space.wake()
            return events
        if limit is None or limit >= len(buf):
            items = list(buf)
            buf.clear()
        else:
            items = [buf.popleft() for _ in range(limit)]
        if self._coalesce:
            self._bytes -= sum(map(_size, items))
        if self._space.waiting:
            self._space.wake()
        return [item.event() if type(item) is MergedDelta else item for item in items]  # type: ignore[misc]

    async def _linger(self, limit: int | None, linger: float) -> list[Event]:
        if not (linger > 0 and math.isfinite(linger)):
            raise ValueError(f"linger must be a finite number of seconds, 0 or more, got {linger}")
        target = self.buffer if limit is None else limit
        batch = await self.receive_batch(limit)
        if batch and len(batch) < target:
            try:
                with anyio.move_on_after(linger):
                    while len(batch) < target:
                        more = await self.receive_batch(target - len(batch))
                        if not more:  # closed: what arrived goes now, the next read ends
                            break
                        batch.extend(more)
            except anyio.get_cancelled_exc_class():
                # Nothing is lost: what was gathered goes back in front, in order, for the next read.
                self._buf.extendleft(reversed(batch))
                if self._coalesce:
                    self._bytes += sum(map(_size, batch))
                raise
        return batch

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
