"""streambus.dedup: (stream, seq) de-duplication for engine sources."""

from __future__ import annotations

import pytest

from streambus import DeltaEvent, EndEvent, ErrorEvent, StartEvent
from streambus.dedup import Deduplicator, Verdict


def start(stream: str) -> StartEvent:
    return StartEvent(stream=stream, seq=0, ts=0.0)


def delta(stream: str, seq: int, first: int | None = None) -> DeltaEvent:
    return DeltaEvent(stream=stream, seq=seq, ts=0.0, text="x", first_seq=first)


def test_new_duplicate_and_gap() -> None:
    dedup = Deduplicator()
    assert dedup.check(start("s")) is Verdict.NEW
    assert dedup.check(delta("s", 1)) is Verdict.NEW
    assert dedup.check(delta("s", 1)) is Verdict.DUPLICATE
    assert dedup.check(start("s")) is Verdict.DUPLICATE
    assert dedup.check(delta("s", 4)) is Verdict.GAP
    assert dedup.last("s") == 1  # a gap records nothing
    assert dedup.check(delta("s", 4, first=2)) is Verdict.NEW  # a coalesced delta counts from its first seq
    assert dedup.live == {"s": 4}


def test_ended_streams_stay_ended_and_are_bounded() -> None:
    dedup = Deduplicator(max_ended=2)
    for name in ("a", "b", "c"):
        dedup.check(start(name))
        assert dedup.check(EndEvent(stream=name, seq=1, ts=0.0)) is Verdict.NEW
    assert dedup.check(delta("c", 2)) is Verdict.DUPLICATE  # after its end
    assert not dedup.knows("a") and dedup.knows("b") and dedup.knows("c")  # the oldest was forgotten
    dedup.end("x", 7)
    assert dedup.check(ErrorEvent(stream="x", seq=8, ts=0.0, kind="k", message="m")) is Verdict.DUPLICATE


def test_accept_next_is_the_fast_path_only() -> None:
    dedup = Deduplicator()
    assert not dedup.accept_next("s", 0)  # unknown stream: judge with check()
    dedup.check(start("s"))
    assert dedup.accept_next("s", 1)
    assert not dedup.accept_next("s", 1) and not dedup.accept_next("s", 3)
    assert dedup.last("s") == 1


def test_snapshot_restore_and_seed() -> None:
    dedup = Deduplicator()
    assert dedup.seed([start("s"), delta("s", 1), delta("s", 1), start("t"), EndEvent(stream="t", seq=1, ts=0.0)]) == 4
    again = Deduplicator()
    again.restore(dedup.snapshot())
    assert again.live == {"s": 1}
    assert again.check(delta("s", 1)) is Verdict.DUPLICATE
    assert again.check(delta("t", 2)) is Verdict.DUPLICATE
    assert again.check(delta("s", 2)) is Verdict.NEW


def test_max_ended_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_ended: must be at least 1, got 0"):
        Deduplicator(max_ended=0)
