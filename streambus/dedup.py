"""De-duplication by (``stream``, ``seq``): at-least-once in, exactly-once out.

An engine that delivers at least once (Redis Streams, NATS JetStream: a
re-sent batch, a consumer re-reading after a restart) hands every event to a
:class:`Deduplicator`; only the events it judges :attr:`Verdict.NEW` reach
the bus, so sinks see each event exactly once. ``GAP`` says events of the
stream are missing before this one: end the stream with an ``error`` event
rather than deliver text with a hole in it. Engine plugins share this one
implementation (``streambus_redis`` re-exports it under its old names).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event

__all__ = ["Deduplicator", "Verdict"]

_TERMINAL = frozenset({EndEvent, ErrorEvent, AbortEvent})


class Verdict(enum.Enum):
    """What :meth:`Deduplicator.check` decided about one event."""

    NEW = "new"
    """Deliver it: the next event of its stream (or the first one seen of that stream)."""
    DUPLICATE = "duplicate"
    """Drop it: already delivered (or its stream already ended)."""
    GAP = "gap"
    """Events of its stream are missing before it: end that stream with an error."""


class Deduplicator:
    """Remembers the last ``seq`` delivered per stream and judges each new event.

    Per stream, events must come in ``seq`` order (an engine keeps the order
    of what one sink wrote for one stream), so "seen" is
    simply ``seq <= last``. A coalesced delta counts from its ``first_seq``.
    Live streams are all remembered; ended streams are kept for the last
    *max_ended* streams, so a duplicate arriving after a stream's end is still
    recognised while memory stays bounded.
    """

    __slots__ = ("_ended", "_last", "max_ended")

    def __init__(self, *, max_ended: int = 100_000) -> None:
        if max_ended < 1:
            raise ValueError(f"max_ended: must be at least 1, got {max_ended}")
        self.max_ended = max_ended
        self._last: dict[str, int] = {}
        self._ended: OrderedDict[str, int] = OrderedDict()

    def check(self, event: Event) -> Verdict:
        """Judge *event*; a ``NEW`` event is recorded as delivered."""
        # The hot path of every consumer: one dict lookup for the usual case.
        stream = event.stream
        seq = event.seq
        last = self._last.get(stream)
        if last is None:
            if stream in self._ended:
                return Verdict.DUPLICATE
        elif seq <= last:
            return Verdict.DUPLICATE
        elif seq != last + 1:
            low = event.first_seq if type(event) is DeltaEvent and event.first_seq is not None else seq
            if low > last + 1:
                return Verdict.GAP
        if type(event) in _TERMINAL:
            self.end(stream, seq)
        else:
            self._last[stream] = seq
        return Verdict.NEW

    def accept_next(self, stream: str, seq: int) -> bool:
        """Record *seq* as delivered if it directly follows the last seq of the live *stream*.

        The fast path for the usual event, a plain delta right after its
        predecessor: ``True`` means deliver it. ``False`` decides nothing
        (unknown or ended stream, duplicate, hole, terminal event): judge the
        event with :meth:`check`. Never use it for a terminal event.
        """
        last = self._last.get(stream)
        if last is None or seq != last + 1:
            return False
        self._last[stream] = seq
        return True

    def last(self, stream: str) -> int | None:
        """The last seq delivered of *stream*, or ``None`` if never seen."""
        if stream in self._ended:
            return self._ended[stream]
        return self._last.get(stream)

    def knows(self, stream: str) -> bool:
        """Whether any event of *stream* was delivered (or seeded)."""
        return stream in self._last or stream in self._ended

    def end(self, stream: str, seq: int) -> None:
        """Mark *stream* ended at *seq*: every later event of it is a duplicate."""
        self._last.pop(stream, None)
        ended = self._ended
        ended[stream] = seq
        ended.move_to_end(stream)
        while len(ended) > self.max_ended:
            ended.popitem(last=False)

    @property
    def live(self) -> dict[str, int]:
        """Streams seen but not ended, with their last seq."""
        return dict(self._last)

    def seed(self, events: Iterable[Event]) -> int:
        """Mark *events* as already delivered (e.g. a recording written before a restart).

        Returns how many were new. Use it so a restarted recorder does not
        write again what it wrote before it was killed.
        """
        count = 0
        for event in events:
            if self.check(event) is Verdict.NEW:
                count += 1
        return count

    def snapshot(self, *, ended: int = 100) -> dict[str, Any]:
        """A JSON-able state: every live stream and the last *ended* ended streams.

        Saved with a consumer's position: events after that position belong to
        live streams (or are re-sent duplicates of recently ended ones).
        """
        tail = list(self._ended.items())[-ended:] if ended else []
        return {"live": dict(self._last), "ended": dict(tail)}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a :meth:`snapshot` (merging with what is known)."""
        for stream, seq in dict(state.get("live") or {}).items():
            if stream not in self._ended and seq > self._last.get(stream, -1):
                self._last[stream] = int(seq)
        for stream, seq in dict(state.get("ended") or {}).items():
            self.end(stream, int(seq))
