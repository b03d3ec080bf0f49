"""The aggregator's per-event hot path, in pure Python: the behaviour reference.

``_hot_c.pyx`` is the same algorithm compiled with Cython (built when the
plugin is installed; :mod:`streambus_stats._impl` picks it when it is there).
Anything that is not the common case (a chunk of a stream that already has
its first content, carrying one chunk) is handled by :func:`slow_delta`
below, which both implementations call, so the compiled module only mirrors
:func:`feed`'s fast path. Change the two together; the tests feed both the
same random streams and compare every figure.

Per stream, each non-empty delta's text is kept (for counting tokens when the
provider did not report them) and its gap to the previous non-empty delta goes
straight to the group's ``inter_chunk_latency_seconds`` buffer
(:attr:`Distribution.pending`, ingested by numpy in batches). The per-stream
mean gap is ``(last - first) / gaps``: the sum of the gaps, telescoped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from streambus.events import DeltaEvent, Event, StartEvent

if TYPE_CHECKING:
    from ._aggregator import Aggregate
    from ._distribution import Distribution

__all__ = ["Feeder", "Gaps", "Live", "feed", "slow_delta"]

COMPILED = False


class Gaps:
    """A group's inter-chunk gaps on their way to its distribution: here, the distribution's own buffer.

    (The compiled module's ``Gaps`` collects them in a float64 array instead.)
    """

    __slots__ = ("dist", "pending")

    def __init__(self, dist: Distribution) -> None:
        self.dist = dist
        self.pending = dist.pending

    def flush(self) -> None:
        """Nothing to do: the gaps are in the distribution's buffer already."""


class Live:
    """What the aggregator tracks of a stream between its start and its terminal event."""

    __slots__ = (
        "agg",
        "done",
        "empty",
        "extra",
        "first",
        "first_content",
        "first_n",
        "first_ts",
        "gap_max",
        "last",
        "moderation",
        "pending",
        "start",
        "texts",
    )

    def __init__(self, start: StartEvent, agg: Aggregate) -> None:
        self.start = start
        self.agg = agg
        self.texts: list[str] = []
        """The text of every non-empty delta so far (one entry per delta)."""
        self.pending: list[float] = agg.gaps.pending
        """The group's inter-chunk gap buffer."""
        self.moderation: dict[str, int] = {}
        """Moderation actions on this stream, by action."""
        self.empty = 0
        self.extra = 0
        """Chunks beyond one carried by coalesced deltas (sum of ``n - 1``)."""
        self.first: float | None = None
        """ts of the first content or reasoning chunk (time to first chunk)."""
        self.first_content: float | None = None
        self.first_ts: float | None = None
        """ts of the first chunk on any channel: where the gaps start."""
        self.first_n = 0
        self.last: float | None = None
        """ts of the latest chunk."""
        self.gap_max = -math.inf
        self.done = False
        """Whether the stream has finished (left the live streams): see :meth:`close`."""

    def close(self) -> None:
        """The stream has finished (it left the live streams): mark it done.

        (The compiled ``Live`` also lets its texts go here: its id index may hold it a while longer.)
        """
        self.done = True

    @property
    def chunks(self) -> int:
        return len(self.texts) + self.extra

    @property
    def ngaps(self) -> int:
        """Gaps so far: one per chunk after the first delta's."""
        return self.chunks - self.first_n if self.first_ts is not None else 0

    def add_gap(self, gap: float) -> None:
        self.pending.append(gap)

    def add_gaps(self, gap: float, n: int) -> None:
        self.pending.extend([gap] * n)

    @property
    def gap_sum(self) -> float:
        """The sum of the gaps (raw, before clamping): the span from first to latest chunk."""
        if self.first_ts is None or self.last is None:
            return 0.0
        return self.last - self.first_ts


class Feeder:
    """Feeds batches of events to one aggregator's live streams (by :func:`feed`).

    The compiled module's ``Feeder`` also keeps an index of stream ids in
    front of *live*, so a delta's id is not hashed afresh for every event.
    """

    __slots__ = ("live",)

    def __init__(self, live: dict[str, Live]) -> None:
        self.live = live

    def feed(self, events: Sequence[Event], other: Callable[[Event], None]) -> int:
        """Account for *events*; hand every non-delta event to *other*; return the orphan deltas."""
        return feed(self.live, events, other)


def feed(live: dict[str, Live], events: Sequence[Event], other: Callable[[Event], None]) -> int:
    """Account for *events*; hand every non-delta event to *other*; return the orphan deltas."""
    orphans = 0
    get = live.get
    delta_type = DeltaEvent
    for event in events:
        if type(event) is delta_type:
            st = get(event.stream)
            if st is None:
                orphans += 1
                continue
            text = event.text
            if not text:
                st.empty += 1
                continue
            st.texts.append(text)
            last = st.last
            if last is None or st.first_content is None or event.n != 1:
                slow_delta(st, event)
                continue
            ts = event.ts
            st.last = ts
            gap = ts - last
            st.pending.append(gap)
            if gap > st.gap_max:
                st.gap_max = gap
        else:
            other(event)
    return orphans


def slow_delta(st: Any, event: DeltaEvent) -> None:
    """A non-empty delta (its text already kept) that is a stream's first, precedes its first content, or is coalesced.

    *st* is a :class:`Live` or the compiled module's ``Live``.
    """
    ts = event.ts
    n = event.n
    if n != 1:
        st.extra += n - 1
    channel = event.channel
    if channel != "tool":
        if st.first is None:
            st.first = ts
            st.agg.dists["time_to_first_chunk_seconds"].add(ts - st.start.ts)
        if st.first_content is None and channel == "content":
            st.first_content = ts
            st.agg.dists["time_to_first_content_seconds"].add(ts - st.start.ts)
    last = st.last
    st.last = ts
    if last is None:
        st.first_ts = ts
        st.first_n = n
        return
    gap = ts - last
    if n != 1:
        if n < 1:  # not a valid delta; it carries no chunk to time
            return
        # A delta that carries n chunks: its gap is taken as n equal gaps (evenly spread).
        gap = gap / n
        st.add_gaps(gap, n)
    else:
        st.add_gap(gap)
    if gap > st.gap_max:
        st.gap_max = gap
