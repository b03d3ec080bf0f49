"""fail_open / fail_closed on moderator timeouts and exceptions, and the max_hold_ms bound."""

from __future__ import annotations

import anyio
import pytest
from streambus_moderation import KeywordModerator, ModerationStage, Verdict
from streambus_moderation.testing import (
    GatedModerator,
    RaisingModerator,
    SleepingModerator,
    assert_well_formed,
    delivered_text,
    run_chunks,
)
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, Event, ModerationEvent

pytestmark = pytest.mark.anyio

TEXT = ["some text that the ", "moderator cannot judge"]


@pytest.mark.parametrize(
    ("moderator", "kind"),
    [(SleepingModerator(), "timeout"), (RaisingModerator(ConnectionError("endpoint down")), "error")],
)
async def test_fail_open_lets_text_through_and_counts(moderator: object, kind: str) -> None:
    stage = ModerationStage(moderator=moderator, on_error="fail_open", timeout_ms=20, window_chars=16)  # type: ignore[arg-type]
    with capture_logs() as logs:
        _, moderated = await run_chunks(stage, TEXT)
    assert_well_formed(moderated)
    assert delivered_text(moderated) == "".join(TEXT)
    assert not any(isinstance(e, ModerationEvent) for e in moderated)
    assert stage.stats.failed_open == stage.stats.windows > 0
    assert (stage.stats.timeouts if kind == "timeout" else stage.stats.errors) == stage.stats.windows
    events = [entry for entry in logs if entry["event"] == f"moderation.{kind}"]
    assert len(events) == stage.stats.windows and all(e["policy"] == "fail_open" for e in events)
    if kind == "error":
        assert "ConnectionError: endpoint down" in events[0]["error"]


@pytest.mark.parametrize(
    ("moderator", "kind"),
    [(SleepingModerator(), "timeout"), (RaisingModerator(ValueError("bad model")), "error")],
)
async def test_fail_closed_withholds_unjudged_text_and_says_why(moderator: object, kind: str) -> None:
    stage = ModerationStage(moderator=moderator, on_error="fail_closed", timeout_ms=20, window_chars=64)  # type: ignore[arg-type]
    with capture_logs() as logs:
        _, moderated = await run_chunks(stage, TEXT)
    assert_well_formed(moderated)
    assert delivered_text(moderated) == "[removed]"
    notes = [e for e in moderated if isinstance(e, ModerationEvent)]
    assert [(n.action, n.verdict, n.categories) for n in notes] == [("redact", kind, [f"moderation_{kind}"])]
    assert stage.stats.failed_closed == 1
    assert any(entry["event"] == f"moderation.{kind}" for entry in logs)


async def test_fail_closed_in_observe_mode_retracts_and_abort_aborts() -> None:
    stage = ModerationStage(moderator=RaisingModerator(), mode="observe", on_error="fail_closed", window_chars=64)
    _, moderated = await run_chunks(stage, TEXT)
    notes = [e for e in moderated if isinstance(e, ModerationEvent)]
    assert [(n.action, n.start, n.end) for n in notes] == [("retract", 0, len("".join(TEXT)))]
    stage = ModerationStage(moderator=RaisingModerator(), mode="observe", action="abort", window_chars=64)
    _, aborted = await run_chunks(stage, TEXT)
    assert_well_formed(aborted)
    assert aborted[-1].__class__.__name__ == "AbortEvent"


async def test_a_moderator_returning_garbage_counts_as_an_error() -> None:
    class Garbage:
        async def check(self, text: str) -> Verdict:
            return "yes"  # type: ignore[return-value]

    stage = ModerationStage(moderator=Garbage(), on_error="fail_open", window_chars=64)
    _, moderated = await run_chunks(stage, TEXT)
    assert delivered_text(moderated) == "".join(TEXT)
    assert stage.stats.errors == 1


async def hold_run(policy: str) -> tuple[ModerationStage, list[Event], list[Event]]:
    """Publish a window the moderator will not judge until told; read until text comes out."""
    gated = GatedModerator(KeywordModerator(words={"v": ["kill"]}))
    stage = ModerationStage(
        moderator=gated, mode="gate", window_chars=64, max_hold_ms=30, hold_policy=policy, timeout_ms=60_000
    )
    before: list[Event] = []
    async with Bus() as bus:
        bus.add_sink(stage)
        moderated = bus.subscribe(overflow="block")
        async with bus.stream(stream="h") as w:
            await w.delta("the moderator is slow: kill")
        # The final window waits for the gated moderator; max_hold_ms lets something out.
        with anyio.fail_after(10):
            async for event in moderated:
                before.append(event)
                if isinstance(event, DeltaEvent):
                    break
        gated.open()
    after = [e async for e in moderated]
    return stage, before, after


async def test_max_hold_release_lets_text_out_then_retracts_a_late_violation() -> None:
    stage, before, after = await hold_run("release")
    assert stage.stats.hold_released == 1
    # released before the verdict arrived ...
    assert delivered_text(before) == "the moderator is slow: kill"
    # ... so the late violation becomes a retraction of the span already shown
    notes = [e for e in after if isinstance(e, ModerationEvent)]
    assert [(n.action, n.start, n.end) for n in notes] == [("retract", 23, 27)]
    assert_well_formed(before + after)


async def test_max_hold_block_withholds_the_window() -> None:
    stage, before, after = await hold_run("block")
    assert stage.stats.hold_blocked == 1
    assert delivered_text(before + after) == "[removed]"  # never the text itself
    notes = [e for e in after if isinstance(e, ModerationEvent)]
    assert [(n.action, n.verdict, n.categories) for n in notes] == [("redact", "timeout", ["moderation_hold_exceeded"])]
    assert_well_formed(before + after)
