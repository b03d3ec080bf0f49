"""The ``replay`` producer: recorded streams back onto a bus, timing included.

::

    async with Bus() as bus:
        bus.add_sink(StdoutSink())
        bus.start_producer(ReplayProducer(path="recordings/chat.jsonl", speed=2.0))

or as a pipeline (``streambus replay FILE`` is the same from the shell)::

    [[producers]]
    type = "replay"
    path = "recordings/chat.jsonl"
    speed = 1.0            # recorded gaps between events divided by this
    burst = false          # true: as fast as possible, no pauses
    idle_limit = 2.0       # cap every recorded pause at 2 s (as asciinema does)
    models = ["llama3.2"]  # filters: streams, models, providers
    loop = 1               # passes over the recording; 0 = forever
    keep_ids = false       # true: publish the recorded stream ids

Every replayed stream goes through :meth:`Bus.stream <streambus.Bus.stream>`
like a live one: ``seq`` is renumbered gap-free, ``ts`` is the replay's wall
clock, and :meth:`Bus.abort <streambus.Bus.abort>` (moderation, a client,
shutdown) stops it with an ``abort`` event. A stream the recording cuts off
before its terminal event ends with ``error(kind="truncated")``. The recording
is read when the producer is built, so a damaged file fails ``streambus
check`` and never half-way through a replay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgspec
import structlog

from .errors import RecordingError
from .events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, ModerationEvent, StartEvent
from .plugins import NonNegativeFloat, NonNegativeInt, PluginBase, PositiveFloat, check_bounds
from .recording import RecordingProblem, read_recording
from .subscription import Filter

if TYPE_CHECKING:
    from .bus import Bus
    from .writer import StreamWriter

__all__ = ["ReplayProducer", "StreamPlan", "plan_streams"]

log = structlog.get_logger("streambus.replay")


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """One recorded stream with the offset (seconds from the first event) of each event.

    ``offsets[i]`` belongs to ``events[i]``; ``events[0]`` is the ``start``.
    Offsets already have ``idle_limit`` applied; divide by the speed to get
    wall-clock seconds.
    """

    stream: str
    events: tuple[Event, ...]
    offsets: tuple[float, ...]

    @property
    def start(self) -> StartEvent:
        """The recorded ``start`` event."""
        first = self.events[0]
        assert isinstance(first, StartEvent)
        return first

    @property
    def duration(self) -> float:
        """Seconds from this stream's start to its last event (before speed scaling)."""
        return self.offsets[-1] - self.offsets[0]


def plan_streams(
    events: Iterable[Event], *, filter: Filter | None = None, idle_limit: float | None = None
) -> tuple[list[StreamPlan], float, int]:
    """Group *events* into per-stream plans in start order, with their timing.

    Returns ``(plans, total, skipped)``: *total* is the offset of the last
    kept event, *skipped* how many events belonged to no recorded ``start``
    (a stream the recording joined mid-way). Pauses between consecutive kept
    events are their ``ts`` difference (never negative: time is measured from the latest
    ``ts`` seen), capped at *idle_limit*.
    """
    flt = filter or Filter()
    kept: dict[str, tuple[list[Event], list[float]]] = {}
    rejected: set[str] = set()
    skipped = 0
    clock = 0.0
    previous: float | None = None
    for event in events:
        if type(event) is StartEvent:
            if event.stream in kept or event.stream in rejected:
                skipped += 1  # a second start for the same id: not a new stream
                continue
            if not flt.matches(event):
                rejected.add(event.stream)
                continue
            kept[event.stream] = ([], [])
        elif event.stream not in kept:
            if event.stream not in rejected:
                skipped += 1
            continue
        if previous is not None:
            # A clock that stepped back does not replay as a pause later on.
            gap = max(0.0, event.ts - previous)
            clock += gap if idle_limit is None else min(gap, idle_limit)
        previous = event.ts if previous is None else max(previous, event.ts)
        bucket = kept[event.stream]
        bucket[0].append(event)
        bucket[1].append(clock)
    plans = [StreamPlan(stream, tuple(evs), tuple(offs)) for stream, (evs, offs) in kept.items()]
    return plans, clock, skipped


class ReplayProducer(PluginBase):
    """Replay recorded streams with their recorded timing (or as fast as possible).

    Build it with keywords, e.g. ``ReplayProducer(path="rec.jsonl", burst=True)``,
    or with in-memory events: ``ReplayProducer(events=recording.events)``.
    After (or during) :meth:`run`, ``stream_ids`` lists the replayed stream
    ids in start order and ``id_map`` maps each recorded id to its latest replay.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``replay`` producer."""

        path: str | list[str] = ""
        """The recording file, or several (rotated parts) replayed as one."""
        speed: PositiveFloat = 1.0
        """Playback speed: recorded pauses are divided by it."""
        burst: bool = False
        """Publish as fast as possible, ignoring recorded timing."""
        idle_limit: NonNegativeFloat | None = None
        """Cap every recorded pause at this many seconds."""
        streams: list[str] = []
        """Only these recorded stream ids."""
        models: list[str] = []
        """Only streams of these models."""
        providers: list[str] = []
        """Only streams of these providers."""
        loop: NonNegativeInt = 1
        """How many passes over the recording; 0 repeats until the bus stops."""
        keep_ids: bool = False
        """Publish the recorded stream ids instead of new ones."""
        lenient: bool = False
        """Skip (and count) invalid lines instead of failing."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if self.keep_ids and self.loop != 1:
                raise ValueError("keep_ids: cannot be combined with loop (each pass would reuse the same stream ids)")

    def __init__(self, options: Options | None = None, *, events: Iterable[Event] | None = None, **kwargs: Any) -> None:
        self.options: ReplayProducer.Options = self.resolve_options(options, kwargs)
        o = self.options
        paths = [o.path] if isinstance(o.path, str) else list(o.path)
        paths = [p for p in paths if p]
        self.problems: list[RecordingProblem] = []
        """Lines skipped while reading (a truncated last line, invalid lines with ``lenient``)."""
        if events is None:
            if not paths:
                raise ValueError("path: a recording file is required (or pass events=...)")
            loaded: list[Event] = []
            for path in paths:
                recording = read_recording(path, lenient=o.lenient)
                for problem in recording.problems:
                    log.warning("replay.skipped_line", path=path, line=problem.line, problem=problem.message)
                self.problems.extend(recording.problems)
                loaded.extend(recording.events)
            events = loaded
        flt = Filter.of(streams=o.streams or None, models=o.models or None, providers=o.providers or None)
        self.plans, self.duration, self.skipped = plan_streams(events, filter=flt, idle_limit=o.idle_limit)
        if self.skipped:
            log.warning("replay.orphan_events", count=self.skipped, why="events of streams whose start is missing")
        self.stream_ids: list[str] = []
        self.id_map: dict[str, str] = {}

    @classmethod
    def from_options(cls, options: Any) -> ReplayProducer:
        """Build from validated config options; a damaged recording becomes a ``path:`` error."""
        try:
            return cls(options)
        except RecordingError as exc:
            raise ValueError(f"path: {exc}") from None

    @property
    def recorded_streams(self) -> Sequence[str]:
        """The recorded stream ids this producer replays, in start order."""
        return [plan.stream for plan in self.plans]

    async def run(self, bus: Bus) -> None:
        """Publish every planned stream, pass after pass; return when all are done."""
        o = self.options
        speed = o.speed
        t0 = anyio.current_time()
        base = 0.0
        passes = 0
        async with anyio.create_task_group() as tg:
            while o.loop == 0 or passes < o.loop:
                for plan in self.plans:
                    if o.burst:
                        await anyio.lowlevel.checkpoint()
                    else:
                        await anyio.sleep_until(t0 + (base + plan.offsets[0]) / speed)
                    tg.start_soon(self._play, bus, plan, t0, base, name=f"replay:{plan.stream}")
                if not self.plans:
                    break
                base += self.duration
                passes += 1
                if o.loop == 0 and self.duration == 0 and not o.burst:
                    await anyio.lowlevel.checkpoint()

    async def _play(self, bus: Bus, plan: StreamPlan, t0: float, base: float) -> None:
        o = self.options
        start = plan.start
        async with bus.stream(
            model=start.model, provider=start.provider, meta=start.meta, stream=start.stream if o.keep_ids else None
        ) as w:
            self.stream_ids.append(w.stream)
            self.id_map[plan.stream] = w.stream
            for event, offset in zip(plan.events[1:], plan.offsets[1:], strict=True):
                if not o.burst:
                    await anyio.sleep_until(t0 + (base + offset) / o.speed)
                await _emit(w, event)
                if w.finished:
                    return
            await w.error("truncated", "the recording ends before this stream's terminal event")


async def _emit(w: StreamWriter, event: Event) -> None:
    kind = type(event)
    if kind is DeltaEvent:
        assert isinstance(event, DeltaEvent)
        await w.delta(event.text, event.channel)
    elif kind is EndEvent:
        assert isinstance(event, EndEvent)
        await w.end(event.reason, usage=event.usage, timings=event.timings)
    elif kind is ErrorEvent:
        assert isinstance(event, ErrorEvent)
        await w.error(event.kind, event.message, retryable=event.retryable)
    elif kind is AbortEvent:
        assert isinstance(event, AbortEvent)
        await w.abort(event.reason, event.by)
    elif kind is ModerationEvent:
        assert isinstance(event, ModerationEvent)
        await w.moderation(
            action=event.action,
            start=event.start,
            end=event.end,
            verdict=event.verdict,
            categories=list(event.categories),
            channel=event.channel,
        )
