"""An interposed stage drains before the subscriptions it publishes to close."""

from __future__ import annotations

import anyio.lowlevel
import msgspec
import pytest

from streambus import Bus, DeltaEvent, EndEvent, Event, StartEvent, Subscription

pytestmark = pytest.mark.anyio


class SlowUpper:
    """A stage that republishes every event only after yielding a few times."""

    interpose = True

    def __init__(self) -> None:
        self.bus: Bus | None = None

    async def setup(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, events: Subscription) -> None:
        assert self.bus is not None
        async for e in events:
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            if isinstance(e, DeltaEvent):
                e = msgspec.structs.replace(e, text=e.text.upper())
            await self.bus.publish(e, processed=True)


async def test_leaving_the_bus_waits_for_the_stage_before_closing_readers() -> None:
    async with Bus() as bus:
        bus.add_sink(SlowUpper())
        moderated = bus.subscribe(overflow="block")
        raw = bus.subscribe(raw=True, overflow="block")
        async with bus.stream() as w:
            for piece in ("a", "b", "c"):
                await w.delta(piece)
        # no wait here: leaving the block must still deliver the stage's output
    got: list[Event] = [e async for e in moderated]
    assert [type(e) for e in got] == [StartEvent, DeltaEvent, DeltaEvent, DeltaEvent, EndEvent]
    assert "".join(e.text for e in got if isinstance(e, DeltaEvent)) == "ABC"
    assert "".join(e.text for e in [e async for e in raw] if isinstance(e, DeltaEvent)) == "abc"
