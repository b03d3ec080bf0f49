"""A stop asked at one edge reaches the producer's host over the Redis control channel.

Three processes and the shared Redis: a producer host (the ``openai`` producer
reading a fake upstream that streams until its client goes away), an edge with
the ``http`` sink and an edge with the ``websocket`` sink, one client on each.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from aiohttp import web
from streambus_redis import RedisControl
from streambus_websocket.testing import connect

from streambus import AbortEvent, Bus, StopFailed, StopOutcome, StreamBusError

pytestmark = pytest.mark.anyio

PROC = str(Path(__file__).with_name("stop_proc.py"))


class FakeUpstream:
    """An OpenAI-compatible server that streams a token every 20 ms until its client closes the connection."""

    def __init__(self) -> None:
        self.requests = 0
        self.client_gone = anyio.Event()
        self.tokens_sent = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(100_000):
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                }
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                self.tokens_sent += 1
                await anyio.sleep(0.02)
                if request.transport is None or request.transport.is_closing():
                    break
        except (ConnectionResetError, OSError):
            pass
        finally:
            self.client_gone.set()
        return response

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeUpstream]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        try:
            yield self
        finally:
            await runner.cleanup()


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, PROC, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def ready_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    with anyio.fail_after(30):
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
    text = line.decode().strip()
    if not text.startswith("ready"):
        assert proc.stderr is not None
        raise AssertionError(f"process did not start: {text!r} {proc.stderr.read().decode()[-2000:]}")
    return text.partition(" ")[2]


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Close stdin (the edges' signal to stop: communicate() does), wait, print each log (shown when a test fails)."""
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        print("----", proc.args[2], err.decode()[-3000:])  # type: ignore[index]


async def sse_events(client: httpx.AsyncClient, url: str, out: list[dict[str, Any]], done: anyio.Event) -> None:
    async with client.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = orjson.loads(line[5:].strip())
                out.append(event)
                if event["type"] in ("end", "error", "abort"):
                    done.set()
                    return


async def test_stop_at_one_edge_stops_the_producer_on_another_host(redis_url: str, key: str) -> None:
    channel = f"{key}:control"
    async with FakeUpstream().running() as upstream:
        http_edge = spawn("edge", redis_url, key, channel, "http")
        ws_edge = spawn("edge", redis_url, key, channel, "websocket")
        procs = [http_edge, ws_edge]
        try:
            http_url = await ready_line(http_edge)
            ws_url = await ready_line(ws_edge)
            async with httpx.AsyncClient(base_url=http_url, timeout=20) as client, connect(ws_url) as peer:
                await peer.subscribe(id="all")
                sse: list[dict[str, Any]] = []
                sse_done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    producer = spawn("produce", redis_url, key, channel, upstream.url)
                    procs.append(producer)
                    await ready_line(producer)
                    ws_frames = [await peer.frame(), await peer.frame(), await peer.frame()]
                    assert [f["type"] for f in ws_frames] == ["start", "delta", "delta"]
                    stream = ws_frames[0]["stream"]
                    tg.start_soon(sse_events, client, f"/streams/{stream}/sse", sse, sse_done)
                    # the stop is asked at the http edge; the producer runs in a third process
                    r = await client.post(f"/streams/{stream}/abort", json={"reason": "user pressed stop"})
                    assert r.status_code == 200, r.text
                    assert r.json() == {"stream": stream, "outcome": "forwarded"}
                    with anyio.fail_after(10):
                        await upstream.client_gone.wait()  # the provider stops generating
                        await sse_done.wait()
                    ws_frames += await peer.events_until_end(stream)
                for seen in (sse, ws_frames):
                    events = [e for e in seen if e.get("stream") == stream]
                    terminal = [e for e in events if e["type"] in ("end", "error", "abort")]
                    assert len(terminal) == 1 and events[-1] is terminal[0], terminal
                    assert terminal[0]["type"] == "abort" and terminal[0]["by"] == "client"
                    assert terminal[0]["reason"] == "user pressed stop"
                    assert [e["seq"] for e in events] == list(range(len(events)))
                with anyio.fail_after(10):
                    code = await anyio.to_thread.run_sync(producer.wait)
                assert code == 0  # its only request was stopped: the producer host finishes
                # a stop of the ended stream at the other edge: a clean no-op answer
                await peer.send({"op": "abort", "stream": stream, "id": 2})
                assert await peer.expect("aborted") == {"op": "aborted", "id": 2, "stream": stream, "outcome": "ended"}
                r = await client.post(f"/streams/{stream}/abort")
                assert (r.status_code, r.json()["outcome"]) == (200, "ended")
                r = await client.post("/streams/never-was/abort")
                assert (r.status_code, r.json()["outcome"]) == (404, "unknown")
                assert upstream.requests == 1  # the stopped request was not retried
        finally:
            stop_processes(procs)


async def test_control_answers_in_process_and_unknown_without_owner(redis_url: str, key: str) -> None:
    """Two buses in one process, each with its own control: a stop crosses from one to the other."""
    channel = f"{key}:control"
    async with Bus() as owner, Bus() as edge:
        owner_control = RedisControl(url=redis_url, channel=channel)
        edge_control = RedisControl(url=redis_url, channel=channel)
        owner.add_sink(owner_control)
        edge.add_sink(edge_control)
        await owner_control.wait_ready()
        await edge_control.wait_ready()
        started = anyio.Event()

        async def produce() -> None:
            async with owner.stream(stream="far") as w:
                await w.delta("x")
                started.set()
                await anyio.sleep_forever()

        owner.start_soon(produce)
        await started.wait()
        sub = owner.subscribe()
        assert await edge.stop("far", reason="r") is StopOutcome.FORWARDED
        event = await sub.receive()
        assert isinstance(event, AbortEvent) and event.by == "client" and event.reason == "r"
        assert await edge.stop("far") is StopOutcome.ENDED
        assert await edge.stop("nowhere") is StopOutcome.UNKNOWN
        assert owner_control.handled == 3
        await owner.shutdown()
        await edge.shutdown()


async def test_garbage_on_the_control_channel_is_skipped_and_stops_still_work(redis_url: str, key: str) -> None:
    import redis.asyncio as aioredis

    channel = f"{key}:control"
    async with Bus() as owner, Bus() as edge:
        owner_control = RedisControl(url=redis_url, channel=channel)
        edge_control = RedisControl(url=redis_url, channel=channel)
        owner.add_sink(owner_control)
        edge.add_sink(edge_control)
        await owner_control.wait_ready()
        await edge_control.wait_ready()
        client = aioredis.Redis.from_url(redis_url)
        try:
            for junk in (b"not json", b'{"op": "stop"}', b'{"op": "launch", "v": 1}', b"[" * 5000):
                assert await client.publish(channel, junk) == 2
        finally:
            await client.aclose()
        started = anyio.Event()

        async def produce() -> None:
            async with owner.stream(stream="after-junk") as w:
                await w.delta("x")
                started.set()
                await anyio.sleep_forever()

        owner.start_soon(produce)
        await started.wait()
        assert await edge.stop("after-junk") is StopOutcome.FORWARDED
        assert owner_control.handled == 1  # the junk was not taken for a request
        await owner.shutdown()
        await edge.shutdown()


async def test_unreachable_redis_is_stop_failed_and_the_http_edge_answers_503() -> None:
    from streambus_http import HttpSink

    async with Bus(drain_timeout=1) as bus:
        control = RedisControl(url="redis://127.0.0.1:1/0", reply_timeout=0.5)
        bus.add_sink(control)  # it keeps retrying (with backoff) to connect, and stays the bus's stop route
        http = HttpSink(port=0)
        bus.add_sink(http)
        url = await http.started()
        with pytest.raises(StopFailed, match="redis-control"):
            await bus.stop("somewhere")
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/streams/somewhere/abort")
        assert r.status_code == 503 and "could not reach" in r.json()["error"]
        await bus.shutdown()


@pytest.mark.parametrize(
    ("options", "problem"),
    [({"channel": ""}, "channel"), ({"reply_timeout": 0}, "reply_timeout"), ({"reply_timeout": 61}, "reply_timeout")],
)
def test_bad_options_name_the_key(options: dict[str, Any], problem: str) -> None:
    with pytest.raises((ValueError, StreamBusError)) as info:
        RedisControl(**options)
    assert problem in str(info.value)
