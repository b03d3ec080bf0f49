"""The pytest plugin's fixtures (found through the pytest11 entry point) and EventCapture's helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from streambus import Bus, DeltaEvent, EndEvent, Filter, StartEvent
from streambus.replay import ReplayProducer
from streambus.testing import EventCapture

pytestmark = pytest.mark.anyio

CHAT = Path(__file__).parent / "data" / "chat.jsonl"
ENGLISH = "The sky is blue because air scatters short blue light more than red."


async def test_fixtures_replay_into_a_bus_and_capture(
    streambus_bus: Bus,
    replay_recording: Callable[..., Awaitable[ReplayProducer]],
    event_capture: Callable[..., EventCapture],
) -> None:
    capture = event_capture(streambus_bus)
    producer = await replay_recording(streambus_bus, CHAT)
    assert len(capture.ended) == 3
    english = producer.id_map["rec-ollama-en"]
    capture.assert_text(ENGLISH, english)
    assert capture.texts()[producer.id_map["rec-openai-en"]] == "Hello! How can I help you today?"
    assert capture.start(english).model == "llama3.2"
    assert capture.end(english).timings["total_duration"] == 0.601234567
    for stream in capture.streams:
        capture.assert_complete(stream)


async def test_replay_in_the_background_with_a_filtered_capture(
    streambus_bus: Bus,
    replay_recording: Callable[..., Awaitable[ReplayProducer]],
    event_capture: Callable[..., EventCapture],
) -> None:
    capture = event_capture(streambus_bus, filter=Filter.of(providers="openai"))
    await replay_recording(streambus_bus, CHAT, wait=False, speed=100.0)
    with anyio.fail_after(30):
        await capture.wait_streams(1)
    assert capture.text() == "Hello! How can I help you today?"


async def test_mock_model_server_fixture_serves_any_backend(
    mock_model_server: Callable[..., object], anyio_backend: str
) -> None:
    pytest.importorskip("streambus_ollama")
    server = mock_model_server(CHAT, burst=True)
    url = server.url  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "?", "stream": False})
    assert response.json()["response"] == ENGLISH


async def test_assert_text_shows_where_the_text_differs() -> None:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        async with bus.stream(model="m") as w:
            await w.delta("Hello, world")
            await w.delta(" and more", channel="reasoning")
    capture.assert_text("Hello, world")
    capture.assert_text(" and more", channel="reasoning")
    with pytest.raises(
        AssertionError, match=r"differs at character 7: expected \.\.\.'Hello, there', got \.\.\.'Hello, world'"
    ):
        capture.assert_text("Hello, there")
    with pytest.raises(AssertionError, match="no captured events for stream 'nope'"):
        capture.text("nope")


async def test_helpers_reject_malformed_or_unfinished_streams() -> None:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        await bus.publish(StartEvent(stream="s", seq=0, ts=1.0))
        await bus.publish(DeltaEvent(stream="s", seq=2, ts=1.0, text="gap"))
        await bus.publish(StartEvent(stream="t", seq=0, ts=1.0))
        await bus.publish(EndEvent(stream="t", seq=1, ts=1.0))
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(AssertionError, match="pass stream=...: the capture holds 2 streams"):
            capture.text()
        with pytest.raises(AssertionError, match="expected seq 1, got 2"):
            capture.assert_complete("s")
        with pytest.raises(AssertionError, match="stream 's' has not ended"):
            capture.terminal("s")
        capture.assert_complete("t")
        await bus.publish(EndEvent(stream="s", seq=3, ts=1.0))
    with pytest.raises(AssertionError, match="the capture ended before the condition held"):
        await capture.wait_streams(3)


async def test_raw_capture_sees_events_before_an_interposed_stage() -> None:
    class Upper:
        interpose = True

        async def run(self, events: object) -> None:
            async for event in events:  # type: ignore[attr-defined]
                if isinstance(event, DeltaEvent):
                    event = DeltaEvent(stream=event.stream, seq=event.seq, ts=event.ts, text=event.text.upper())
                await bus.publish(event, processed=True)

    raw, processed = EventCapture(raw=True), EventCapture()
    async with Bus() as bus:
        bus.add_sink(Upper())
        raw.attach(bus, name="raw")
        processed.attach(bus)
        async with bus.stream(model="m") as w:
            await w.delta("quiet")
    assert raw.text() == "quiet" and processed.text() == "QUIET"
