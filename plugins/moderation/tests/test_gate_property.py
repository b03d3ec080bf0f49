# ruff: noqa: RUF001  (full-width and half-width characters are the point of these tests)
"""Property: gate mode never releases text that was not approved, over random chunkings."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streambus_moderation import KeywordModerator, ModerationStage
from streambus_moderation.testing import assert_well_formed, delivered_text, run_chunks

from streambus import AbortEvent, DeltaEvent

pytestmark = pytest.mark.anyio

PIECES = ["k", "i", "l", "ll", "kill", "殺", "す", "殺す", " ", "a", "x", "Ｋ", "ﾛ", "ｺ", "ｽ", "ki"]


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


def moderator() -> KeywordModerator:
    return KeywordModerator(words={"v": ["kill", "殺す", "コロス"]}, whole_words=False)


def expected_redacted(text: str, replacement: str) -> str:
    out, pos = [], 0
    for span in moderator().scan(text):
        out.append(text[pos : span.start])
        out.append(replacement)
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=40).map("".join)
cut_lists = st.lists(st.integers(min_value=0, max_value=200), max_size=12)
windows = st.integers(min_value=9, max_value=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, cuts=cut_lists, window=windows)
async def test_gate_redacts_every_flagged_term_and_loses_nothing_else(text: str, cuts: list[int], window: int) -> None:
    stage = ModerationStage(moderator=moderator(), mode="gate", window_chars=window, replacement="#")
    _, moderated = await run_chunks(stage, chunked(text, cuts))
    assert_well_formed(moderated)
    assert delivered_text(moderated) == expected_redacted(text, "#")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, cuts=cut_lists, window=windows)
async def test_gate_abort_never_releases_any_character_of_a_flagged_term(
    text: str, cuts: list[int], window: int
) -> None:
    stage = ModerationStage(moderator=moderator(), mode="gate", action="abort", window_chars=window)
    _, moderated = await run_chunks(stage, chunked(text, cuts))
    assert_well_formed(moderated)
    found = moderator().scan(text)
    out = delivered_text(moderated)
    if not found:
        assert out == text
        return
    # Everything delivered comes from before the first flagged term: not one of its characters.
    assert text.startswith(out)
    assert len(out) <= found[0].start
    last = moderated[-1]
    assert isinstance(last, AbortEvent) and last.by == "moderation"
    assert all(isinstance(e, DeltaEvent) is False or e.text for e in moderated)
