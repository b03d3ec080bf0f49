"""Resumable, bounded per-stream history: what recovery (``since``) and snapshots are served from.

::

    history = StreamHistory(events_per_stream=2000, ttl=300, max_streams=10000, clock=anyio.current_time)
    history.record(event, encode(event))      # every event, in bus order
    history.missed("s1", last_seq=41)         # every event after seq 41, or None: reload
    history.snapshot("s1")                    # start + the text so far as one delta per channel

The payloads are bytes by default (what the websocket sink broadcast). A
history built with ``snapshots=False`` keeps payloads of any type (the http
hub keeps each event with its position in its global log)::

    positions: StreamHistory[tuple[int, Event]] = StreamHistory(100, math.inf, None, time.monotonic, snapshots=False)

Each stream keeps its last ``history_events`` encoded events (the bytes that
were broadcast, so a replay costs no encoding) and, while it is live, the text
so far of each channel for snapshots. An ended stream's history is kept for
``history_ttl`` seconds, then forgotten. At most ``max_streams`` streams are
remembered; past that the oldest ended (then the oldest live) stream goes. With
``max_ended``, at most that many ended streams are kept (the first to end goes).

Recovery is all or nothing: :meth:`StreamHistory.missed` returns every event after
the client's last seq, in order, or ``None`` when the history no longer covers
the gap. The payloads are the caller's encoding of each event (the bytes it
broadcast), so a replay costs no encoding. Time comes from the *clock* given
(``anyio.current_time`` under asyncio and trio alike); nothing here awaits.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar, overload

from .coalesce import MergedDelta
from .events import DeltaEvent, Event, StartEvent, encode, is_terminal

__all__ = ["StreamHistory", "StreamLog"]

P = TypeVar("P")


# A live stream's deltas are kept as they came and merged into its per-channel text every
# this many: a list append per token instead of a merge (see docs/decisions.md).
_FOLD_EVERY = 256


_channel_of = operator.attrgetter("channel")
_seq_of = operator.attrgetter("seq")
_stream_of = operator.attrgetter("stream")
_ONLY_DELTAS = {DeltaEvent}
_first_seq_of = operator.attrgetter("first_seq")
_payload_of = operator.itemgetter(2)


def _seq(entry: tuple[int, int, object]) -> int:
    return entry[1]


class StreamLog(Generic[P]):
    """History of one stream: its ``start``, its last events, its state."""

    __slots__ = (
        "bytes",
        "channels",
        "deltas",
        "dropped",
        "ended",
        "entries",
        "expires",
        "last_seq",
        "start",
        "start_data",
    )

    def __init__(self, limit: int) -> None:
        self.start: StartEvent | None = None
        self.start_data: P | None = None
        # (first source seq, seq, payload), oldest first.
        self.entries: deque[tuple[int, int, P]] = deque(maxlen=limit)
        self.bytes = 0
        """Bytes of the payloads held in ``entries`` (when the payloads are ``bytes``)."""
        self.dropped = 0
        """Events the per-stream bounds dropped (0: ``entries`` holds every event recorded)."""
        self.last_seq = -1
        self.ended = False
        self.expires = 0.0
        self.channels: dict[str, MergedDelta[bytes]] = {}
        """Per channel, the text of the deltas folded so far (snapshots of a live stream)."""
        self.deltas: list[DeltaEvent] = []
        """Deltas recorded since the last fold into ``channels`` (at most ``_FOLD_EVERY``)."""

    def fold(self) -> None:
        """Merge :attr:`deltas` into :attr:`channels`: one merged delta per channel, in seq order."""
        deltas = self.deltas
        if not deltas:
            return
        self.deltas = []
        channels = self.channels
        names = set(map(_channel_of, deltas))
        groups = [deltas] if len(names) == 1 else [[d for d in deltas if d.channel == name] for name in names]
        for group in groups:
            name = group[0].channel
            chan = channels.get(name)
            if chan is None:
                chan = channels[name] = MergedDelta(group[0])
                group = group[1:]
            chan.add_many(group)

    @property
    def complete(self) -> bool:
        """Whether the history still holds the stream from its ``start`` on."""
        return bool(self.entries) and self.entries[0][0] == 0


class StreamHistory(Generic[P]):
    """Recent events of every stream, bounded in events per stream, streams and time.

    :param events_per_stream: events kept per stream (``history_events``).
    :param ttl: seconds an ended stream stays recoverable (``history_ttl``; ``math.inf``: until evicted).
    :param max_streams: streams remembered at once (``None``: no bound; the bus bounds live streams).
    :param clock: monotonic clock (tests pass a fake one).
    :param bytes_per_stream: payload bytes kept per stream (oldest dropped first), or ``None``.
    :param max_ended: ended streams kept (the first to end goes first), or ``None``.
    :param snapshots: keep the text so far of live streams for :meth:`snapshot` (payloads are
        then ``bytes``); ``False`` keeps payloads of any type, the type the caller annotates.
    """

    @overload
    def __init__(
        self: StreamHistory[bytes],
        events_per_stream: int,
        ttl: float,
        max_streams: int | None,
        clock: Callable[[], float],
        *,
        bytes_per_stream: int | None = None,
        max_ended: int | None = None,
        snapshots: Literal[True] = True,
    ) -> None: ...

    @overload
    def __init__(
        self,
        events_per_stream: int,
        ttl: float,
        max_streams: int | None,
        clock: Callable[[], float],
        *,
        bytes_per_stream: int | None = None,
        max_ended: int | None = None,
        snapshots: Literal[False],
    ) -> None: ...

    def __init__(
        self,
        events_per_stream: int,
        ttl: float,
        max_streams: int | None,
        clock: Callable[[], float],
        *,
        bytes_per_stream: int | None = None,
        max_ended: int | None = None,
        snapshots: bool = True,
    ) -> None:
        if events_per_stream < 0 or (max_streams is not None and max_streams < 1) or ttl < 0:
            raise ValueError(
                f"StreamHistory: events_per_stream must be >= 0, max_streams >= 1 and ttl >= 0 "
                f"(got {events_per_stream}, {max_streams}, {ttl})"
            )
        if bytes_per_stream is not None and bytes_per_stream < 1:
            raise ValueError(f"StreamHistory: bytes_per_stream must be at least 1 or None, got {bytes_per_stream}")
        if max_ended is not None and max_ended < 0:
            raise ValueError(f"StreamHistory: max_ended must be >= 0 or None, got {max_ended}")
        self.bytes_per_stream = bytes_per_stream
        self.events_per_stream = events_per_stream
        self.ttl = ttl
        self.max_streams = max_streams
        self.max_ended = max_ended
        self.snapshots = snapshots
        self._clock = clock
        self._logs: OrderedDict[str, StreamLog[P]] = OrderedDict()
        # The logs not ended, in the order first seen: live() without a scan of every remembered
        # stream (a websocket subscribe asks for them, and a server remembers thousands).
        self._live: dict[str, StreamLog[P]] = {}
        self._ended: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._logs)

    def get(self, stream: str) -> StreamLog[P] | None:
        """The log of *stream*, if remembered."""
        return self._logs.get(stream)

    def logs(self) -> list[StreamLog[P]]:
        """Logs of every remembered stream, live or ended, in the order they were first seen."""
        return list(self._logs.values())

    def live(self) -> list[StreamLog[P]]:
        """Logs of the streams that have not ended, oldest first."""
        return list(self._live.values())

    def record(self, event: Event, data: P) -> StreamLog[P]:
        """Append *event* (already encoded as *data*, its payload) to its stream's history."""
        stream = event.stream
        log = self._logs.get(stream)
        if log is None:
            log = self._logs[stream] = self._live[stream] = StreamLog(self.events_per_stream)
            if self.max_streams is not None and len(self._logs) > self.max_streams:
                self._evict_one()
        seq = event.seq
        if type(event) is DeltaEvent:
            # The hot path (every token): the append inlined, the snapshot text kept as the
            # events themselves and folded every _FOLD_EVERY deltas (see StreamLog.fold).
            entries = log.entries
            limit = entries.maxlen
            if self.bytes_per_stream is None and limit:
                if len(entries) == limit:
                    old = entries[0][2]
                    if isinstance(old, bytes):
                        log.bytes -= len(old)
                    log.dropped += 1
                first = event.first_seq
                entries.append((seq if first is None else first, seq, data))
                if isinstance(data, bytes):
                    log.bytes += len(data)
            else:
                first = event.first_seq
                self._append(log, seq if first is None else first, seq, data)
            log.last_seq = seq
            if self.snapshots and not log.ended:
                deltas = log.deltas
                deltas.append(event)
                if len(deltas) >= _FOLD_EVERY:
                    log.fold()
            return log
        if type(event) is StartEvent:
            log.start = event
            log.start_data = data
        self._append(log, seq, seq, data)
        log.last_seq = seq
        if is_terminal(event):
            log.ended = True
            self._live.pop(stream, None)
            log.channels = {}
            log.deltas = []
            log.expires = self._clock() + self.ttl
            ended = self._ended
            ended.append((log.expires, stream))
            if self.max_ended is not None and len(ended) > self.max_ended:
                self._forget_ended(ended.popleft())
        return log

    def record_deltas(self, deltas: Sequence[DeltaEvent], payloads: Sequence[P]) -> StreamLog[P]:
        """Append *deltas*, consecutive deltas of one stream encoded as *payloads*, as :meth:`record` would.

        The same history as recording them one by one, in one call: a reader
        that takes events in batches (the websocket sink) pays the bookkeeping
        once per batch instead of once per token.
        """
        if not deltas or len(deltas) != len(payloads):
            raise ValueError(
                f"StreamHistory.record_deltas: needs as many payloads as deltas, at least one "
                f"(got {len(deltas)} deltas, {len(payloads)} payloads)"
            )
        stream = deltas[0].stream
        log = self._logs.get(stream)
        entries = log.entries if log is not None else None
        limit = entries.maxlen if entries is not None else None
        if (
            log is None
            or entries is None
            or not limit
            or len(deltas) > limit
            or self.bytes_per_stream is not None
            or log.ended
            or set(map(type, deltas)) != _ONLY_DELTAS
            or len(set(map(_stream_of, deltas))) != 1
        ):
            # The general case, one event at a time (a new stream, per-stream byte bounds, ...).
            for event, payload in zip(deltas, payloads, strict=True):
                log = self.record(event, payload)
            assert log is not None
            return log
        size: Callable[[P], int] = len if self.snapshots else _size  # type: ignore[assignment]  # bytes with snapshots
        drop = len(entries) + len(deltas) - limit
        if drop > 0:
            log.bytes -= sum(map(size, map(_payload_of, itertools.islice(entries, drop))))
            log.dropped += drop
        seqs = list(map(_seq_of, deltas))
        firsts: list[int | None] = list(map(_first_seq_of, deltas))
        if firsts.count(None) == len(firsts):
            entries.extend(zip(seqs, seqs, payloads, strict=True))
        else:
            starts = [s if f is None else f for f, s in zip(firsts, seqs, strict=True)]
            entries.extend(zip(starts, seqs, payloads, strict=True))
        log.bytes += sum(map(size, payloads))
        log.last_seq = seqs[-1]
        if self.snapshots:
            held = log.deltas
            held.extend(deltas)
            if len(held) >= _FOLD_EVERY:
                log.fold()
        return log

    def _forget_ended(self, entry: tuple[float, str]) -> None:
        expires, stream = entry
        log = self._logs.get(stream)
        # Skip an entry left behind by an evicted stream or by an id that ended twice.
        if log is not None and log.ended and log.expires == expires:
            del self._logs[stream]

    def _append(self, log: StreamLog[P], first: int, seq: int, data: P) -> None:
        entries = log.entries
        if entries.maxlen == 0:
            log.dropped += 1
            return
        if len(entries) == entries.maxlen:
            log.bytes -= _size(entries.popleft()[2])
            log.dropped += 1
        entries.append((first, seq, data))
        log.bytes += _size(data)
        limit = self.bytes_per_stream
        if limit is not None:
            # The oldest go first; the newest event stays even when it alone is larger.
            while log.bytes > limit and len(entries) > 1:
                log.bytes -= _size(entries.popleft()[2])
                log.dropped += 1

    def fill(self: StreamHistory[bytes], events: Sequence[Event]) -> bool:
        """Hold a stream as fetched from an engine (:meth:`streambus.archive.StreamArchive.fetch`).

        *events* are one stream's events from its ``start`` on, gap-free, in
        seq order. They replace what the history holds of that stream unless
        it already holds as much (its last seq is at or past theirs). Returns
        whether they were taken; the caller then drops the stream's events up
        to the last seq filled when they arrive through the bus again.
        """
        if not events or type(events[0]) is not StartEvent or events[0].seq != 0:
            raise ValueError("StreamHistory.fill: the events must begin with the stream's start (seq 0)")
        stream = events[0].stream
        held = self._logs.get(stream)
        if held is not None and held.last_seq >= events[-1].seq:
            return False
        self._logs.pop(stream, None)
        self._live.pop(stream, None)
        for event in events:
            if event.stream != stream:
                raise ValueError(f"StreamHistory.fill: event of stream {event.stream!r} among those of {stream!r}")
            self.record(event, encode(event))
        return True

    def recently_ended(self, limit: int, matches: Callable[[StartEvent], bool]) -> list[list[P]]:
        """Every event of up to *limit* ended streams whose ``start`` *matches*, the streams in the order they ended.

        Only streams still held whole (from their ``start``) count: the most
        recently ended ones, since older ones are the first to expire.
        """
        found: list[list[P]] = []
        for expires, stream in reversed(self._ended):
            if len(found) >= limit:
                break
            log = self._logs.get(stream)
            # A stream id can end twice (a recording replayed with its ids): count its latest end only.
            if log is None or not log.ended or log.expires != expires or not log.complete:
                continue
            if log.start is not None and matches(log.start):
                found.append([data for _, _, data in log.entries])
        found.reverse()
        return found

    def expire(self) -> None:
        """Forget ended streams whose ``history_ttl`` has passed."""
        now = self._clock()
        ended = self._ended
        while ended and ended[0][0] <= now:
            _, stream = ended.popleft()
            log = self._logs.get(stream)
            if log is not None and log.ended and log.expires <= now:
                del self._logs[stream]

    def _evict_one(self) -> None:
        for stream, log in self._logs.items():
            if log.ended:
                del self._logs[stream]
                return
        stream, _ = self._logs.popitem(last=False)
        self._live.pop(stream, None)

    def missed(self, stream: str, last_seq: int) -> list[P] | None:
        """Every event of *stream* after *last_seq*, in order; ``None`` if not fully covered.

        An empty list means the client missed nothing. ``None`` means the
        stream is unknown (expired, evicted, from another server) or its
        oldest retained event is past ``last_seq + 1``: the client must reload.
        """
        found = self._missed_from(stream, last_seq)
        if found is None:
            return None
        log, index = found
        return [data for _, _, data in itertools.islice(log.entries, index, None)]

    def missed_size(self, stream: str, last_seq: int) -> tuple[int, int] | None:
        """What :meth:`missed` would return, measured without building it: ``(events, payload bytes)``.

        ``None`` exactly when :meth:`missed` returns ``None``; payloads that
        are not ``bytes`` count 0 bytes. A server checks a replay against its
        budget with this before gathering it, so a request it must refuse costs
        it no copy: the whole stream's size is known at once, a part of it
        costs a pass over the shorter of that part and the rest.
        """
        found = self._missed_from(stream, last_seq)
        if found is None:
            return None
        log, index = found
        entries = log.entries
        count = len(entries) - index
        if index <= count:  # the part skipped is the shorter: count it and subtract
            skipped = sum(_size(data) for _, _, data in itertools.islice(entries, index))
            return count, log.bytes - skipped
        return count, sum(_size(data) for _, _, data in itertools.islice(entries, index, None))

    def _missed_from(self, stream: str, last_seq: int) -> tuple[StreamLog[P], int] | None:
        # The log and the index of the first entry after last_seq (len(entries): nothing missed),
        # or None when the history cannot answer (see missed).
        log = self._logs.get(stream)
        if log is None or last_seq > log.last_seq:
            return None
        entries = log.entries
        if last_seq == log.last_seq:
            return log, len(entries)
        if not entries or entries[0][0] > last_seq + 1:
            return None
        # Entries are in seq order: find the first one after last_seq without scanning
        # the ones before it (a client may name many streams, each nearly caught up).
        index = bisect.bisect_right(entries, last_seq, key=_seq)
        if index < len(entries) and entries[index][0] <= last_seq:
            # The client holds half of a coalesced delta: it cannot be split.
            return None
        return log, index

    def find(self, stream: str, seq: int) -> P | None:
        """The payload of *stream*'s event *seq* (a coalesced delta by its last seq), if still held."""
        log = self._logs.get(stream)
        if log is None:
            return None
        entries = log.entries
        index = bisect.bisect_left(entries, seq, key=_seq)
        if index < len(entries) and entries[index][1] == seq:
            return entries[index][2]
        return None

    def replay_all(self, stream: str) -> list[P] | None:
        """Every event of *stream* from its ``start``; ``None`` if the start was already dropped."""
        log = self._logs.get(stream)
        if log is None or not log.complete:
            return None
        return [data for _, _, data in log.entries]

    def snapshot(self: StreamHistory[bytes], stream: str) -> list[bytes] | None:
        """The ``start`` of a live stream, then one coalesced delta per channel, in seq order.

        ``None`` if the stream is not live here or its ``start`` was never seen
        (or the history was built with ``snapshots=False``).
        """
        log = self._logs.get(stream)
        if not self.snapshots or log is None or log.ended or log.start_data is None:
            return None
        log.fold()
        frames = [log.start_data]
        for chan in sorted(log.channels.values(), key=lambda chan: chan.seq):
            frames.append(encode(chan.event()))
        return frames


def _size(data: object) -> int:
    return len(data) if isinstance(data, bytes) else 0
