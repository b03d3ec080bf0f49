"""Observe and gate modes through a real bus: retract spans, flags, raw vs moderated side by side."""

from __future__ import annotations

import anyio
import pytest
from streambus_moderation import KeywordModerator, ModerationStage, Verdict
from streambus_moderation.testing import GatedModerator, assert_well_formed, delivered_text, run_chunks

from streambus import AbortEvent, Bus, DeltaEvent, EndEvent, Event, ModerationEvent, StartEvent, Subscription

pytestmark = pytest.mark.anyio


def keywords() -> KeywordModerator:
    return KeywordModerator(words={"violence": ["kill"], "spam": ["buy now"]})


async def test_observe_retract_names_the_span_already_shown() -> None:
    chunks = ["Hello there. I will k", "ill", " the process, then buy", " now!"]
    stage = ModerationStage(moderator=keywords(), mode="observe", window_chars=16, overlap_chars=8)
    raw, moderated = await run_chunks(stage, chunks)
    assert_well_formed(moderated)
    text = "".join(chunks)
    assert delivered_text(moderated) == text  # observe never changes text
    retracts = [e for e in moderated if isinstance(e, ModerationEvent)]
    assert [(e.action, e.start, e.end, e.categories) for e in retracts] == [
        ("retract", text.index("kill"), text.index("kill") + 4, ["violence"]),
        ("retract", text.index("buy now"), text.index("buy now") + 7, ["spam"]),
    ]
    for e in retracts:
        assert text[e.start : e.end] in {"kill", "buy now"}
        # the retraction comes after the text it removes was delivered
        shown = delivered_text(moderated[: moderated.index(e)])
        assert len(shown) >= e.end
    assert isinstance(moderated[-1], EndEvent)
    assert len(raw) == len(chunks) + 2  # raw readers see the producer's events unchanged


async def test_observe_flag_action_and_scores() -> None:
    stage = ModerationStage(moderator=keywords(), mode="observe", action="flag", window_chars=32)
    _, moderated = await run_chunks(stage, ["please kill it"])
    flags = [e for e in moderated if isinstance(e, ModerationEvent)]
    assert [(f.action, f.verdict, f.scores, f.start, f.end) for f in flags] == [
        ("flag", "flagged", {"violence": 1.0}, 7, 11)
    ]


async def test_observe_text_flows_before_the_verdict() -> None:
    gated = GatedModerator(keywords())
    stage = ModerationStage(moderator=gated, mode="observe", window_chars=20, overlap_chars=0)
    async with Bus() as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block")
        async with bus.stream(stream="s") as w:
            await w.delta("0123456789 and more text")
            await gated.waiting.wait()
            await anyio.wait_all_tasks_blocked()
            early = await moderated.receive_batch()
            assert delivered_text(early) == "0123456789 and more text"  # shown while the moderator thinks
            gated.open()
    rest = [e async for e in moderated]
    assert_well_formed(early + rest)


async def test_gate_holds_text_until_the_window_is_approved() -> None:
    gated = GatedModerator(keywords())
    stage = ModerationStage(moderator=gated, mode="gate", window_chars=20, overlap_chars=0)
    async with Bus() as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block")
        async with bus.stream(stream="s") as w:
            await w.delta("0123456789abcdefghij")
            await gated.waiting.wait()
            await anyio.wait_all_tasks_blocked()
            held = await moderated.receive_batch()
            assert [type(e) for e in held] == [StartEvent]  # no text before approval
            gated.open()
    rest = [e async for e in moderated]
    assert delivered_text(rest) == "0123456789abcdefghij"
    assert_well_formed(held + rest)


async def test_raw_and_moderated_subscribers_side_by_side() -> None:
    received: dict[str, list[Event]] = {"audit": [], "client": []}

    class Collect:
        def __init__(self, key: str) -> None:
            self.key = key

        async def run(self, events: Subscription) -> None:
            async for e in events:
                received[self.key].append(e)

    async with Bus() as bus:
        bus.add_sink(ModerationStage(moderator=keywords(), window_chars=16))
        bus.add_sink(Collect("audit"), raw=True, overflow="block")
        bus.add_sink(Collect("client"), overflow="block")
        async with bus.stream(stream="s") as w:
            for piece in ["I will ", "ki", "ll them ", "all."]:
                await w.delta(piece)
    assert delivered_text(received["audit"]) == "I will kill them all."
    assert delivered_text(received["client"]) == "I will [removed] them all."
    assert not any(isinstance(e, ModerationEvent) for e in received["audit"])
    assert [e.seq for e in received["audit"]] == list(range(6))
    assert_well_formed(received["client"])


async def test_interleaved_streams_are_moderated_independently() -> None:
    stage = ModerationStage(moderator=keywords(), window_chars=24)
    async with Bus() as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block", buffer=10_000)

        async def produce(n: int) -> None:
            async with bus.stream(stream=f"s{n}") as w:
                for k in range(30):
                    await w.delta(f"{n}:{k} kill " if k % 10 == n else f"{n}:{k} ok ")
                    if k % 3 == 0:
                        await anyio.lowlevel.checkpoint()

        for n in range(3):
            bus.start_soon(produce, n)
    events = [e async for e in moderated]
    assert_well_formed(events)
    for n in range(3):
        mine = [e for e in events if e.stream == f"s{n}"]
        expected = "".join(f"{n}:{k} [removed] " if k % 10 == n else f"{n}:{k} ok " for k in range(30))
        assert delivered_text(mine) == expected


async def test_unmoderated_channels_pass_in_order_and_reasoning_is_moderated() -> None:
    stage = ModerationStage(moderator=keywords(), window_chars=16, channels=["content", "reasoning"])
    _, moderated = await run_chunks(
        stage, [("reasoning", "think: kill"), ("tool", '{"kill": 1}'), ("content", "answer")]
    )
    assert delivered_text(moderated, "reasoning") == "think: [removed]"
    assert delivered_text(moderated, "tool") == '{"kill": 1}'
    assert delivered_text(moderated, "content") == "answer"
    kinds = [(type(e).__name__, getattr(e, "channel", None)) for e in moderated]
    assert kinds.index(("DeltaEvent", "reasoning")) < kinds.index(("DeltaEvent", "tool"))
    assert_well_formed(moderated)


async def test_producer_error_and_abort_terminals_are_forwarded_after_the_final_window() -> None:
    stage = ModerationStage(moderator=keywords(), window_chars=64)
    async with Bus() as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block")
        async with bus.stream(stream="e") as w:
            await w.delta("partial kill")
            await w.error("upstream", "model crashed", retryable=True)
    events = [e async for e in moderated]
    assert_well_formed(events)
    assert delivered_text(events) == "partial [removed]"
    assert events[-1].__class__.__name__ == "ErrorEvent"


async def test_delta_count_n_is_summed_when_held_text_merges() -> None:
    stage = ModerationStage(moderator=keywords(), window_chars=64)
    _, moderated = await run_chunks(stage, ["a", "b", "c", "d"])
    deltas = [e for e in moderated if isinstance(e, DeltaEvent)]
    assert [(d.text, d.n) for d in deltas] == [("abcd", 4)]


async def test_stage_options_are_validated_with_the_key() -> None:
    m = keywords()
    with pytest.raises(ValueError, match="action: 'retract' does not apply to mode 'gate'"):
        ModerationStage(moderator=m, mode="gate", action="retract")
    with pytest.raises(ValueError, match="max_hold_ms: only applies to mode = 'gate'"):
        ModerationStage(moderator=m, mode="observe", max_hold_ms=100)
    with pytest.raises(ValueError, match="overlap_chars: must be at least 0 and below window_chars"):
        ModerationStage(moderator=m, window_chars=10, overlap_chars=10)
    with pytest.raises(ValueError, match="moderator: required"):
        ModerationStage()
    with pytest.raises(ValueError, match="timeout_ms: must be more than 0 and finite, got 0"):
        ModerationStage(moderator=m, timeout_ms=0)


async def test_abort_in_gate_mode_withholds_the_window_and_ends_by_moderation() -> None:
    stage = ModerationStage(moderator=keywords(), mode="gate", action="abort", window_chars=16, overlap_chars=8)
    raw, moderated = await run_chunks(stage, ["safe words here, ", "then kill", " and more text after"])
    assert_well_formed(moderated)
    assert "kill" not in delivered_text(moderated)
    note, last = moderated[-2], moderated[-1]
    assert isinstance(note, ModerationEvent) and note.action == "abort" and note.categories == ["violence"]
    assert isinstance(last, AbortEvent) and last.by == "moderation"
    assert stage.stats.aborted == 1
    # the producer had finished already: its own end stays in the raw stream only
    assert isinstance(raw[-1], EndEvent)


async def test_custom_moderator_without_spans_covers_the_whole_window() -> None:
    class Whole:
        async def check(self, text: str) -> Verdict:
            return Verdict(flagged="bad" in text, categories=["x"])

    stage = ModerationStage(moderator=Whole(), mode="observe", window_chars=10, overlap_chars=0)
    _, moderated = await run_chunks(stage, ["0123456789", "abcd bad e"])
    notes = [(e.start, e.end) for e in moderated if isinstance(e, ModerationEvent)]
    assert notes == [(10, 20)]


async def test_a_slow_moderator_backpressures_the_producer_without_losing_text() -> None:
    gated = GatedModerator()
    stage = ModerationStage(moderator=gated, window_chars=32, overlap_chars=0, max_pending_chars=64)
    written = 0
    async with Bus(buffer=16) as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block", buffer=100_000)

        async def produce() -> None:
            nonlocal written
            async with bus.stream(stream="bp") as w:
                for _ in range(2000):
                    await w.delta("x")
                    written += 1

        bus.start_soon(produce)
        await gated.waiting.wait()
        await anyio.wait_all_tasks_blocked()
        assert written < 200  # the producer waits: 64 pending characters plus the stage's buffer
        gated.open()
    events = [e async for e in moderated]
    assert written == 2000
    assert delivered_text(events) == "x" * 2000
    assert_well_formed(events)


async def test_a_crash_inside_the_stage_ends_live_streams_with_an_error() -> None:
    stage = ModerationStage(moderator=keywords(), window_chars=64)

    async def broken_release(st: object) -> None:
        raise RuntimeError("bug in release")

    stage._release = broken_release  # type: ignore[method-assign]
    async with Bus() as bus:
        bus.add_sink(stage, max_restarts=0)
        moderated = bus.subscribe(overflow="block")
        async with bus.stream(stream="c") as w:
            await w.delta("hello")
    events = [e async for e in moderated]
    assert [type(e).__name__ for e in events] == ["ErrorEvent"]
    assert events[0].kind == "moderation_failed" and "bug in release" in events[0].message  # type: ignore[union-attr]


async def test_stage_refuses_nan_and_inf() -> None:
    m = keywords()
    with pytest.raises(ValueError, match="timeout_ms: must be more than 0 and finite, got nan"):
        ModerationStage(moderator=m, timeout_ms=float("nan"))
    with pytest.raises(ValueError, match="max_hold_ms: must be more than 0 and finite, got inf"):
        ModerationStage(moderator=m, max_hold_ms=float("inf"))
