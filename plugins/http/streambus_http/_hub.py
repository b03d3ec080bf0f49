"""The hub: one bus subscription, a bounded history, and cursors for HTTP readers.

Every HTTP response reads from the hub instead of holding its own bus
subscription. The hub records each event once (the core's per-stream
:class:`streambus.history.StreamHistory`, plus a global log in publish order
that filter readers follow) and readers are cursors into that history, so:

- a request that arrives after its stream started (or even ended) still sees
  it from ``start``, without a race between "subscribe" and "read history";
- a reconnecting ``EventSource`` resumes after ``Last-Event-ID`` without gap or
  duplicate, for one stream or for a filter over many (the id names a position
  in the global log);
- a slow client costs no buffer: it lags behind in the shared history and is
  ended (to reconnect and resume) only when the history it needs was evicted;
- on an edge fed by a distributed engine (:mod:`streambus.archive`), a stream
  asked for by id that the hub does not hold is fetched whole from the engine
  (all or nothing) and followed, so ``Last-Event-ID`` resumes on any edge;
  and the hub is the bus's :class:`streambus.archive.Interest`: the engine
  reads a stream here only while a request waits for it by id, a filter
  request (waiting or reading) matches its ``start``, so a filter route on
  an edge gets what it follows and nothing else is read.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterable

import anyio
import structlog

from streambus import Bus, Filter, StartEvent, Subscription
from streambus.archive import add_interest, archive_of
from streambus.events import Event, is_terminal
from streambus.history import StreamHistory, StreamLog

from ._errors import HttpStreamError, ResumeError

__all__ = ["Cursor", "StreamHub", "parse_event_id"]

log = structlog.get_logger("streambus.http")


def parse_event_id(value: str) -> tuple[str, int]:
    """Split an SSE event id ``<stream>:<seq>`` into its parts.

    Raises :class:`ResumeError` naming the value when it is not of that form.
    """
    stream, sep, seq = value.strip().rpartition(":")
    if not sep or not stream or not seq.isdigit():
        raise ResumeError(f"Last-Event-ID {value!r} is not of the form '<stream>:<seq>'", status=400)
    return stream, int(seq)


class StreamHub:
    """Records a bus's events in a bounded history and serves cursors over it.

    Attach it once per bus, inside ``async with Bus() as bus``::

        hub = StreamHub.attach(bus)

    and pass it to the ASGI / aiohttp building blocks. It is a sink: the bus
    runs it, and it stops (ending every reader) when the bus closes.

    :param per_stream: events kept per stream for resume (the oldest go first).
    :param max_streams: ended streams kept for late readers (the oldest go first).
    :param max_events: events kept in the global log that filter readers resume from.
    """

    overflow = "coalesce"
    buffer = 4096

    def __init__(self, *, per_stream: int = 10_000, max_streams: int = 1000, max_events: int = 100_000) -> None:
        for name, value in (("per_stream", per_stream), ("max_streams", max_streams), ("max_events", max_events)):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        self.per_stream = per_stream
        self.max_streams = max_streams
        self.max_events = max_events
        # Each event with its position in the global log. Ended streams stay until
        # max_streams others ended after them; live ones until they end.
        self._history: StreamHistory[tuple[int, Event]] = StreamHistory(
            per_stream, math.inf, None, time.monotonic, max_ended=max_streams, snapshots=False
        )
        self._log: list[tuple[int, Event]] = []
        self._log_base = 0  # index in _log of the first valid entry
        self._pos = -1  # position of the last recorded event
        self._changed: anyio.Event | None = None
        self._closed = False
        self._waiting_ids: dict[str, int] = {}  # stream ids requests wait for (what a distributed source follows)
        self._waiting_filters: list[Filter] = []  # filters requests wait with for a stream to start (ditto)
        # Open filter readers (ditto); weak: a response that never ran its body leaves no interest behind.
        self._filter_readers: weakref.WeakSet[Cursor] = weakref.WeakSet()
        self._filled: dict[str, int] = {}  # streams fetched from the engine: their events up to this seq come again
        self.bus: Bus | None = None
        self.readers = 0
        """How many HTTP responses are reading from this hub right now."""
        self.waiting = 0
        """How many requests wait for a stream to start."""

    @classmethod
    def attach(cls, bus: Bus, **options: int) -> StreamHub:
        """Create a hub and add it to the running *bus* as a sink; return it."""
        hub = cls(**options)
        bus.add_sink(hub, name="http-hub")
        hub.bus = bus
        return hub

    # -- sink side ---------------------------------------------------------
    async def setup(self, bus: Bus) -> None:
        """Remember the bus (the bus calls this before :meth:`run`)."""
        self.bus = bus

    async def run(self, events: Subscription) -> None:
        """Record events until the bus closes the subscription, then end every reader."""
        self._closed = False
        if self.bus is not None:
            add_interest(self.bus, self)  # a distributed source follows the streams requests wait for
        try:
            while batch := await events.receive_batch():
                self.record_many(batch)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the hub: readers end after what was recorded."""
        self._closed = True
        self._notify()

    @property
    def closed(self) -> bool:
        """Whether the hub stopped recording (its bus closed)."""
        return self._closed

    def record_many(self, events: Iterable[Event]) -> None:
        """Record *events* (in publish order) and wake the readers."""
        for event in events:
            self._record(event)
        self._trim_log()
        self._notify()

    def _record(self, event: Event) -> None:
        if self._filled:
            upto = self._filled.get(event.stream)
            if upto is not None:
                if event.seq <= upto:
                    return  # already held, fetched from the engine: the followed stream comes again from its start
                del self._filled[event.stream]
        self._pos += 1
        entry = (self._pos, event)
        self._log.append(entry)
        log_ = self._history.get(event.stream)
        if log_ is not None and log_.ended:
            return  # a stream has one terminal event, and it is its last
        self._history.record(event, entry)

    def _trim_log(self) -> None:
        live = len(self._log) - self._log_base
        if live > self.max_events:
            self._log_base += live - self.max_events
            if self._log_base > self.max_events // 2 + 1024:
                del self._log[: self._log_base]
                self._log_base = 0

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def wait_changed(self, max_wait: float | None = None) -> None:
        """Wait until something is recorded, a request starts waiting, or the hub closes (at most *max_wait* s)."""
        if self._closed:
            return
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        with anyio.move_on_after(max_wait):
            await changed.wait()

    # -- a distributed engine ----------------------------------------------
    def wants(self, start: StartEvent) -> bool:
        """Whether a request follows the stream *start* begins (a :class:`streambus.archive.Interest`).

        True while a request waits for it by id, or a filter request (a
        filter route's reader, or a request waiting for a matching stream to
        start) matches *start*.
        """
        if start.stream in self._waiting_ids:
            return True
        if any(flt.matches(start) for flt in self._waiting_filters):
            return True
        return any(not cursor.done and cursor.matches(start) for cursor in list(self._filter_readers))

    def release(self, cursor: Cursor) -> None:
        """*cursor*'s reader is gone: its filter no longer makes a distributed source read matching streams."""
        self._filter_readers.discard(cursor)

    def follow_matching(self, flt: Filter) -> int:
        """Have the engine deliver the live streams matching *flt* that the hub does not hold; return how many.

        Only on a bus with a :class:`streambus.archive.StreamArchive` (an edge
        reading only what its clients follow): each such stream then arrives
        through the bus from its ``start``. Elsewhere (one process, or a
        source reading everything) every stream is here already: 0.
        """
        archive = archive_of(self.bus)
        if archive is None:
            return 0
        followed = 0
        for start in archive.live_starts():
            if not self.known(start.stream) and flt.matches(start):
                archive.follow(start.stream)
                followed += 1
        return followed

    async def consult_archive(self, stream: str) -> bool:
        """Hold *stream* as the engine retains it, when the hub does not know it; return whether it did.

        Only on a bus with a :class:`streambus.archive.StreamArchive` (an edge
        fed by Redis in the ``per_stream`` layout). The stream is fetched
        whole from its ``start`` or not at all, recorded, and followed for
        what comes next; its events that then arrive again through the bus
        are dropped up to the last seq fetched.
        """
        archive = archive_of(self.bus)
        if archive is None or self.known(stream):
            return False
        events = await archive.fetch(stream)
        if events is None or self.known(stream):
            return False
        self.record_many(events)
        self._filled[stream] = events[-1].seq  # after recording them: _record drops up to it from now on
        while len(self._filled) > self.max_streams:
            del self._filled[next(iter(self._filled))]
        if not is_terminal(events[-1]):
            archive.follow(stream)
        return True

    # -- reader side --------------------------------------------------------
    @property
    def position(self) -> int:
        """Position of the last recorded event in the global log (-1 before any)."""
        return self._pos

    def _oldest_pos(self) -> int:
        if self._log_base < len(self._log):
            return self._log[self._log_base][0]
        return self._pos + 1

    def start_of(self, stream: str) -> StartEvent | None:
        """The ``start`` event of *stream* if the hub knows it."""
        log_ = self._history.get(stream)
        return log_.start if log_ is not None else None

    def known(self, stream: str) -> bool:
        """Whether the history holds *stream* (live or ended)."""
        return self._history.get(stream) is not None

    def ended(self, stream: str) -> bool:
        """Whether *stream* is known and has had its terminal event."""
        log_ = self._history.get(stream)
        return log_ is not None and log_.ended

    def last_seq(self, stream: str) -> int:
        """The seq of the last recorded event of *stream* (-1 if none)."""
        log_ = self._history.get(stream)
        return log_.last_seq if log_ is not None else -1

    def streams(self) -> list[StartEvent]:
        """The ``start`` event of every stream in the history, oldest first."""
        return [log_.start for log_ in self._history.logs() if log_.start is not None]

    def live(self) -> list[StartEvent]:
        """The ``start`` event of every stream that has not ended, oldest first."""
        return [log_.start for log_ in self._history.live() if log_.start is not None]

    def stream_cursor(self, stream: str, *, after: int = -1) -> Cursor:
        """A cursor over one stream's events with ``seq > after`` (``-1``: from ``start``).

        Raises :class:`ResumeError` when events after *after* were already evicted.
        """
        cursor = Cursor(self, stream=stream, after_seq=after)
        if self.events_after(stream, after) is None:
            log_ = self._history.get(stream)
            kept = log_.entries[0][0] if log_ is not None and log_.entries else after + 1
            if kept <= after:
                why = f"seq {after} falls inside a coalesced delta, which cannot be split"
            else:
                why = f"events after seq {after} are no longer in the history (kept from seq {kept})"
            raise ResumeError(f"stream {stream}: {why}", status=409)
        return cursor

    def events_after(self, stream: str, after: int) -> list[Event] | None:
        """*stream*'s recorded events with ``seq > after``; ``None`` when some were already evicted.

        An unknown stream, or one not yet past *after*, has nothing to read (``[]``).
        A stream the hub first saw mid-way (attached to a running bus) is read from
        the first event it recorded.
        """
        log_ = self._history.get(stream)
        if log_ is None or after >= log_.last_seq:
            return []
        if not log_.dropped and log_.entries:
            after = max(after, log_.entries[0][0] - 1)
        missed = self._history.missed(stream, after)
        if missed is None:
            return None
        return [event for _, event in missed]

    def filter_cursor(self, flt: Filter, *, resume: str | None = None) -> Cursor:
        """A cursor over every stream matching *flt*, from now or after the event id *resume*.

        Without *resume* it starts with the next event and follows the live
        streams that match. Raises :class:`ResumeError` when *resume* is
        malformed (400) or its position is no longer in the history (409).
        """
        cursor = Cursor(self, flt=flt, after_pos=self._pos)
        self._filter_readers.add(cursor)  # an edge's engine reads the streams it matches from now on
        self.follow_matching(flt)  # and those already live that this edge does not read yet
        if resume is not None:
            stream, seq = parse_event_id(resume)
            pos = self._position_of(stream, seq)
            if pos is None or pos < self._oldest_pos() - 1:
                raise ResumeError(f"event {resume!r} is no longer in the history", status=409)
            cursor.after_pos = pos
            # Streams that started before the resume point still match.
            for log_ in self._history.logs():
                if log_.start is not None and flt.matches(log_.start) and _first_position(log_) <= pos:
                    cursor.streams.add(log_.start.stream)
        else:
            for log_ in self._history.live():
                if log_.start is not None and flt.matches(log_.start):
                    cursor.streams.add(log_.start.stream)
        return cursor

    def _position_of(self, stream: str, seq: int) -> int | None:
        found = self._history.find(stream, seq)
        return found[0] if found is not None else None

    def pick(self, flt: Filter, *, since: int | None = None) -> str | None:
        """The oldest live stream matching *flt*; else, with *since*, the first one started after that position.

        On an edge fed by a distributed engine (:mod:`streambus.archive`) a
        live stream the engine's index shows counts too when the hub holds
        none: serving it by id fetches it from the engine (see
        :meth:`consult_archive`).
        """
        for start in self.live():
            if flt.matches(start):
                return start.stream
        if since is not None:
            for log_ in self._history.logs():
                if log_.start is not None and _first_position(log_) > since and flt.matches(log_.start):
                    return log_.start.stream
        archive = archive_of(self.bus)
        if archive is not None:
            for start in archive.live_starts():
                if flt.matches(start):
                    return start.stream
        return None

    async def wait_stream(self, stream: str | None = None, flt: Filter | None = None, *, max_wait: float) -> str:
        """Wait until *stream* is known, or a stream matching *flt* is live or starts; return its id.

        A matching stream that starts (and perhaps already ends) while waiting counts.

        Raises :class:`HttpStreamError` (404) after *max_wait* seconds, or (503) if the hub closes.
        """
        since = self._pos
        self.waiting += 1
        if stream is not None:
            self._waiting_ids[stream] = self._waiting_ids.get(stream, 0) + 1
            archive = archive_of(self.bus)
            # Started already (the index showed it) but not followed here: follow it now.
            if (
                archive is not None
                and not self.known(stream)
                and any(start.stream == stream for start in archive.live_starts())
            ):
                archive.follow(stream)
        if flt is not None:
            self._waiting_filters.append(flt)
        self._notify()  # lets tests and monitors see the new waiter without polling
        try:
            return await self._wait_stream(stream, flt, since, max_wait)
        finally:
            self.waiting -= 1
            if stream is not None:
                left = self._waiting_ids.pop(stream) - 1
                if left:
                    self._waiting_ids[stream] = left
            if flt is not None:
                self._waiting_filters.remove(flt)

    async def _wait_stream(self, stream: str | None, flt: Filter | None, since: int, max_wait: float) -> str:
        with anyio.move_on_after(max_wait):
            while True:
                if stream is not None and self.known(stream):
                    return stream
                if flt is not None:
                    found = self.pick(flt, since=since)
                    if found is not None:
                        return found
                if self._closed:
                    raise HttpStreamError("the bus is shutting down", status=503)
                await self.wait_changed()
        what = f"stream {stream!r}" if stream is not None else "a stream matching the filter"
        raise HttpStreamError(f"{what} did not start within {max_wait:g} s", status=404)


def _first_position(log_: StreamLog[tuple[int, Event]]) -> int:
    """Position in the global log of the oldest event the stream's history holds."""
    return log_.entries[0][2][0] if log_.entries else -1


class Cursor:
    """A reader's position in the hub's history; call :meth:`next_batch` in a loop.

    A stream cursor (``stream=...``) ends after the stream's terminal event; a
    filter cursor follows every matching stream until the hub closes.
    """

    __slots__ = (
        "__weakref__",
        "after_pos",
        "after_seq",
        "complete",
        "done",
        "filter",
        "hub",
        "lost",
        "stream",
        "streams",
    )

    def __init__(
        self,
        hub: StreamHub,
        *,
        stream: str | None = None,
        flt: Filter | None = None,
        after_seq: int = -1,
        after_pos: int = -1,
    ) -> None:
        self.hub = hub
        self.stream = stream
        self.filter = flt
        self.after_seq = after_seq
        self.after_pos = after_pos
        self.streams: set[str] = set()
        self.done = False
        """True once the stream ended (stream cursor) or the hub closed."""
        self.complete = False
        """True once a stream cursor delivered its stream's terminal event."""
        self.lost = False
        """True when the reader fell behind the bounded history and was ended."""

    def matches(self, start: StartEvent) -> bool:
        """Whether this reader serves the stream *start* begins (its stream, or its filter matches)."""
        if self.stream is not None:
            return start.stream == self.stream
        return self.filter is not None and self.filter.matches(start)

    def close(self) -> None:
        """The reader is gone: end the cursor, and with it the interest its filter gave an edge's engine."""
        self.done = True
        self.hub.release(self)

    def _read(self) -> list[Event]:
        hub = self.hub
        if self.stream is not None:
            out = hub.events_after(self.stream, self.after_seq)
            if out is None:
                self.lost = self.done = True
                return []
            if not out:
                if hub.ended(self.stream) and self.after_seq >= hub.last_seq(self.stream):
                    self.done = self.complete = True
                return []
            if out:
                self.after_seq = out[-1].seq
                if is_terminal(out[-1]):
                    self.done = self.complete = True
            return out
        assert self.filter is not None
        oldest = hub._oldest_pos()
        if self.after_pos < oldest - 1:
            self.lost = self.done = True
            return []
        start = hub._log_base + (self.after_pos + 1 - oldest)
        entries = hub._log[start:]
        if not entries:
            return []
        self.after_pos = entries[-1][0]
        streams = self.streams
        flt = self.filter
        everything = flt.matches_all
        out = []
        for _, event in entries:
            if type(event) is StartEvent and (everything or flt.matches(event)):
                streams.add(event.stream)
            if everything or event.stream in streams:
                out.append(event)
                if is_terminal(event):
                    streams.discard(event.stream)
        return out

    async def next_batch(self, max_wait: float | None = None) -> list[Event]:
        """Return the next events in order; ``[]`` after *max_wait* seconds idle or at the end.

        Check :attr:`done` (and :attr:`lost`) after an empty batch.
        """
        if self.done:
            return []
        with anyio.move_on_after(max_wait):
            while True:
                batch = self._read()
                if batch or self.done:
                    return batch
                if self.hub._closed:
                    self.done = True
                    return []
                await self.hub.wait_changed()
        return []
