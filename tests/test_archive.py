"""streambus.archive (the hook between edge sinks and a distributed engine) and StreamHistory.fill."""

from __future__ import annotations

import gc
import weakref

import anyio
import pytest

from streambus import Bus, DeltaEvent, EndEvent, Event, StartEvent, encode
from streambus.archive import (
    Interest,
    StreamArchive,
    add_interest,
    archive_of,
    attach_archive,
    detach_archive,
    interested,
    remove_interest,
)
from streambus.history import StreamHistory

pytestmark = pytest.mark.anyio


def _stream(stream: str, n: int, *, end: bool = False) -> list[Event]:
    events: list[Event] = [StartEvent(stream=stream, seq=0, ts=0.0, model="m", meta={"user": "u"})]
    events += [DeltaEvent(stream=stream, seq=i, ts=0.0, text=f"{i} ") for i in range(1, n + 1)]
    if end:
        events.append(EndEvent(stream=stream, seq=n + 1, ts=0.0, reason="stop"))
    return events


class Archive:
    def __init__(self) -> None:
        self.followed: list[str] = []

    async def fetch(self, stream: str) -> list[Event] | None:
        return None

    def follow(self, stream: str) -> None:
        self.followed.append(stream)

    def live_starts(self) -> list[StartEvent]:
        return []


class Wants:
    def __init__(self, user: str) -> None:
        self.user = user

    def wants(self, start: StartEvent) -> bool:
        return start.meta.get("user") == self.user


async def test_a_bus_has_no_archive_until_one_is_attached_and_none_after_it_detached() -> None:
    async with Bus() as bus:
        assert archive_of(bus) is None and archive_of(None) is None
        archive = Archive()
        assert isinstance(archive, StreamArchive)
        attach_archive(bus, archive)
        assert archive_of(bus) is archive
        detach_archive(bus, Archive())  # another one's detach leaves it
        assert archive_of(bus) is archive
        detach_archive(bus, archive)
        assert archive_of(bus) is None


async def test_interested_asks_every_registered_interest_and_counts_one_twice_once() -> None:
    start = _stream("s", 0)[0]
    assert isinstance(start, StartEvent)
    async with Bus() as bus:
        assert not interested(bus, start)
        other, mine = Wants("someone else"), Wants("u")
        assert isinstance(mine, Interest)
        add_interest(bus, other)
        assert not interested(bus, start)
        add_interest(bus, mine)
        add_interest(bus, mine)
        assert interested(bus, start)
        remove_interest(bus, mine)
        assert not interested(bus, start)


def test_the_registries_do_not_keep_a_bus_alive() -> None:
    refs: list[weakref.ref[Bus]] = []

    async def main() -> None:
        async with Bus() as bus:
            attach_archive(bus, Archive())
            add_interest(bus, Wants("u"))
            refs.append(weakref.ref(bus))

    anyio.run(main)
    gc.collect()
    assert refs[0]() is None


def test_fill_holds_a_fetched_stream_and_answers_missed_from_it() -> None:
    history = StreamHistory(100, 60.0, 10, lambda: 0.0)
    events = _stream("s", 5)
    assert history.fill(events)
    assert history.missed("s", 2) == [encode(e) for e in events[3:]]
    log = history.get("s")
    assert log is not None and log.start == events[0] and not log.ended
    assert [lg.start for lg in history.live()] == [events[0]]


def test_fill_replaces_less_but_keeps_more_and_ends_an_ended_stream() -> None:
    history = StreamHistory(100, 60.0, 10, lambda: 0.0)
    for event in _stream("s", 3)[2:]:  # seen from its middle: cannot answer a client that saw seq 0
        history.record(event, encode(event))
    assert history.missed("s", 0) is None
    whole = _stream("s", 4, end=True)
    assert history.fill(whole)
    assert history.missed("s", 0) == [encode(e) for e in whole[1:]]
    log = history.get("s")
    assert log is not None and log.ended
    assert not history.fill(_stream("s", 3)), "what it holds reaches further: kept"
    assert history.missed("s", 0) == [encode(e) for e in whole[1:]]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([], id="empty"),
        pytest.param(_stream("s", 2)[1:], id="no start"),
        pytest.param([*_stream("s", 1), DeltaEvent(stream="t", seq=2, ts=0.0, text="x")], id="two streams"),
    ],
)
def test_fill_refuses_what_is_not_one_stream_from_its_start(bad: list[Event]) -> None:
    history = StreamHistory(100, 60.0, 10, lambda: 0.0)
    with pytest.raises(ValueError, match="StreamHistory.fill"):
        history.fill(bad)
