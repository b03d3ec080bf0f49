"""POST /streams/{id}/abort and /api/chat/{id}/abort over real HTTP: outcomes, authorization, resume after a stop."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from streambus import AbortEvent, Bus, DeltaEvent, decode

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-bound


def parse_sse(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            frame[key] = value[1:] if value.startswith(" ") else value
        if "data" in frame:
            frames.append(frame)
    return frames


class Live:
    """A producer that writes *parts* then waits to be stopped; records whether it was cancelled."""

    def __init__(self, bus: Bus, stream: str, parts: list[str], meta: dict[str, Any] | None = None) -> None:
        self.bus, self.stream, self.parts, self.meta = bus, stream, parts, meta
        self.written = anyio.Event()
        self.cancelled = False

    async def run(self) -> None:
        try:
            async with self.bus.stream(model="m", stream=self.stream, meta=self.meta) as w:
                for part in self.parts:
                    await w.delta(part)
                self.written.set()
                await anyio.sleep_forever()
        except BaseException:
            self.cancelled = True
            raise
        finally:
            self.cancelled = True


async def start_live(served: Any, stream: str, parts: list[str], **kw: Any) -> Live:
    live = Live(served.bus, stream, parts, **kw)
    served.bus.start_soon(live.run)
    await live.written.wait()
    hub = served.sink.hub
    with anyio.fail_after(5):
        while hub.last_seq(stream) < len(parts):
            await hub.wait_changed()
    return live


async def wait_ended(served: Any, stream: str) -> None:
    hub = served.sink.hub
    with anyio.fail_after(5):
        while not hub.ended(stream):
            await hub.wait_changed()


async def test_abort_stops_the_producer_and_resume_gets_text_and_one_abort(served: Any) -> None:
    live = await start_live(served, "s1", ["Hel", "lo"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post("/streams/s1/abort", json={"reason": "user pressed stop"})
        assert r.status_code == 200, r.text
        assert r.json() == {"stream": "s1", "outcome": "stopped"}
        await wait_ended(served, "s1")
        assert live.cancelled
        # a second stop, and a stop of a stream that ended: a clean no-op
        r = await client.post("/streams/s1/abort")
        assert (r.status_code, r.json()["outcome"]) == (200, "ended")
        # resume after the first delta: the rest of the text and the single abort, then the body ends
        r = await client.get("/streams/s1/sse", headers={"Last-Event-ID": "s1:1"})
        events = [decode(f["data"]) for f in parse_sse(r.text)]
        assert [type(e) for e in events] == [DeltaEvent, AbortEvent]
        assert isinstance(events[0], DeltaEvent) and events[0].text == "lo"
        abort = events[-1]
        assert isinstance(abort, AbortEvent) and abort.by == "client" and abort.reason == "user pressed stop"
        # resume at the abort itself: nothing more (204), never a hang
        r = await client.get("/streams/s1/sse", headers={"Last-Event-ID": f"s1:{abort.seq}"})
        assert r.status_code == 204


async def test_unknown_stream_is_404_and_bad_bodies_are_400_without_stopping(served: Any) -> None:
    live = await start_live(served, "keep", ["x"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post("/streams/nope/abort")
        assert (r.status_code, r.json()) == (404, {"stream": "nope", "outcome": "unknown"})
        for body, problem in [
            (b"{not json", "must be JSON"),
            (b"[1, 2]", "JSON object"),
            (b'{"reason": 5}', "reason"),
            (b'{"reason": "' + b"x" * 201 + b'"}', "at most 200"),
            (b'{"pad": "' + b"x" * 5000 + b'"}', "at most 4096 bytes"),
        ]:
            r = await client.post("/streams/keep/abort", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and problem in r.json()["error"], (body, r.text)
        r = await client.get("/streams")
        assert r.json()["streams"][0]["live"] is True
    assert not live.cancelled
    assert not served.bus.ended("keep")


@pytest.mark.sink_options(token="s3cret-token")
async def test_with_a_token_stopping_requires_it(served: Any) -> None:
    live = await start_live(served, "t1", ["x"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.post("/streams/t1/abort", headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"]
            assert "wrong" not in r.text and "s3cret" not in r.text
        r = await client.post("/api/chat/c1/abort")
        assert r.status_code == 401  # a chat stop too, before it says anything about the chat
        assert not live.cancelled
        r = await client.post("/streams/t1/abort", headers={"Authorization": "Bearer s3cret-token"})
        assert (r.status_code, r.json()["outcome"]) == (200, "stopped")
    await wait_ended(served, "t1")


@pytest.mark.sink_options(allow_stop=False)
async def test_allow_stop_false_refuses_every_stop(served: Any) -> None:
    live = await start_live(served, "n1", ["x"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post("/streams/n1/abort")
        assert r.status_code == 403 and "allow_stop" in r.json()["error"]
    assert not live.cancelled


@pytest.mark.sink_options(cors_origins=["http://app.example"])
async def test_a_foreign_page_cannot_stop_a_stream(served: Any) -> None:
    # A cross-site form/fetch POST is a "simple request" that needs no preflight: the Origin guard refuses it.
    live = await start_live(served, "x1", ["x"])
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post(
            "/streams/x1/abort", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}
        )
        assert r.status_code == 403
        assert not live.cancelled
        r = await client.post("/streams/x1/abort", headers={"Origin": "http://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
    await wait_ended(served, "x1")


async def test_chat_abort_stops_the_chats_live_stream(served: Any) -> None:
    live = await start_live(served, "ans-1", ["Hi"], meta={"chat": "chat-9"})
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        r = await client.post("/api/chat/chat-9/abort")
        assert r.status_code == 200
        assert r.json() == {"stream": "ans-1", "outcome": "stopped", "chat": "chat-9"}
        await wait_ended(served, "ans-1")
        assert live.cancelled
        r = await client.post("/api/chat/chat-9/abort")
        assert (r.status_code, r.json()["outcome"]) == (200, "ended")
        r = await client.post("/api/chat/other/abort")
        assert (r.status_code, r.json()["outcome"]) == (404, "unknown")
        # the AI SDK's resume route: the chat has no live stream any more
        r = await client.get("/api/chat/chat-9/stream")
        assert r.status_code == 204
