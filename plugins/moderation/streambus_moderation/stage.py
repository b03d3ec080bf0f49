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

How it works, for a reader of this file:

1. *Intake* (:meth:`ModerationStage._feed`): a moderated delta's text is
   appended to its channel (:class:`~._windows.ChannelText`) and queued for
   output; every other event is queued behind it.
2. *Scheduling* (:class:`~._windows.WindowScheduler`, one task per stream):
   cuts the text into overlapping windows, checks several at once with the
   moderator (:meth:`ModerationStage._moderate`) and hands verdicts back in
   order to :meth:`ModerationStage._conclude`.
3. *Strategy* (:class:`Gate` or :class:`Observe`, chosen by ``mode``): when
   text may go out, how long a verdict may take, and what a violating span
   becomes. ``abort`` is the same in both modes (:meth:`ModerationStage._abort`).
4. *Output* (:meth:`ModerationStage._release`): publishes the head of the
   queue up to what is allowed, renumbered, redactions replaced.

Moderated output is renumbered: ``seq`` is gap-free per stream, counting the
inserted ``moderation`` events and merged deltas (released text of one
channel is sent as one delta whose ``n`` sums the merged chunks). Offsets in
``moderation`` events count characters of the channel's text as delivered.
Aborting calls :meth:`Bus.abort <streambus.Bus.abort>` (the producer is
cancelled and closes its upstream connection) and ends the moderated stream
with ``abort`` by ``moderation``.
"""

from __future__ import annotations

import abc
import dataclasses
import time
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

from ._windows import ChannelText, Finding, HeldText, StreamState, Window, WindowScheduler
from .verdict import Moderator, Span, Verdict, load_moderator

__all__ = ["ModerationStage", "ModerationStats"]

log = structlog.get_logger("streambus.moderation")

Mode = Literal["gate", "observe"]
Action = Literal["redact", "abort", "flag", "retract"]


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
        """``gate`` holds text until its window is approved; ``observe`` passes it at once, verdicts after."""
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
            allowed = STRATEGIES[self.mode].actions
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
        if options is not None and not isinstance(options, ModerationStage.Options):
            # The likely slip is ModerationStage(my_moderator): say so instead of an AttributeError later.
            raise TypeError(
                f"ModerationStage: got a {type(options).__name__} as the first argument, which takes "
                "ModerationStage.Options; pass the moderator as moderator=... and options as keywords"
            )
        options = self.resolve_options(options, kwargs)
        if moderator is None:
            if options.moderator is None:
                raise ValueError("moderator: required (a moderator object, or a table with its type)")
            moderator = load_moderator(options.moderator)
        self.options = options
        self.moderator = moderator
        self.mode: Mode = options.mode
        self._strategy: Strategy = STRATEGIES[options.mode](self)
        self.action: Action = options.action or self._strategy.actions[0]
        context = int(getattr(moderator, "context_chars", 0) or 0)
        self.overlap = max(options.overlap_chars or 0, context)
        if self.overlap >= options.window_chars:
            raise ValueError(
                f"window_chars: the moderator needs {context} characters of overlap (its longest term), "
                f"so window_chars must be above that, got {options.window_chars}"
            )
        self.window = options.window_chars
        self._scheduler = WindowScheduler(self.window, self.overlap, options.max_concurrent_checks)
        self.channels = frozenset(options.channels)
        self.stats = ModerationStats()
        """Counters; see :class:`ModerationStats`."""
        self._bus: Bus | None = None
        self._streams: dict[str, StreamState] = {}
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
            st = StreamState(stream, 0 if type(event) is StartEvent else event.seq)
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
            st.queue.append(HeldText(delta.channel, start, end, delta.n, delta.ts))
            await self._strategy.text_arrived(st, ch, end)
            if self._scheduler.has_full_window(ch):
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
    async def _checker(self, st: StreamState) -> None:
        """Check one stream's windows, then release what is left and its terminal event."""
        try:
            await self._scheduler.run(st, self._strategy.judge, self._conclude)
            if not st.finished:
                await self._finish(st)
        except Exception as exc:
            log.error("moderation.stage_failed", stream=st.id, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            await self._fail_stream(st, exc)
        finally:
            st.finished = True
            st.progress.set()
            if self._streams.get(st.id) is st:
                del self._streams[st.id]

    async def _finish(self, st: StreamState) -> None:
        async with st.lock:
            for ch in st.channels.values():
                ch.allow(ch.total)
            if st.terminal is not None:
                st.queue.append(st.terminal)
            await self._release(st)
        st.finished = True

    async def _conclude(self, st: StreamState, window: Window) -> None:
        """Apply one window's verdict, then release what it approved."""
        assert window.result is not None
        verdict, label = window.result
        ch = window.channel
        ch.checked = max(ch.checked, window.end)
        if verdict.flagged:
            await self._apply(st, ch, verdict, label, window.start, window.end)
            if st.finished:
                return
        async with st.lock:
            ch.allow(self._strategy.approved_upto(window))
            await self._release(st)
        ch.trim(self.overlap)
        st.progress.set()

    async def _moderate(self, st: StreamState, text: str) -> tuple[Verdict, str]:
        """Ask the moderator about *text*, bounded by ``timeout_ms``; failures follow ``on_error``."""
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
    async def _apply(
        self, st: StreamState, ch: ChannelText, verdict: Verdict, label: str, start: int, end: int
    ) -> None:
        """Act on a flagged verdict about source ``[start, end)`` of *ch*."""
        findings: list[Finding] = []
        for span in verdict.spans or [Span(start=0, end=end - start)]:
            a, b = max(start, start + span.start), min(end, start + span.end)
            if b <= a or ch.is_masked(a, b):
                continue
            categories = [span.category] if span.category else list(verdict.categories)
            findings.append(Finding(a, b, categories, dict(verdict.scores), label))
        if not findings:
            return
        self.stats.flagged += 1
        log.info(
            "moderation.flagged",
            stream=st.id,
            channel=ch.name,
            categories=verdict.categories,
            action=self.action,
            spans=[(f.start, f.end) for f in findings],
        )
        if self.action == "abort":
            await self._abort(st, ch, findings)
            return
        async with st.lock:
            for finding in findings:
                ch.mask(finding.start, finding.end)
                await self._strategy.violation(st, ch, finding)
            ch.allow(ch.allowed)  # a new redaction may cover where release was to stop

    async def _note(self, st: StreamState, ch: ChannelText, action: Action, finding: Finding) -> None:
        """Publish a ``moderation`` event about *finding*, in offsets of the delivered text."""
        rep = self.options.replacement
        start = ch.to_output(finding.start, rep)
        length = len(rep) if action == "redact" else finding.end - finding.start
        await self._emit(
            st,
            ModerationEvent(
                stream=st.id,
                seq=0,
                ts=time.time(),
                verdict=finding.verdict,
                categories=finding.categories,
                action=action,
                start=start,
                end=start + length,
                channel=ch.name,
                scores=finding.scores,
            ),
        )

    async def _abort(self, st: StreamState, ch: ChannelText, findings: list[Finding]) -> None:
        st.finished = True
        self.stats.aborted += 1
        categories = sorted({c for f in findings for c in f.categories})
        reason = f"moderation flagged {', '.join(categories) or 'content'}"
        if st.terminal is None:
            self._dropping.add(st.id)
        assert self._bus is not None
        # Cancel the producer first: generation (and its upstream connection) stops now.
        self._bus.abort(st.id, reason=reason, by="moderation")
        async with st.lock:
            st.queue.clear()
            first = findings[0]
            whole = Finding(first.start, findings[-1].end, categories, first.scores, first.verdict)
            await self._note(st, ch, "abort", whole)
            await self._emit(st, AbortEvent(stream=st.id, seq=0, ts=time.time(), reason=reason, by="moderation"))

    async def _fail_stream(self, st: StreamState, exc: BaseException) -> None:
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
    async def _emit(self, st: StreamState, event: Event) -> None:
        assert self._bus is not None
        if is_terminal(event):
            st.ended = True
        try:
            await self._bus.publish(replace(event, seq=st.next_seq()), processed=True)
        except BusClosed:
            # Only when the bus closed with no subscriber left to read the output.
            log.debug("moderation.dropped_after_close", stream=st.id, type=type(event).__name__)

    async def _release(self, st: StreamState) -> None:
        """Publish everything at the head of the queue that may go out (lock held)."""
        queue = st.queue
        acc: ChannelText | None = None
        acc_start = acc_end = acc_n = 0
        acc_ts = 0.0
        while queue:
            item = queue[0]
            if type(item) is HeldText:
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

    async def _flush(self, st: StreamState, ch: ChannelText, start: int, end: int, n: int, ts: float) -> None:
        text = ch.output(start, end, self.options.replacement)
        ch.released = max(ch.released, end)
        if text:
            await self._emit(st, DeltaEvent(stream=st.id, seq=0, ts=ts, text=text, channel=ch.name, n=max(1, n)))
        for r in ch.redactions:
            if start <= r.start < end:
                await self._note(st, ch, "redact", r)


class Strategy(abc.ABC):
    """What one ``mode`` does with text and verdicts; both modes share the window scheduler.

    The defaults hold text until the stage allows it and judge a window with
    one plain moderator call. A strategy never sees ``action = "abort"``: the
    stage aborts the same way in every mode.
    """

    actions: ClassVar[tuple[Action, ...]]
    """The actions this mode accepts; the first is its default."""

    def __init__(self, stage: ModerationStage) -> None:
        self.stage = stage

    async def text_arrived(self, st: StreamState, ch: ChannelText, end: int) -> None:
        """Text of *ch* up to source offset *end* was queued for output (by default: nothing to do)."""
        return

    async def judge(self, st: StreamState, window: Window) -> tuple[Verdict, str]:
        """The verdict on *window* and its label (``flagged``, ``timeout`` or ``error``)."""
        return await self.stage._moderate(st, window.text)

    def approved_upto(self, window: Window) -> int:
        """The source offset before which text may go out once *window*'s verdict is applied."""
        return window.end

    @abc.abstractmethod
    async def violation(self, st: StreamState, ch: ChannelText, finding: Finding) -> None:
        """Act on *finding* in *ch* (``st.lock`` is held): each strategy says what a violation becomes."""


class Gate(Strategy):
    """Hold text until a window containing it is approved; a violating span is redacted."""

    actions = ("redact", "abort")

    def approved_upto(self, window: Window) -> int:
        # The last overlap characters open the next window: they stay held until
        # that one is approved too, so not even the first half of a split term leaks.
        return window.end if window.final else window.end - self.stage.overlap

    async def judge(self, st: StreamState, window: Window) -> tuple[Verdict, str]:
        """Judge *window*; past ``max_hold_ms`` release it unapproved or withhold it (``hold_policy``)."""
        stage = self.stage
        hold = stage.options.max_hold_ms
        if hold is None:
            return await super().judge(st, window)
        box: list[tuple[Verdict, str]] = []
        done = anyio.Event()

        async def call() -> None:
            box.append(await stage._moderate(st, window.text))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.move_on_after(max(0.0, window.ready_at + hold / 1000 - time.monotonic())):
                await done.wait()
            if not done.is_set():
                channel = window.channel
                if stage.options.hold_policy == "block":
                    tg.cancel_scope.cancel()
                    stage.stats.hold_blocked += 1
                    log.warning("moderation.hold_blocked", stream=st.id, channel=channel.name, max_hold_ms=hold)
                    return Verdict(flagged=True, categories=["moderation_hold_exceeded"]), "timeout"
                stage.stats.hold_released += 1
                log.warning("moderation.hold_released", stream=st.id, channel=channel.name, max_hold_ms=hold)
                async with st.lock:
                    channel.allow(window.end)
                    await stage._release(st)
                await done.wait()  # a late violation becomes a retraction
        return box[0]

    async def violation(self, st: StreamState, ch: ChannelText, finding: Finding) -> None:
        """Redact what is still held; retract what ``max_hold_ms`` let out unapproved."""
        stats, released = self.stage.stats, ch.released
        if finding.start < released:
            stats.retracted += 1
            shown = dataclasses.replace(finding, end=min(finding.end, released))
            await self.stage._note(st, ch, "retract", shown)
        if finding.end > released:
            stats.redacted += 1
            ch.redact(dataclasses.replace(finding, start=max(finding.start, released)))


class Observe(Strategy):
    """Pass text through at once; a violating span is published after it (``flag`` or ``retract``)."""

    actions = ("retract", "flag", "abort")

    async def text_arrived(self, st: StreamState, ch: ChannelText, end: int) -> None:
        """Release the new text now: the verdict follows it."""
        ch.allow(end)
        async with st.lock:
            await self.stage._release(st)

    async def violation(self, st: StreamState, ch: ChannelText, finding: Finding) -> None:
        """Publish a ``moderation`` event with the stage's action about the span already shown."""
        if self.stage.action == "retract":
            self.stage.stats.retracted += 1
        await self.stage._note(st, ch, self.stage.action, finding)


STRATEGIES: dict[Mode, type[Strategy]] = {"gate": Gate, "observe": Observe}
