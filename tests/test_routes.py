"""A live stream's route: what its writer offers each delta to (``Bus.route``, ``StreamRoute``)."""

from __future__ import annotations

import time

import pytest
from anyio import wait_all_tasks_blocked

from streambus import Bus, BusClosed, DeltaEvent, EndEvent, Event, Filter, StartEvent, StreamBusError
from streambus.subscription import StreamRoute

pytestmark = pytest.mark.anyio


def texts(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, DeltaEvent)]


async def test_a_writers_deltas_take_its_streams_route() -> None:
    async with Bus() as bus:
        everything = bus.subscribe(overflow="block")
        mine = bus.subscribe(Filter.of(streams="s1"), overflow="block")
        other = bus.subscribe(Filter.of(streams="s2"), overflow="block")
        async with bus.stream(stream="s1") as w:
            route = bus.route("s1")
            assert isinstance(route, StreamRoute)
            assert route.current
            assert route.followers == (mine,)
            await w.delta("a")
            # A producer of its own may offer to the route as the writer does.
            assert route.offer(DeltaEvent(stream="s1", seq=w.seq + 1, ts=time.time(), text="b")) is None
        await wait_all_tasks_blocked()
        assert texts(await everything.receive_batch()) == ["a", "b"]
        assert texts(await mine.receive_batch()) == ["a", "b"]
        assert other.pending == 0
        with pytest.raises(KeyError, match="'s1' is not live"):
            bus.route("s1")  # an ended stream's route is gone


async def test_the_route_of_a_stream_that_never_started_is_a_clear_error() -> None:
    async with Bus() as bus:
        with pytest.raises(KeyError, match="'nope' is not live on this bus"):
            bus.route("nope")
        # Publishing its start opens it; its end closes it.
        await bus.publish(StartEvent(stream="nope", seq=0, ts=time.time()))
        assert bus.route("nope").current
        await bus.publish(EndEvent(stream="nope", seq=1, ts=time.time()))
        with pytest.raises(KeyError):
            bus.route("nope")


async def test_subscribers_that_join_and_leave_mid_stream_update_its_route() -> None:
    async with Bus() as bus:
        async with bus.stream(stream="s1") as w:
            await w.delta("before")
            late = bus.subscribe(Filter.of(streams="s1"), overflow="block")
            by_model = bus.subscribe(Filter.of(models="m"), overflow="block")  # matches nothing live
            assert bus.route("s1").followers == (late,)
            await w.delta("after")
            late.close()
            await w.delta("gone")  # no follower left: nothing to deliver, nothing raised
            assert bus.route("s1").followers == ()
        assert texts([e async for e in late]) == ["after"]
        assert by_model.pending == 0


async def test_a_route_is_current_until_its_stream_ends_or_the_bus_stops() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        async with bus.stream(stream="s1") as w:
            ended = bus.route("s1")
            await w.delta("x")
        assert not ended.current
        # A stream published event by event (a replay, a remote source) and still live at the end.
        await bus.publish(StartEvent(stream="s2", seq=0, ts=time.time()))
        live = bus.route("s2")
        assert live.current
    assert not live.current
    with pytest.raises(BusClosed, match="not running"):
        bus.route("s2")
    assert texts([e async for e in sub]) == ["x"]


async def test_a_stream_started_again_gets_a_new_route_and_the_old_one_is_not_current() -> None:
    async with Bus() as bus:
        follower = bus.subscribe(Filter.of(streams="s1"), overflow="block")
        await bus.publish(StartEvent(stream="s1", seq=0, ts=time.time()))
        first = bus.route("s1")
        # A replayed start of a live stream (a source re-reading its tail): routing is decided again.
        await bus.publish(StartEvent(stream="s1", seq=0, ts=time.time()))
        assert not first.current
        again = bus.route("s1")
        assert again is not first and again.current
        assert again.followers == (follower,)


async def test_a_delta_from_a_writer_never_entered_is_a_clear_error() -> None:
    async with Bus() as bus:
        sub = bus.subscribe()
        w = bus.stream(stream="s1")
        with pytest.raises(StreamBusError, match=r"stream 's1' is not open: write inside `async with bus.stream"):
            await w.delta("lost?")
        async with w:  # the same writer still works once entered, from its first seq
            await w.delta("kept")
        events = await sub.receive_batch()
        assert [(type(e).__name__, e.seq) for e in events] == [("StartEvent", 0), ("DeltaEvent", 1), ("EndEvent", 2)]
        assert texts(events) == ["kept"]
