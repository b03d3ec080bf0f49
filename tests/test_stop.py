"""Bus.stop: the one way an edge stops a stream, owned here or behind a stop route."""

from __future__ import annotations

import anyio
import pytest

from streambus import (
    AbortEvent,
    Bus,
    DecodeError,
    DeltaEvent,
    Event,
    StopFailed,
    StopOutcome,
    StopRoute,
    Subscription,
)
from streambus.stopping import StopReply, StopRequest, decode_stop, encode_stop

pytestmark = pytest.mark.anyio


async def collect(sub: Subscription) -> list[Event]:
    return [e async for e in sub]


async def live_stream(bus: Bus, stream: str, started: anyio.Event, cancelled: list[bool]) -> None:
    try:
        async with bus.stream(stream=stream) as w:
            await w.delta("partial")
            started.set()
            await anyio.sleep_forever()
    finally:
        cancelled.append(True)


class FakeRoute:
    """A route that answers from a table and records what it was asked."""

    def __init__(self, answers: dict[str, StopOutcome], fail: bool = False) -> None:
        self.answers = answers
        self.fail = fail
        self.asked: list[tuple[str, str, str]] = []

    async def forward_stop(self, stream: str, *, reason: str, by: str) -> StopOutcome:
        self.asked.append((stream, reason, by))
        if self.fail:
            raise StopFailed("fake route: engine unreachable")
        return self.answers.get(stream, StopOutcome.UNKNOWN)


async def test_stop_of_a_local_stream_cancels_its_producer_and_publishes_one_abort() -> None:
    started, cancelled = anyio.Event(), list[bool]()
    route = FakeRoute({})
    async with Bus() as bus:
        bus.add_stop_route(route)
        sub = bus.subscribe()
        bus.start_soon(live_stream, bus, "s1", started, cancelled)
        await started.wait()
        assert await bus.stop("s1", reason="user pressed stop") is StopOutcome.STOPPED
        events = []
        async for event in sub:
            events.append(event)
            if isinstance(event, AbortEvent):
                break
        assert await bus.stop("s1") is StopOutcome.ENDED  # a second stop: a clean no-op
    events += await collect(sub)
    aborts = [e for e in events if isinstance(e, AbortEvent)]
    assert len(aborts) == 1 and aborts[0].by == "client" and aborts[0].reason == "user pressed stop"
    assert events[-1] is aborts[0]
    assert [e.text for e in events if isinstance(e, DeltaEvent)] == ["partial"]
    assert cancelled == [True]
    assert route.asked == []  # owned here: no route is asked


async def test_stop_of_an_ended_stream_is_ended_and_an_unknown_one_unknown() -> None:
    route = FakeRoute({})
    async with Bus() as bus:
        bus.add_stop_route(route)
        async with bus.stream(stream="done") as w:
            await w.delta("x")
        assert bus.ended("done")
        assert await bus.stop("done") is StopOutcome.ENDED
        assert await bus.stop("nobody") is StopOutcome.UNKNOWN
    assert route.asked == [("nobody", "", "client")]


async def test_a_stream_owned_elsewhere_is_forwarded_through_the_routes_in_order() -> None:
    first = FakeRoute({"a": StopOutcome.UNKNOWN})
    second = FakeRoute({"a": StopOutcome.FORWARDED, "gone": StopOutcome.ENDED})
    async with Bus() as bus:
        bus.add_stop_route(first)
        remove = bus.add_stop_route(second)
        assert isinstance(second, StopRoute)
        assert await bus.stop("a", reason="r", by="client") is StopOutcome.FORWARDED
        assert await bus.stop("gone") is StopOutcome.ENDED
        assert first.asked == [("a", "r", "client"), ("gone", "", "client")]
        remove()
        assert await bus.stop("a") is StopOutcome.UNKNOWN
        assert await bus.stop("a", forward=False) is StopOutcome.UNKNOWN
    assert len(second.asked) == 2


async def test_forward_false_never_asks_a_route() -> None:
    route = FakeRoute({"x": StopOutcome.FORWARDED})
    async with Bus() as bus:
        bus.add_stop_route(route)
        assert await bus.stop("x", forward=False) is StopOutcome.UNKNOWN
    assert route.asked == []


async def test_an_unreachable_route_raises_stop_failed_unless_another_answers() -> None:
    broken = FakeRoute({}, fail=True)
    async with Bus() as bus:
        bus.add_stop_route(broken)
        with pytest.raises(StopFailed, match="unreachable"):
            await bus.stop("far")
        bus.add_stop_route(FakeRoute({"far": StopOutcome.FORWARDED}))
        assert await bus.stop("far") is StopOutcome.FORWARDED


async def test_ended_streams_are_remembered_within_a_bound() -> None:
    async with Bus() as bus:
        for i in range(3):
            async with bus.stream(stream=f"s{i}"):
                pass
        assert all(bus.ended(f"s{i}") for i in range(3))
        assert not bus.ended("s9")


def test_control_messages_round_trip_and_bad_ones_name_the_field() -> None:
    request = StopRequest(id="1", stream="s", origin="o", reply="ch", reason="r")
    assert decode_stop(encode_stop(request)) == request
    reply = StopReply(id="1", stream="s", origin="o2", outcome="stopped")
    assert decode_stop(encode_stop(reply)) == reply
    with pytest.raises(DecodeError) as info:
        decode_stop(b'{"op": "stop", "id": "1", "origin": "o", "reply": "c"}')
    assert info.value.field == "$.stream"
    with pytest.raises(DecodeError, match="not JSON"):
        decode_stop(b"{nope")
    with pytest.raises(DecodeError):
        decode_stop(b'{"op": "launch"}')


async def test_a_live_stream_owned_elsewhere_without_a_route_is_unknown_and_logged() -> None:
    from structlog.testing import capture_logs

    from streambus import StartEvent

    async with Bus() as bus:
        # what a source that republishes another process's stream does
        await bus.publish(StartEvent(stream="foreign", seq=0, ts=0.0, model="m", provider="p", meta={}))
        with capture_logs() as logs:
            assert await bus.stop("foreign") is StopOutcome.UNKNOWN
        assert [entry["event"] for entry in logs] == ["bus.stop_unrouted"]
        assert "redis-control" in logs[0]["hint"]
        await bus.publish(AbortEvent(stream="foreign", seq=1, ts=0.0, reason="r", by="client"))
        assert await bus.stop("foreign") is StopOutcome.ENDED


def test_a_control_sink_must_carry_stops() -> None:
    from streambus.engines import ControlSink

    class Mute(ControlSink):
        engine = "mute"

    with pytest.raises(TypeError, match="forward_stop"):
        Mute()  # type: ignore[abstract]
