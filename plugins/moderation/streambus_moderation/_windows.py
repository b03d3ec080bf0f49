"""The moderation stage's per-stream state and its one window scheduler.

:class:`ChannelText` is one moderated channel of one stream: its text, and
offsets (counting source characters, before any redaction) that say how far
it got::

    total       characters that arrived
    scheduled   checks started for [0, scheduled)
    checked     verdicts applied for [0, checked)
    allowed     text before this may go out
    released    text before this went out

:class:`WindowScheduler` decides which text gets checked when: windows of
``window_chars`` characters, each starting ``overlap`` characters before the
previous one ended, up to ``max_concurrent`` checks per stream at once, the
final partial window when the stream ends, and verdicts handed back in the
order the windows were cut. What a verdict *does* (hold, release, redact,
retract, abort) is the stage's and its strategy's business, not this module's.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from streambus.events import Channel, Event

from .verdict import Verdict

__all__ = ["ChannelText", "Finding", "HeldText", "StreamState", "Window", "WindowScheduler"]


@dataclasses.dataclass(slots=True)
class HeldText:
    """One delta waiting in a stream's output queue: source offsets ``[start, end)`` of its channel."""

    channel: Channel
    start: int
    end: int
    n: int
    ts: float


@dataclasses.dataclass(slots=True)
class Finding:
    """Source text ``[start, end)`` of a channel that a verdict (labelled *verdict*) found violating."""

    start: int
    end: int
    categories: list[str]
    scores: dict[str, float]
    verdict: str


@dataclasses.dataclass(slots=True, eq=False)
class ChannelText:
    """Text and progress of one moderated channel of one stream (see the module docstring)."""

    name: Channel
    # Source text as the deltas brought it: chunks[i] starts at offset starts[i].
    # Appending and slicing a window cost what they touch, however far the
    # producer runs ahead of the moderator.
    chunks: list[str] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)
    head: int = 0  # chunks before this index were trimmed
    total: int = 0
    scheduled: int = 0
    checked: int = 0
    allowed: int = 0
    released: int = 0
    redactions: list[Finding] = dataclasses.field(default_factory=list)
    masked: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """Spans already reported, blanked out of later windows so they are not reported twice."""
    arrivals: deque[tuple[int, float]] = dataclasses.field(default_factory=deque)
    """``(end offset, time.monotonic())`` of each delta, until a window is cut there."""

    def append(self, text: str, now: float) -> tuple[int, int]:
        """Add a delta's *text* (arrived at monotonic time *now*); return its ``(start, end)``."""
        start = self.total
        self.chunks.append(text)
        self.starts.append(start)
        self.total += len(text)
        self.arrivals.append((self.total, now))
        return start, self.total

    def ready_at(self, end: int, default: float) -> float:
        """When the text up to *end* had arrived."""
        arrivals = self.arrivals
        while arrivals and arrivals[0][0] < end:
            arrivals.popleft()
        return arrivals[0][1] if arrivals else default

    def window(self, start: int, end: int) -> str:
        """Source text ``[start, end)`` with already reported spans blanked out."""
        text = self.slice(start, end)
        for ms, me in self.masked:
            if me <= start or ms >= end:
                continue
            a, b = max(ms, start) - start, min(me, end) - start
            text = text[:a] + " " * (b - a) + text[b:]
        return text

    def is_masked(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` lies inside a span already reported."""
        return any(ms <= start and end <= me for ms, me in self.masked)

    def mask(self, start: int, end: int) -> None:
        """Hide a reported span from later windows, so it is not reported twice."""
        self.masked.append((start, end))

    def redact(self, redaction: Finding) -> None:
        """Send *redaction* out as the replacement, merged with any redaction it overlaps."""
        keep: list[Finding] = []
        for r in self.redactions:
            if r.end <= redaction.start or r.start >= redaction.end:
                keep.append(r)
                continue
            redaction.start = min(r.start, redaction.start)
            redaction.end = max(r.end, redaction.end)
            redaction.categories = sorted({*r.categories, *redaction.categories})
            redaction.scores = {**r.scores, **redaction.scores}
        keep.append(redaction)
        keep.sort(key=lambda r: r.start)
        self.redactions = keep

    def allow(self, upto: int) -> None:
        """Let text before *upto* out, never stopping inside a redaction."""
        upto = max(self.allowed, upto)
        for r in self.redactions:
            if r.start < upto < r.end:
                upto = r.end
        self.allowed = min(max(upto, self.allowed), self.total)

    def to_output(self, pos: int, replacement: str) -> int:
        """Map a source offset to an offset in the delivered text."""
        shift = 0
        for r in self.redactions:
            if r.end <= pos:
                shift += len(replacement) - (r.end - r.start)
            elif r.start < pos:
                return r.start + shift
        return pos + shift

    def output(self, start: int, end: int, replacement: str) -> str:
        """The delivered form of source ``[start, end)``: redactions replaced."""
        parts: list[str] = []
        pos = start
        for r in self.redactions:
            if r.end <= start:
                continue
            if r.start >= end:
                break
            if r.start > pos:
                parts.append(self.slice(pos, r.start))
            if r.start >= start:
                parts.append(replacement)
            pos = max(pos, r.end)
        if pos < end:
            parts.append(self.slice(pos, end))
        return "".join(parts)

    def slice(self, start: int, end: int) -> str:
        """Source text ``[start, end)``."""
        if end <= start:
            return ""
        starts, chunks = self.starts, self.chunks
        i = max(self.head, bisect.bisect_right(starts, start, lo=self.head) - 1)
        parts: list[str] = []
        while i < len(chunks) and starts[i] < end:
            offset = starts[i]
            parts.append(chunks[i][max(0, start - offset) : end - offset])
            i += 1
        return "".join(parts)

    def trim(self, overlap: int) -> None:
        """Forget text no window or release needs any more."""
        keep = min(self.released, max(0, self.checked - overlap))
        starts = self.starts
        while self.head + 1 < len(starts) and starts[self.head + 1] <= keep:
            self.head += 1
        if self.head > 1024:
            del self.chunks[: self.head]
            del self.starts[: self.head]
            self.head = 0
            self.masked = [(s, e) for s, e in self.masked if e > keep]


@dataclasses.dataclass(slots=True, eq=False)
class StreamState:
    """Everything the stage keeps about one stream it moderates."""

    id: str
    seq: int
    """The seq of the next event the stage publishes for this stream."""
    channels: dict[str, ChannelText] = dataclasses.field(default_factory=dict)
    queue: deque[HeldText | Event] = dataclasses.field(default_factory=deque)
    """Output waiting to go out, in the producer's order."""
    terminal: Event | None = None
    """The producer's terminal event, held until the last window's verdict."""
    terminal_at: float = 0.0
    closing: bool = False
    """The bus is closing: check what is left and end."""
    finished: bool = False
    """Stop checking: the stream ended, was aborted or failed."""
    ended: bool = False
    """The moderated stream's terminal event went out."""
    lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)
    """Held while changing what may go out and publishing it."""
    wake: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    """Set when the scheduler has something to do (:meth:`poke`)."""
    progress: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    """Set when checked text makes room for a producer waiting on ``max_pending_chars``."""

    @property
    def ending(self) -> bool:
        """Whether no more text will arrive (so the final partial window may be checked)."""
        return self.terminal is not None or self.closing

    def channel(self, name: Channel) -> ChannelText:
        """The state of channel *name*, created on first use."""
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channels[name] = ChannelText(name)
        return ch

    def next_seq(self) -> int:
        """Take the next seq of the moderated stream."""
        seq = self.seq
        self.seq += 1
        return seq

    def poke(self) -> None:
        """Wake the scheduler."""
        self.wake.set()


@dataclasses.dataclass(slots=True)
class Window:
    """Source text ``[start, end)`` of one channel, cut for one check."""

    channel: ChannelText
    start: int
    end: int
    final: bool
    """The last window of the stream: shorter than ``window_chars``, and no window follows."""
    text: str
    """What the moderator sees: the source text with spans already reported blanked out."""
    ready_at: float
    """When its last character arrived (``time.monotonic``; ``max_hold_ms`` counts from here)."""
    result: tuple[Verdict, str] | None = None
    """The verdict and its label (``flagged``, ``timeout``, ``error``), once the check is done."""


Judge = Callable[[StreamState, Window], Awaitable[tuple[Verdict, str]]]
Conclude = Callable[[StreamState, Window], Awaitable[None]]


class WindowScheduler:
    """Cut each stream's text into overlapping windows and check them, several at a time, in order."""

    def __init__(self, window_chars: int, overlap: int, max_concurrent: int) -> None:
        self.window_chars = window_chars
        self.overlap = overlap
        self.max_concurrent = max_concurrent

    def has_full_window(self, ch: ChannelText) -> bool:
        """Whether *ch* holds a whole window that no check has started on yet."""
        return ch.total >= max(0, ch.scheduled - self.overlap) + self.window_chars

    async def run(self, st: StreamState, judge: Judge, conclude: Conclude) -> None:
        """Check *st*'s windows until all its text is checked and it is ending, or until ``st.finished``.

        *judge* gives a window's verdict (calls run concurrently); *conclude*
        applies it (called one at a time, in window order). Wake the scheduler
        with ``st.poke()`` when text arrives or the stream ends.
        """
        async with anyio.create_task_group() as tg:
            inflight: deque[Window] = deque()
            while not st.finished:
                wake = st.wake = anyio.Event()
                self._launch(st, tg, inflight, judge)
                progressed = False
                while inflight and inflight[0].result is not None and not st.finished:
                    await conclude(st, inflight.popleft())
                    progressed = True
                if st.finished:
                    break
                if not inflight and st.ending and all(ch.scheduled >= ch.total for ch in st.channels.values()):
                    break
                if not progressed:
                    await wake.wait()
            tg.cancel_scope.cancel()  # an abort leaves checks in flight: they no longer matter

    def _launch(self, st: StreamState, tg: anyio.abc.TaskGroup, inflight: deque[Window], judge: Judge) -> None:
        """Start checks of every window that is ready, up to ``max_concurrent`` in flight."""
        for ch in st.channels.values():
            while len(inflight) < self.max_concurrent:
                start = max(0, ch.scheduled - self.overlap)
                end = start + self.window_chars
                final = ch.total < end
                if final:
                    if not (st.ending and ch.total > ch.scheduled):
                        break
                    end = ch.total
                ended_at = st.terminal_at if final and st.terminal is not None else time.monotonic()
                window = Window(ch, start, end, final, ch.window(start, end), ch.ready_at(end, ended_at))
                ch.scheduled = end
                inflight.append(window)
                tg.start_soon(self._check, st, window, judge)

    @staticmethod
    async def _check(st: StreamState, window: Window, judge: Judge) -> None:
        window.result = await judge(st, window)
        st.poke()
