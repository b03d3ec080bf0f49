"""The moderation stage: moderate streamed text in overlapping windows.

::

    async with Bus() as bus:
        bus.add_sink(ModerationStage(moderator=KeywordModerator(words={"violence": ["kill"]})))
        bus.add_sink(audit_recorder, raw=True)   # sees the producers' stream
        bus.add_sink(websocket)                  # sees only moderated events

The stage is *interposed* (``interpose = True``): the bus hands it the raw
stream and every non-raw subscriber sees only what it republishes. Per stream
and moderated channel, text is checked in windows of ``window_chars``
characters whose first ``overlap_chars`` are carried over from the previous
window, so a term split across deltas or across two windows is still seen
whole; the final partial window is checked before the terminal event is
released.

Modes:

``gate``
    Text is held until a window containing it is approved. The last
    ``overlap_chars`` of an approved window stay held until the next window
    (which contains them again) is approved too, so not even the first half
    of a split term leaks. On a violation the span is replaced by
    ``replacement`` (action ``redact``) or the stream is aborted (``abort``).
    ``max_hold_ms`` bounds how long a ready window may wait for a slow
    moderator: ``hold_policy = "release"`` lets its text through unapproved
    (a late violation then becomes a ``retract``), ``"block"`` withholds it
    as if flagged.
``observe``
    Text flows at once; moderation runs alongside and a violation becomes a
    ``moderation`` event with action ``flag``, ``retract`` (clients remove
    the span already shown) or ``abort``.

Moderated output is renumbered: ``seq`` is gap-free per stream, counting the
inserted ``moderation`` events and merged deltas (released text of one
channel is sent as one delta whose ``n`` sums the merged chunks). Offsets in
``moderation`` events count characters of the channel's text as delivered.
Aborting calls :meth:`Bus.abort <streambus.Bus.abort>` (the producer is
cancelled and closes its upstream connection) and ends the moderated stream
with ``abort`` by ``moderation``.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque
from typing import Any, ClassVar, Literal

import anyio
import anyio.abc
import msgspec
import structlog
from msgspec.structs import replace

from streambus import Bus, BusClosed, Subscription
from streambus.events import (
    AbortEvent,
    Channel,
    DeltaEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
    is_terminal,
)
from streambus.plugins import NonNegativeInt, PluginBase, PositiveFloat, PositiveInt, check_bounds

from .verdict import Moderator, Span, Verdict, load_moderator

__all__ = ["ModerationStage", "ModerationStats"]

log = structlog.get_logger("streambus.moderation")

Mode = Literal["gate", "observe"]
Action = Literal["redact", "abort", "flag", "retract"]
_GATE_ACTIONS = ("redact", "abort")
_OBSERVE_ACTIONS = ("flag", "retract", "abort")


@dataclasses.dataclass
class ModerationStats:
    """Counters of one stage; read them from :attr:`ModerationStage.stats`."""

    windows: int = 0
    """Windows sent to the moderator."""
    flagged: int = 0
    """Windows with at least one new violation."""
    timeouts: int = 0
    """Moderator calls that exceeded ``timeout_ms``."""
    errors: int = 0
    """Moderator calls that raised (or returned something that is not a verdict)."""
    failed_open: int = 0
    """Timeouts and errors let through by ``on_error = "fail_open"``."""
    failed_closed: int = 0
    """Timeouts and errors treated as violations by ``on_error = "fail_closed"``."""
    hold_released: int = 0
    """Windows released unapproved because ``max_hold_ms`` passed (``hold_policy = "release"``)."""
    hold_blocked: int = 0
    """Windows withheld because ``max_hold_ms`` passed (``hold_policy = "block"``)."""
    redacted: int = 0
    retracted: int = 0
    aborted: int = 0


class _Text:
    """Held text of one delta: source offsets ``[start, end)`` of its channel."""

    __slots__ = ("channel", "end", "n", "start", "ts")

    def __init__(self, channel: Channel, start: int, end: int, n: int, ts: float) -> None:
        self.channel = channel
        self.start = start
        self.end = end
        self.n = n
        self.ts = ts


class _Redaction:
    __slots__ = ("categories", "end", "scores", "start", "verdict")

    def __init__(self, start: int, end: int, categories: list[str], scores: dict[str, float], verdict: str) -> None:
        self.start = start
        self.end = end
        self.categories = categories
        self.scores = scores
        self.verdict = verdict


class _Channel:
    """Moderation state of one channel of one stream (offsets count source characters)."""

    __slots__ = (
        "allowed",
        "arrivals",
        "checked",
        "chunks",
        "head",
        "masked",
        "name",
        "redactions",
        "released",
        "scheduled",
        "starts",
        "total",
    )

    def __init__(self, name: Channel) -> None:
        self.name = name
        # Source text as the deltas brought it: chunks[i] starts at offset starts[i].
        # Appending and slicing a window cost what they touch, however far the
        # producer runs ahead of the moderator.
        self.chunks: list[str] = []
        self.starts: list[int] = []
        self.head = 0  # chunks before this index were trimmed
        self.total = 0
        self.checked = 0  # verdicts applied for [0, checked)
        self.scheduled = 0  # checks started for [0, scheduled)
        self.allowed = 0  # text before this may be released
        self.released = 0  # text before this was released
        self.redactions: list[_Redaction] = []
        self.masked: list[tuple[int, int]] = []  # reported spans, hidden from later windows' context
        self.arrivals: deque[tuple[int, float]] = deque()  # (end offset, monotonic time) per delta

    def append(self, text: str, now: float) -> tuple[int, int]:
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
        return any(ms <= start and end <= me for ms, me in self.masked)

    def mask(self, start: int, end: int) -> None:
        self.masked.append((start, end))

    def redact(self, redaction: _Redaction) -> None:
        """Add a redaction, merging it with any it overlaps."""
        keep: list[_Redaction] = []
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


class _Pending:
    """A window whose check is in flight; ``result`` is set when the verdict is in."""

    __slots__ = ("ch", "end", "final", "result", "start")

    def __init__(self, ch: _Channel, start: int, end: int, final: bool) -> None:
        self.ch = ch
        self.start = start
        self.end = end
        self.final = final
        self.result: tuple[Verdict, str] | None = None


class _Stream:
    __slots__ = (
        "channels",
        "closing",
        "ended",
        "finished",
        "id",
        "lock",
        "progress",
        "queue",
        "seq",
        "terminal",
        "terminal_at",
        "wake",
    )

    def __init__(self, stream: str, first_seq: int) -> None:
        self.id = stream
        self.seq = first_seq
        self.channels: dict[str, _Channel] = {}
        self.queue: deque[_Text | Event] = deque()
        self.terminal: Event | None = None
        self.terminal_at = 0.0
        self.closing = False
        self.finished = False
        self.ended = False  # the moderated stream's terminal event went out
        self.lock = anyio.Lock()
        self.wake = anyio.Event()
        self.progress = anyio.Event()

    def channel(self, name: Channel) -> _Channel:
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channels[name] = _Channel(name)
        return ch

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def poke(self) -> None:
        self.wake.set()


class ModerationStage(PluginBase):
    """Moderate streamed text between producers and the sinks that must see it moderated.

    Add it with :meth:`Bus.add_sink <streambus.Bus.add_sink>` (or ``type =
    "moderation"`` in a pipeline); give it a moderator object in Python, or
    a ``[sinks.moderator]`` table naming one by entry point in a config.
    Sinks that must see the producers' stream (audit recording) subscribe
    with ``raw = True``.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``moderation`` stage."""

        moderator: dict[str, Any] | None = None
        """The moderator table: ``type`` (an entry point of ``streambus.moderators``) and its options."""
        mode: Mode = "gate"
        action: Action | None = None
        """On a violation: ``redact`` (default) or ``abort`` in gate mode;
        ``retract`` (default), ``flag`` or ``abort`` in observe mode."""
        window_chars: PositiveInt = 256
        """Characters per checked window, overlap included."""
        overlap_chars: NonNegativeInt | None = None
        """Characters of the previous window carried into the next (default: a quarter of the
        window, at most 32; raised to the moderator's ``context_chars``)."""
        channels: list[Channel] = msgspec.field(default_factory=lambda: ["content", "reasoning"])
        """Channels to moderate; others pass through in order."""
        timeout_ms: PositiveFloat = 5000.0
        """Longest a moderator call may take before ``on_error`` applies."""
        on_error: Literal["fail_open", "fail_closed"] = "fail_closed"
        """Moderator timeouts and errors: let the window through, or treat it as a violation."""
        max_hold_ms: PositiveFloat | None = None
        """Gate mode: longest a ready window may wait for its verdict (default: no bound)."""
        hold_policy: Literal["release", "block"] = "release"
        """When ``max_hold_ms`` passes: release the text unapproved, or withhold it as flagged."""
        replacement: str = "[removed]"
        """Text that replaces a redacted span in gate mode."""
        max_concurrent_checks: PositiveInt = 4
        """Windows of one stream checked at the same time (verdicts still apply in order)."""
        max_pending_chars: PositiveInt = 1_000_000
        """Unchecked characters per stream channel before the stage stops reading (backpressure)."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if self.window_chars < 1:
                raise ValueError(f"window_chars: must be at least 1, got {self.window_chars}")
            if self.overlap_chars is None:
                self.overlap_chars = min(32, self.window_chars // 4)
            if not 0 <= self.overlap_chars < self.window_chars:
                raise ValueError(
                    f"overlap_chars: must be at least 0 and below window_chars ({self.window_chars}), "
                    f"got {self.overlap_chars}"
                )
            if not self.channels:
                raise ValueError("channels: name at least one channel to moderate")
            allowed = _GATE_ACTIONS if self.mode == "gate" else _OBSERVE_ACTIONS
            if self.action is not None and self.action not in allowed:
                raise ValueError(
                    f"action: {self.action!r} does not apply to mode {self.mode!r} "
                    f"(expected one of {', '.join(allowed)})"
                )
            if self.timeout_ms <= 0:
                raise ValueError(f"timeout_ms: must be positive, got {self.timeout_ms}")
            if self.max_hold_ms is not None:
                if self.mode != "gate":
                    raise ValueError("max_hold_ms: only applies to mode = 'gate' (observe never holds text)")
                if self.max_hold_ms <= 0:
                    raise ValueError(f"max_hold_ms: must be positive, got {self.max_hold_ms}")
            if self.max_concurrent_checks < 1:
                raise ValueError(f"max_concurrent_checks: must be at least 1, got {self.max_concurrent_checks}")
            if self.max_pending_chars < self.window_chars:
                raise ValueError(f"max_pending_chars: must be at least window_chars ({self.window_chars})")

    interpose: ClassVar[bool] = True
    name: ClassVar[str] = "moderation"

    def __init__(self, options: Options | None = None, *, moderator: Moderator | None = None, **kwargs: Any) -> None:
        options = self.resolve_options(options, kwargs)
        if moderator is None:
            if options.moderator is None:
                raise ValueError("moderator: required (a moderator object, or a table with its type)")
            moderator = load_moderator(options.moderator)
        self.options = options
        self.moderator = moderator
        self.mode: Mode = options.mode
        self.action: Action = options.action or ("redact" if options.mode == "gate" else "retract")
        context = int(getattr(moderator, "context_chars", 0) or 0)
        self.overlap = max(options.overlap_chars or 0, context)
        if self.overlap >= options.window_chars:
            raise ValueError(
                f"window_chars: the moderator needs {context} characters of overlap (its longest term), "
                f"so window_chars must be above that, got {options.window_chars}"
            )
        self.window = options.window_chars
        self.channels = frozenset(options.channels)
        self.stats = ModerationStats()
        """Counters; see :class:`ModerationStats`."""
        self._bus: Bus | None = None
        self._streams: dict[str, _Stream] = {}
        self._dropping: set[str] = set()  # aborted here, producer's terminal not seen yet

    @classmethod
    def from_options(cls, options: Any) -> ModerationStage:
        """Build the stage (and its moderator) from validated config options."""
        return cls(options)

    # -- sink lifecycle --------------------------------------------------------
    async def setup(self, bus: Bus) -> None:
        """Remember *bus* (to republish and abort) and set the moderator up."""
        self._bus = bus
        setup = getattr(self.moderator, "setup", None)
        if setup is not None:
            await setup()

    async def teardown(self) -> None:
        """Close the moderator (HTTP sessions)."""
        aclose = getattr(self.moderator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def run(self, events: Subscription) -> None:
        """Moderate *events* (the bus's raw stream) and republish them processed."""
        if self._bus is None:
            raise RuntimeError("add the stage with bus.add_sink(...) so setup(bus) runs first")
        async with anyio.create_task_group() as tg:
            try:
                async for event in events:
                    await self._feed(event, tg)
            except Exception as exc:
                # A bug here must not leave streams hanging half-moderated: end
                # each live one with an error before the supervisor restarts us.
                log.error("moderation.stage_crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                for st in list(self._streams.values()):
                    await self._fail_stream(st, exc)
                raise
            finally:
                # The raw stream ended (bus closing): flush what is held.
                for st in list(self._streams.values()):
                    st.closing = True
                    st.poke()
                    st.progress.set()

    # -- intake ------------------------------------------------------------------
    async def _feed(self, event: Event, tg: anyio.abc.TaskGroup) -> None:
        stream = event.stream
        st = self._streams.get(stream)
        if st is None:
            if stream in self._dropping:
                if is_terminal(event):
                    self._dropping.discard(stream)
                return
            # A stream whose start this stage did not see keeps its numbering.
            st = _Stream(stream, 0 if type(event) is StartEvent else event.seq)
            self._streams[stream] = st
            tg.start_soon(self._checker, st, name=f"moderation:{stream}")
        if st.finished:
            return
        kind = type(event)
        if kind is DeltaEvent and event.channel in self.channels:  # type: ignore[union-attr]
            delta: DeltaEvent = event  # type: ignore[assignment]
            ch = st.channel(delta.channel)
            while ch.total - ch.checked > self.options.max_pending_chars and not st.finished and not st.closing:
                st.progress = anyio.Event()
                await st.progress.wait()
            if st.finished:
                return
            # time.monotonic rather than anyio.current_time: only differences are
            # used (max_hold_ms), and this runs once per delta.
            start, end = ch.append(delta.text, time.monotonic())
            st.queue.append(_Text(delta.channel, start, end, delta.n, delta.ts))
            if self.mode == "observe":
                ch.allow(end)
                async with st.lock:
                    await self._release(st)
            if end >= max(0, ch.scheduled - self.overlap) + self.window:
                st.poke()  # a window is ready; waking the checker per delta would cost a task switch each
        elif is_terminal(event):
            st.terminal = event
            st.terminal_at = time.monotonic()
            st.poke()
        else:
            st.queue.append(event)
            async with st.lock:
                await self._release(st)

    # -- checking ----------------------------------------------------------------
    async def _checker(self, st: _Stream) -> None:
        """Check one stream's windows: several in flight, verdicts applied in order."""
        try:
            async with anyio.create_task_group() as tg:
                inflight: deque[_Pending] = deque()
                while not st.finished:
                    wake = st.wake = anyio.Event()
                    self._launch(st, tg, inflight)
                    progressed = False
                    while inflight and inflight[0].result is not None and not st.finished:
                        await self._conclude(st, inflight.popleft())
                        progressed = True
                    if st.finished:
                        break
                    if (
                        not inflight
                        and (st.terminal is not None or st.closing)
                        and all(ch.scheduled >= ch.total for ch in st.channels.values())
                    ):
                        await self._finish(st)
                        break
                    if not progressed:
                        await wake.wait()
                tg.cancel_scope.cancel()  # an abort leaves checks in flight: they no longer matter
        except Exception as exc:
            log.error("moderation.stage_failed", stream=st.id, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            await self._fail_stream(st, exc)
        finally:
            st.finished = True
            st.progress.set()
            if self._streams.get(st.id) is st:
                del self._streams[st.id]

    def _launch(self, st: _Stream, tg: anyio.abc.TaskGroup, inflight: deque[_Pending]) -> None:
        """Start checks of every window that is ready, up to ``max_concurrent_checks``."""
        closing = st.terminal is not None or st.closing
        limit = self.options.max_concurrent_checks
        for ch in st.channels.values():
            while len(inflight) < limit:
                start = max(0, ch.scheduled - self.overlap)
                end = start + self.window
                final = False
                if not (ch.total >= end and end > ch.scheduled):
                    if not (closing and ch.total > ch.scheduled):
                        break
                    end, final = ch.total, True
                now = time.monotonic()
                ready_at = ch.ready_at(end, st.terminal_at if final and st.terminal is not None else now)
                pending = _Pending(ch, start, end, final)
                ch.scheduled = end
                inflight.append(pending)
                tg.start_soon(self._run_check, st, pending, ch.window(start, end), ready_at)

    async def _run_check(self, st: _Stream, pending: _Pending, text: str, ready_at: float) -> None:
        pending.result = await self._judge(st, pending.ch, text, pending.end, ready_at)
        st.poke()

    async def _finish(self, st: _Stream) -> None:
        async with st.lock:
            for ch in st.channels.values():
                ch.allow(ch.total)
            if st.terminal is not None:
                st.queue.append(st.terminal)
            await self._release(st)
        st.finished = True

    async def _conclude(self, st: _Stream, pending: _Pending) -> None:
        """Apply one window's verdict, then release what it approved."""
        assert pending.result is not None
        verdict, label = pending.result
        ch, start, end = pending.ch, pending.start, pending.end
        ch.checked = max(ch.checked, end)
        if verdict.flagged:
            await self._apply(st, ch, verdict, label, start, end)
            if st.finished:
                return
        async with st.lock:
            ch.allow(end if pending.final or self.mode == "observe" else end - self.overlap)
            await self._release(st)
        ch.trim(self.overlap)
        st.progress.set()

    async def _judge(self, st: _Stream, ch: _Channel, text: str, end: int, ready_at: float) -> tuple[Verdict, str]:
        """Moderate one window, applying ``max_hold_ms`` in gate mode."""
        hold = self.options.max_hold_ms
        if self.mode == "observe" or hold is None:
            return await self._moderate(st, text)
        box: list[tuple[Verdict, str]] = []
        done = anyio.Event()

        async def call() -> None:
            box.append(await self._moderate(st, text))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.move_on_after(max(0.0, ready_at + hold / 1000 - time.monotonic())):
                await done.wait()
            if not done.is_set():
                if self.options.hold_policy == "block":
                    tg.cancel_scope.cancel()
                    self.stats.hold_blocked += 1
                    log.warning("moderation.hold_blocked", stream=st.id, channel=ch.name, max_hold_ms=hold)
                    return Verdict(flagged=True, categories=["moderation_hold_exceeded"]), "timeout"
                self.stats.hold_released += 1
                log.warning("moderation.hold_released", stream=st.id, channel=ch.name, max_hold_ms=hold)
                async with st.lock:
                    ch.allow(end)
                    await self._release(st)
                await done.wait()
        return box[0]

    async def _moderate(self, st: _Stream, text: str) -> tuple[Verdict, str]:
        self.stats.windows += 1
        try:
            with anyio.fail_after(self.options.timeout_ms / 1000):
                verdict = await self.moderator.check(text)
            if not isinstance(verdict, Verdict):
                raise TypeError(f"moderator returned {type(verdict).__name__}, not a Verdict")
            return verdict, "flagged"
        except TimeoutError:
            kind = "timeout"
            self.stats.timeouts += 1
            log.warning(
                "moderation.timeout", stream=st.id, timeout_ms=self.options.timeout_ms, policy=self.options.on_error
            )
        except Exception as exc:
            kind = "error"
            self.stats.errors += 1
            log.error(
                "moderation.error", stream=st.id, error=f"{type(exc).__name__}: {exc}", policy=self.options.on_error
            )
        if self.options.on_error == "fail_open":
            self.stats.failed_open += 1
            return Verdict(), kind
        self.stats.failed_closed += 1
        return Verdict(flagged=True, categories=[f"moderation_{kind}"]), kind

    # -- acting on verdicts --------------------------------------------------------
    async def _apply(self, st: _Stream, ch: _Channel, verdict: Verdict, label: str, start: int, end: int) -> None:
        spans: list[tuple[int, int, list[str]]] = []
        for span in verdict.spans or [Span(start=0, end=end - start)]:
            a, b = max(start, start + span.start), min(end, start + span.end)
            if b <= a or ch.is_masked(a, b):
                continue
            spans.append((a, b, [span.category] if span.category else list(verdict.categories)))
        if not spans:
            return
        self.stats.flagged += 1
        log.info(
            "moderation.flagged",
            stream=st.id,
            channel=ch.name,
            categories=verdict.categories,
            action=self.action,
            spans=[(a, b) for a, b, _ in spans],
        )
        if self.action == "abort":
            await self._abort(st, ch, verdict, label, spans)
            return
        async with st.lock:
            for a, b, categories in spans:
                ch.mask(a, b)
                if self.mode == "observe":
                    if self.action == "retract":
                        self.stats.retracted += 1
                    await self._note(st, ch, self.action, a, b, categories, verdict, label)
                    continue
                if a < ch.released:  # released unapproved (max_hold_ms passed): take it back
                    self.stats.retracted += 1
                    await self._note(st, ch, "retract", a, min(b, ch.released), categories, verdict, label)
                if b > ch.released:
                    self.stats.redacted += 1
                    ch.redact(_Redaction(max(a, ch.released), b, categories, dict(verdict.scores), label))
            ch.allow(ch.allowed)

    async def _note(
        self,
        st: _Stream,
        ch: _Channel,
        action: Action,
        start: int,
        end: int,
        categories: list[str],
        verdict: Verdict,
        label: str,
    ) -> None:
        rep = self.options.replacement
        out_start = ch.to_output(start, rep)
        await self._emit(
            st,
            ModerationEvent(
                stream=st.id,
                seq=0,
                ts=time.time(),
                verdict=label,
                categories=categories,
                action=action,
                start=out_start,
                end=out_start + (end - start),
                channel=ch.name,
                scores=dict(verdict.scores),
            ),
        )

    async def _abort(
        self, st: _Stream, ch: _Channel, verdict: Verdict, label: str, spans: list[tuple[int, int, list[str]]]
    ) -> None:
        st.finished = True
        self.stats.aborted += 1
        categories = sorted({c for _, _, cs in spans for c in cs}) or list(verdict.categories)
        reason = f"moderation flagged {', '.join(categories) or 'content'}"
        if st.terminal is None:
            self._dropping.add(st.id)
        assert self._bus is not None
        # Cancel the producer first: generation (and its upstream connection) stops now.
        self._bus.abort(st.id, reason=reason, by="moderation")
        async with st.lock:
            st.queue.clear()
            a, b = spans[0][0], spans[-1][1]
            await self._note(st, ch, "abort", a, b, categories, verdict, label)
            await self._emit(st, AbortEvent(stream=st.id, seq=0, ts=time.time(), reason=reason, by="moderation"))

    async def _fail_stream(self, st: _Stream, exc: BaseException) -> None:
        if st.ended:
            return
        st.finished = True
        if st.terminal is None:
            self._dropping.add(st.id)
        with anyio.CancelScope(shield=True):
            async with st.lock:
                st.queue.clear()
                await self._emit(
                    st,
                    ErrorEvent(
                        stream=st.id,
                        seq=0,
                        ts=time.time(),
                        kind="moderation_failed",
                        message=f"the moderation stage failed: {type(exc).__name__}: {exc}",
                    ),
                )

    # -- output ------------------------------------------------------------------------
    async def _emit(self, st: _Stream, event: Event) -> None:
        assert self._bus is not None
        if is_terminal(event):
            st.ended = True
        try:
            await self._bus.publish(replace(event, seq=st.next_seq()), processed=True)
        except BusClosed:
            # Only when the bus closed with no subscriber left to read the output.
            log.debug("moderation.dropped_after_close", stream=st.id, type=type(event).__name__)

    async def _release(self, st: _Stream) -> None:
        """Publish everything at the head of the queue that may go out (lock held)."""
        queue = st.queue
        acc: _Channel | None = None
        acc_start = acc_end = acc_n = 0
        acc_ts = 0.0
        while queue:
            item = queue[0]
            if type(item) is _Text:
                ch = st.channels[item.channel]
                if item.start >= ch.allowed:
                    break
                if acc is not None and acc is not ch:
                    await self._flush(st, acc, acc_start, acc_end, acc_n, acc_ts)
                    acc = None
                if acc is None:
                    acc, acc_start, acc_n = ch, item.start, 0
                acc_ts = item.ts
                if item.end <= ch.allowed:
                    acc_end = item.end
                    acc_n += item.n
                    queue.popleft()
                    continue
                acc_end = ch.allowed
                item.start = ch.allowed
                break
            if acc is not None:
                await self._flush(st, acc, acc_start, acc_end, acc_n, acc_ts)
                acc = None
            queue.popleft()
            await self._emit(st, item)  # type: ignore[arg-type]
        if acc is not None:
            await self._flush(st, acc, acc_start, acc_end, acc_n, acc_ts)

    async def _flush(self, st: _Stream, ch: _Channel, start: int, end: int, n: int, ts: float) -> None:
        rep = self.options.replacement
        text = ch.output(start, end, rep)
        ch.released = max(ch.released, end)
        if text:
            await self._emit(st, DeltaEvent(stream=st.id, seq=0, ts=ts, text=text, channel=ch.name, n=max(1, n)))
        for r in ch.redactions:
            if start <= r.start < end:
                out_start = ch.to_output(r.start, rep)
                await self._emit(
                    st,
                    ModerationEvent(
                        stream=st.id,
                        seq=0,
                        ts=time.time(),
                        verdict=r.verdict,
                        categories=r.categories,
                        action="redact",
                        start=out_start,
                        end=out_start + len(rep),
                        channel=ch.name,
                        scores=r.scores,
                    ),
                )
