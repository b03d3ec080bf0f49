"""Split terms: caught at every split point, across deltas and across windows, in both modes."""

from __future__ import annotations

import pytest
from streambus_moderation import KeywordModerator, ModerationStage
from streambus_moderation.testing import RecordingModerator, assert_well_formed, delivered_text, run_chunks

from streambus import AbortEvent, ModerationEvent

pytestmark = pytest.mark.anyio

TERMS = ["kill", "殺す", "ｺﾛｽ"]


def stage(mode: str, window: int = 12, overlap: int = 0, **kw: object) -> ModerationStage:
    return ModerationStage(
        moderator=KeywordModerator(words={"violence": ["kill", "殺す", "コロス"]}),
        mode=mode,
        window_chars=window,
        overlap_chars=overlap,
        **kw,
    )


@pytest.mark.parametrize("term", TERMS)
async def test_gate_catches_term_at_every_split_point_without_leaking(term: str) -> None:
    text = f"well then, {term} them all now"
    start = text.index(term)
    for split in range(1, len(text)):
        _, moderated = await run_chunks(stage("gate"), [text[:split], text[split:]])
        assert_well_formed(moderated)
        out = delivered_text(moderated)
        assert out == text.replace(term, "[removed]"), f"split at {split}"
        notes = [e for e in moderated if isinstance(e, ModerationEvent)]
        assert [(n.action, n.start, n.end, n.categories) for n in notes] == [
            ("redact", start, start + len("[removed]"), ["violence"])
        ], f"split at {split}"


@pytest.mark.parametrize("term", TERMS)
async def test_term_straddling_every_window_boundary_is_caught(term: str) -> None:
    # The moderator asks for twice its longest term as overlap; window 12 leaves
    # 4..6 new characters per window, so shifting the term by one character at a
    # time puts every one of its inner positions on a window boundary.
    for pad in range(14):
        text = "x" * pad + " " + term + " tail text to finish"
        start = text.index(term)
        # one delta per character: the worst chunking
        _, gated = await run_chunks(stage("gate"), list(text))
        assert delivered_text(gated) == text.replace(term, "[removed]"), f"pad {pad}"
        _, observed = await run_chunks(stage("observe"), list(text))
        assert_well_formed(observed)
        assert delivered_text(observed) == text
        retracts = [(e.start, e.end) for e in observed if isinstance(e, ModerationEvent)]
        assert retracts == [(start, start + len(term))], f"pad {pad}"


async def test_term_split_into_three_deltas_at_every_pair_of_points() -> None:
    term = "kill"
    text = f"so {term} it"
    a = text.index(term)
    for i in range(a, a + len(term) + 1):
        for j in range(i, a + len(term) + 1):
            _, moderated = await run_chunks(stage("gate", window=64), [text[:i], text[i:j], text[j:]])
            assert delivered_text(moderated) == "so [removed] it", (i, j)


async def test_final_partial_window_is_checked_before_end() -> None:
    # The term arrives last and never fills a window: it must still be checked.
    _, moderated = await run_chunks(stage("gate", window=200, overlap=10), ["fine text, then ", "kill"])
    assert delivered_text(moderated) == "fine text, then [removed]"
    assert_well_formed(moderated)
    _, aborted = await run_chunks(
        stage("observe", window=200, overlap=10, action="abort"), ["fine text, then ", "kill"]
    )
    assert_well_formed(aborted)
    assert isinstance(aborted[-1], AbortEvent) and aborted[-1].by == "moderation"
    assert isinstance(aborted[-2], ModerationEvent) and aborted[-2].action == "abort"


async def test_overlap_is_raised_to_what_the_moderator_needs() -> None:
    s = stage("gate", window=40, overlap=0)
    assert s.overlap == 2 * len("kill")  # the longest term
    with pytest.raises(ValueError, match="window_chars: the moderator needs 8 characters of overlap"):
        stage("gate", window=6, overlap=0)


async def test_gate_and_observe_check_the_same_windows() -> None:
    # One scheduler cuts the windows; the mode only decides what a verdict does.
    text = "clean text that fills several windows"
    checked: dict[str, list[str]] = {}
    for mode in ("gate", "observe"):
        moderator = RecordingModerator(KeywordModerator(words={"violence": ["kill"]}))
        await run_chunks(ModerationStage(moderator=moderator, mode=mode, window_chars=12), list(text))
        checked[mode] = sorted(window for window, _ in moderator.calls)  # checks may finish in any order
    # windows of 12 characters, each starting 8 (twice "kill") before the previous one ended
    assert checked["gate"] == checked["observe"] == sorted(text[a : a + 12] for a in range(0, len(text) - 8, 4))
