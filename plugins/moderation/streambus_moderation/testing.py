"""Test doubles for moderation: moderators with fixed latency, scripted answers or failures.

Use them in your own tests (and the benchmark uses :class:`DelayedModerator`)::

    moderator = RecordingModerator(KeywordModerator(words={"x": ["kill"]}))
    stage = ModerationStage(moderator=moderator, window_chars=32)
    ...
    assert all("kill" not in w for w, v in moderator.calls if not v.flagged)
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from streambus import Bus, DeltaEvent, Event, StartEvent, is_terminal

from .stage import ModerationStage
from .verdict import Moderator, Verdict

__all__ = [
    "DelayedModerator",
    "GatedModerator",
    "RaisingModerator",
    "RecordingModerator",
    "SleepingModerator",
    "assert_well_formed",
    "delivered_text",
    "run_chunks",
]


async def run_chunks(
    stage: ModerationStage, chunks: Iterable[str | tuple[str, str]], *, stream: str = "s"
) -> tuple[list[Event], list[Event]]:
    """Publish *chunks* as one stream through *stage*; return ``(raw, moderated)`` events.

    A chunk is text (content channel) or ``(channel, text)``.
    """
    async with Bus() as bus:
        bus.add_sink(stage)
        raw = bus.subscribe(raw=True, overflow="block", buffer=1_000_000)
        moderated = bus.subscribe(overflow="block", buffer=1_000_000)
        async with bus.stream(stream=stream) as writer:
            for chunk in chunks:
                channel, text = ("content", chunk) if isinstance(chunk, str) else chunk
                await writer.delta(text, channel=channel)  # type: ignore[arg-type]
    return [e async for e in raw], [e async for e in moderated]


def delivered_text(events: Iterable[Event], channel: str = "content") -> str:
    """The text of *channel* as a client would have shown it (before any retraction)."""
    return "".join(e.text for e in events if isinstance(e, DeltaEvent) and e.channel == channel)


def assert_well_formed(events: list[Event]) -> None:
    """Assert each stream in *events* starts at seq 0, has gap-free seqs and ends with exactly one terminal."""
    by_stream: dict[str, list[Event]] = {}
    for event in events:
        by_stream.setdefault(event.stream, []).append(event)
    for stream, mine in by_stream.items():
        seqs = [e.seq for e in mine]
        assert seqs == list(range(len(mine))), f"stream {stream}: seqs {seqs} are not gap-free from 0"
        assert isinstance(mine[0], StartEvent), f"stream {stream} does not begin with start"
        terminals = [e for e in mine if is_terminal(e)]
        assert len(terminals) == 1 and terminals[0] is mine[-1], f"stream {stream}: terminals {terminals}"


class RecordingModerator:
    """Wrap a moderator and record every ``(window, verdict)`` it returned."""

    def __init__(self, inner: Moderator) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Verdict]] = []
        self.context_chars = int(getattr(inner, "context_chars", 0) or 0)

    async def check(self, text: str) -> Verdict:
        """Ask the wrapped moderator and record its answer."""
        verdict = await self.inner.check(text)
        self.calls.append((text, verdict))
        return verdict


class DelayedModerator:
    """Answer after a fixed *delay* in seconds, with *inner*'s verdict (clean without one)."""

    def __init__(self, delay: float, inner: Moderator | None = None) -> None:
        self.delay = delay
        self.inner = inner
        self.context_chars = int(getattr(inner, "context_chars", 0) or 0)

    async def check(self, text: str) -> Verdict:
        """Sleep, then return the wrapped verdict."""
        await anyio.sleep(self.delay)
        return await self.inner.check(text) if self.inner is not None else Verdict()


class GatedModerator:
    """Hold every answer until :meth:`open` is called: a moderator as slow as a test wants.

    ``waiting`` is set once a check is pending, so a test can wait for it.
    """

    def __init__(self, inner: Moderator | None = None) -> None:
        self.inner = inner
        self.context_chars = int(getattr(inner, "context_chars", 0) or 0)
        self._gate = anyio.Event()
        self.waiting = anyio.Event()

    def open(self) -> None:
        """Let every pending and future check answer."""
        self._gate.set()

    async def check(self, text: str) -> Verdict:
        """Wait for :meth:`open`, then return the wrapped verdict."""
        self.waiting.set()
        await self._gate.wait()
        return await self.inner.check(text) if self.inner is not None else Verdict()


class SleepingModerator:
    """Never answer (until cancelled): exercises ``timeout_ms``."""

    async def check(self, text: str) -> Verdict:
        """Sleep forever."""
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover


class RaisingModerator:
    """Raise *error* on every check: exercises ``on_error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or RuntimeError("moderator exploded")

    async def check(self, text: str) -> Verdict:
        """Raise the configured error."""
        raise self.error
