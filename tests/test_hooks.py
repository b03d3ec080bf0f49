"""Start hooks run as each stream starts, in the producer's task, and may add to its meta."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest
from structlog.testing import capture_logs

from streambus import Bus, StartEvent, is_terminal
from streambus.hooks import add_start_hook

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


async def test_a_hook_adds_to_meta_from_the_producers_context() -> None:
    def tag(meta: dict[str, Any]) -> None:
        meta["request_id"] = request_id.get()

    remove = add_start_hook(tag)
    try:
        async with Bus() as bus:
            sub = bus.subscribe()

            async def producer(rid: str) -> None:
                request_id.set(rid)
                async with bus.stream(model="m", meta={"user": "u1"}):
                    pass

            bus.start_soon(producer, "r-1")
            bus.start_soon(producer, "r-2")
            seen: list[StartEvent] = []
            async for event in sub:
                if isinstance(event, StartEvent):
                    seen.append(event)
                elif is_terminal(event) and len(seen) == 2:
                    break
    finally:
        remove()
    assert sorted((e.meta["user"], e.meta["request_id"]) for e in seen) == [("u1", "r-1"), ("u1", "r-2")]


async def test_a_removed_hook_runs_no_more_and_removing_twice_is_harmless() -> None:
    calls: list[str] = []
    remove = add_start_hook(lambda meta: calls.append("called"))
    async with Bus() as bus:
        async with bus.stream(model="m"):
            pass
        remove()
        remove()
        async with bus.stream(model="m"):
            pass
    assert calls == ["called"]


async def test_a_failing_hook_is_logged_and_the_stream_still_starts() -> None:
    def broken(meta: dict[str, Any]) -> None:
        raise KeyError("no tracer")

    remove = add_start_hook(broken)
    try:
        with capture_logs() as logs:
            async with Bus() as bus:
                sub = bus.subscribe()
                async with bus.stream(model="m", meta={"a": 1}) as w:
                    await w.delta("hi")
                events = []
                async for event in sub:
                    events.append(event)
                    if is_terminal(event):
                        break
    finally:
        remove()
    assert [type(e).__name__ for e in events] == ["StartEvent", "DeltaEvent", "EndEvent"]
    assert any(log["event"] == "start_hook.failed" and "KeyError" in log["error"] for log in logs)
