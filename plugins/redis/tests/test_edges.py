"""Issue 26: resume on any edge, interest routing, and ``producer_lost``, with separate processes and real Redis.

The producer (``proc.py paced``) writes in the ``per_stream`` layout; each
edge (``proc.py edge``) is a RedisSource following only what its WebSocket
clients want, feeding a WebSocketSink. A client reading on edge B loses B
(``SIGKILL``) mid-stream and resumes on edge C, a process started only then;
later it drops again and resumes on B restarted. The text it ends with must
be exactly what was produced: no gap, no duplicate.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from streambus_redis import RedisSink, RedisSource

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, StartEvent

pytestmark = pytest.mark.anyio

websocket = pytest.importorskip("streambus_websocket", reason="streambus-websocket is in this plugin's [test] extra")
testing = pytest.importorskip("streambus_websocket.testing")

PROC = str(Path(__file__).with_name("proc.py"))


class Procs:
    """Child processes of one test, killed at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``proc.py ARGS``; wait for its ``ready`` line; return it and the rest of that line."""
        log = open(self.directory / f"{args[0]}-{len(self.started)}.log", "ab")  # noqa: SIM115 - the child's
        proc = subprocess.Popen([sys.executable, PROC, *args], stdout=subprocess.PIPE, stderr=log)
        log.close()
        self.started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            proc.kill()
            proc.communicate()
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in self.directory.glob("*.log"))
            raise AssertionError(f"proc.py {args[0]} did not start: {line!r}\n{logs}")
        return proc, line.removeprefix("ready").strip()

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None and not proc.stdout.closed:
                proc.stdout.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    running = Procs(tmp_path)
    yield running
    running.close()


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("text", "") for e in events if e.get("type") == "delta")


async def _read_until(peer: Any, stream: str, count: int) -> list[dict[str, Any]]:
    """Events of *stream* until *count* deltas were read (or its terminal)."""
    out: list[dict[str, Any]] = []
    while sum(e["type"] == "delta" for e in out) < count:
        msg = await peer.frame()
        assert "op" not in msg, msg
        if msg["stream"] != stream:
            continue
        out.append(msg)
        if msg["type"] in ("end", "error", "abort"):
            break
    return out


async def test_a_client_resumes_on_a_fresh_edge_and_on_a_restarted_one(
    redis_url: str, key: str, procs: Procs, sync_redis: redis.Redis
) -> None:
    deltas = 150
    tag = uuid.uuid4().hex[:8]
    spawn = anyio.to_thread.run_sync
    edge_b, url_b = await spawn(procs.spawn, "edge", redis_url, key)
    seen: list[dict[str, Any]] = []
    async with testing.connect(url_b) as peer:
        subscribed = await peer.subscribe(id=1, meta={"tag": tag})
        assert subscribed["streams"] == []
        await spawn(procs.spawn, "paced", redis_url, key, "per_stream", "1", str(deltas), "0.02", tag)
        start = await peer.frame()
        assert start["type"] == "start" and start["seq"] == 0, start
        stream = start["stream"]
        seen = [start, *await _read_until(peer, stream, 30)]
        # Edge B dies under the client: no close frame, no goodbye.
        await spawn(procs.kill, edge_b)
    last = seen[-1]["seq"]
    assert [e["seq"] for e in seen] == list(range(last + 1))

    # Edge C is a process that never saw the stream: it answers from Redis.
    _, url_c = await spawn(procs.spawn, "edge", redis_url, key)
    async with testing.connect(url_c) as peer:
        subscribed = await peer.subscribe(id=1, streams=[stream], since={stream: last})
        assert subscribed["recovering"] and subscribed["recovered"], subscribed
        assert subscribed["replayed"] >= 1, subscribed
        more = await _read_until(peer, stream, 60)
    assert more[0]["seq"] == last + 1, (last, more[0])
    seen += more
    last = seen[-1]["seq"]
    assert seen[-1]["type"] == "delta", "the stream should still be live for the second resume"

    # Edge B restarted: a new process again, its memory empty.
    _, url_b2 = await spawn(procs.spawn, "edge", redis_url, key)
    async with testing.connect(url_b2) as peer:
        subscribed = await peer.subscribe(id=1, streams=[stream], since={stream: last})
        assert subscribed["recovering"] and subscribed["recovered"], subscribed
        rest = await peer.events_until_end(stream)
    seen += rest
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(len(seen))), f"gap or duplicate: {seqs}"
    assert seen[-1]["type"] == "end"
    assert _text(seen) == "".join(f"0.{j} " for j in range(deltas))


async def test_history_gone_is_answered_not_recovered(redis_url: str, key: str, procs: Procs) -> None:
    """A stream whose key expired, or lost its beginning, is all or nothing: recovered false, no replay."""
    tag = uuid.uuid4().hex[:8]
    spawn = anyio.to_thread.run_sync
    async with Bus() as worker:
        sink = RedisSink(url=redis_url, stream=key, layout="per_stream", batch_max_ms=0)
        worker.add_sink(sink)
        async with worker.stream(model="m", meta={"tag": tag}) as w:
            for j in range(5):
                await w.delta(f"{j} ")
        gone = w.stream
        async with worker.stream(model="m", meta={"tag": tag}) as w:
            for j in range(5):
                await w.delta(f"{j} ")
        holed = w.stream
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(f"{key}:s:{gone}")
        first = client.xrange(f"{key}:s:{holed}", count=1)
        client.xdel(f"{key}:s:{holed}", first[0][0])  # its start
    finally:
        client.close()
    _, url = await spawn(procs.spawn, "edge", redis_url, key)
    async with testing.connect(url) as peer:
        for stream in (gone, holed):
            subscribed = await peer.subscribe(id=stream, streams=[stream], since={stream: 2})
            assert subscribed["recovering"] and not subscribed["recovered"], subscribed
            assert subscribed["unrecovered"] == [stream] and subscribed["replayed"] == 0, subscribed


async def test_since_naming_unknown_or_too_many_streams_replays_nothing_and_follows_nothing(
    redis_url: str, key: str
) -> None:
    """Bad input: stream ids Redis never held are "not recovered" (nothing followed); past the limit, an error."""
    async with Bus() as edge:
        sink = websocket.WebSocketSink(port=0, max_subscribe_streams=20)
        edge.add_sink(sink, name="websocket")
        source = RedisSource(url=redis_url, stream=key, layout="per_stream", start="$", position="none", block_ms=200)
        edge.start_producer(source)
        with anyio.fail_after(10):
            await sink.wait_ready()
            await source.wait_ready()
        bogus = {f"no-such-{i}": 3 for i in range(20)} | {"a b*?:{}": 1}
        async with testing.connect(sink.url) as peer:
            subscribed = await peer.subscribe(id=1, since=dict(list(bogus.items())[:20]))
            assert subscribed["recovering"] and not subscribed["recovered"]
            assert sorted(subscribed["unrecovered"]) == sorted(list(bogus)[:20]) and subscribed["replayed"] == 0
            await peer.send({"op": "subscribe", "id": 2, "since": bogus})
            refused = await peer.expect("error")
            assert refused["field"] == "since" and "at most 20" in refused["message"], refused
            pong = await peer.send({"op": "ping", "id": 3})
            assert pong is None and (await peer.expect("pong"))["id"] == 3  # still served
        source.stop()
    assert source.followed == {} and len(sink.history) == 0


@pytest.mark.parametrize("linger", [0, 20])
async def test_an_edge_reads_only_the_streams_its_clients_follow(redis_url: str, key: str, linger: int) -> None:
    """Interest routing: of 20 live streams the edge reads the one a client follows, plus the index.

    With ``read_linger_ms`` Redis times the wait before each read (sent with the read), and a follow ends it.
    """
    async with Bus() as edge, Bus() as worker:
        sink = websocket.WebSocketSink(port=0)
        edge.add_sink(sink, name="websocket")
        source = RedisSource(
            url=redis_url,
            stream=key,
            layout="per_stream",
            start="$",
            position="none",
            block_ms=200,
            read_linger_ms=linger,
        )
        edge.start_producer(source)
        with anyio.fail_after(10):
            await sink.wait_ready()
            await source.wait_ready()
        worker.add_sink(RedisSink(url=redis_url, stream=key, layout="per_stream", batch_max_ms=0))
        async with testing.connect(sink.url) as peer:
            await peer.subscribe(id=1, meta={"i": 7})
            async with anyio.create_task_group() as tg:

                async def one(i: int) -> None:
                    async with worker.stream(model="m", meta={"i": i}) as w:
                        for j in range(10):
                            await w.delta(f"{i}.{j} ")
                            await anyio.sleep(0.01)

                for i in range(20):
                    tg.start_soon(one, i)
                events = await peer.events_until_end()
            assert _text(events) == "".join(f"7.{j} " for j in range(10))
            assert events[0]["meta"] == {"i": 7}
        source.stop()
    # Every start came through the index, only one stream's deltas through its key.
    assert source.delivered == 12, source.delivered  # start, 10 deltas, end of stream 7
    assert source.followed == {}, "following ends with the stream"


async def test_an_idle_redis_s_late_lingers_are_ended_by_the_edge(private_redis: Callable[..., Any], key: str) -> None:
    """A Redis with no other traffic ends a blocking wait only on its ``hz`` timer (1 s here): the edge does.

    Every token comes, in order, and the source counts the waits it had to end (Redis would have ended them
    up to a second late; the edge ends one at twice ``read_linger_ms``, then lingers locally for a while).
    """
    server = private_redis("--hz", "1")
    async with Bus() as edge, Bus() as worker:
        sink = websocket.WebSocketSink(port=0)
        edge.add_sink(sink, name="websocket")
        source = RedisSource(
            url=server.url, stream=key, layout="per_stream", start="$", position="none", read_linger_ms=20
        )
        edge.start_producer(source)
        with anyio.fail_after(10):
            await sink.wait_ready()
            await source.wait_ready()
        worker.add_sink(RedisSink(url=server.url, stream=key, layout="per_stream", batch_max_ms=0))
        async with testing.connect(sink.url) as peer:
            await peer.subscribe(id=1, meta={"user": "a"})
            async with worker.stream(model="m", meta={"user": "a"}) as w:
                for j in range(40):
                    await w.delta(f"{j} ")
                    await anyio.sleep(0.06)  # Redis idle between two tokens
            with anyio.fail_after(20):
                events = await peer.events_until_end()
        source.stop()
    assert _text(events) == "".join(f"{j} " for j in range(40))
    assert source.linger_overruns > 0


@pytest.mark.parametrize("layout", ["per_stream", "single"])
async def test_a_killed_producer_s_streams_end_with_producer_lost(
    redis_url: str, key: str, procs: Procs, make_collector: Callable[[], Any], layout: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    got = make_collector()
    source = RedisSource(
        url=redis_url, stream=key, layout=layout, start="$", position="none", block_ms=200, **_follow_all(layout)
    )
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        producer, _ = await anyio.to_thread.run_sync(
            procs.spawn, "paced", redis_url, key, layout, "2", "100000", "0.01", tag
        )
        await got.wait_for(lambda evs: sum(type(e) is DeltaEvent for e in evs) >= 20)
        await anyio.to_thread.run_sync(procs.kill, producer)
        # The sender's heartbeat key lives 1 s: within a few seconds both streams end, not silence.
        await got.wait_terminals(2, seconds=15)
        source.stop()
    per: dict[str, list[Any]] = {}
    for event in got.events:
        per.setdefault(event.stream, []).append(event)
    assert len(per) == 2
    for stream, events in per.items():
        start = events[0]
        assert type(start) is StartEvent
        assert [e.seq for e in events] == list(range(len(events))), stream
        # Nothing lost or doubled before the error: exactly the pieces produced, in order.
        deltas = [e for e in events if type(e) is DeltaEvent]
        i = start.meta["i"]
        assert "".join(d.text for d in deltas) == "".join(f"{i}.{j} " for j in range(len(deltas)))
        end = events[-1]
        assert type(end) is ErrorEvent and end.kind == "producer_lost" and end.retryable, end
        assert "no heartbeat for 1000 ms" in end.message
    assert len(source.lost_producers) == 1


@pytest.mark.parametrize("layout", ["per_stream", "single"])
async def test_a_lagging_consumer_reads_a_finished_producer_s_ends_instead_of_declaring_it_lost(
    redis_url: str, key: str, layout: str
) -> None:
    """The sender exited cleanly (its heartbeat key is gone) before a slow consumer read its streams' ends."""
    async with Bus() as worker:
        sink = RedisSink(url=redis_url, stream=key, layout=layout, entry_max_events=1, producer_timeout_ms=200)
        worker.add_sink(sink)
        async with worker.stream(model="m") as w:
            for j in range(40):
                await w.delta(f"{j} ")
    ended = anyio.Event()
    got: list[Any] = []

    class Slow:
        overflow = "block"
        buffer = 1

        async def run(self, events: Any) -> None:
            async for event in events:
                got.append(event)
                await anyio.sleep(0.02)  # 42 events: about 0.8 s, four heartbeat timeouts
                if event.seq == 41 or type(event) is ErrorEvent:
                    ended.set()

    source = RedisSource(
        url=redis_url,
        stream=key,
        layout=layout,
        start="0",
        position="none",
        count=1,
        block_ms=50,
        **_follow_all(layout),
    )
    async with Bus() as edge:
        edge.add_sink(Slow())
        edge.start_producer(source)
        if layout == "per_stream":
            await source.wait_ready()
            source.follow(w.stream)  # started before this source: follow it by name, as an edge asked to resume
        with anyio.fail_after(20):
            await ended.wait()
        source.stop()
    assert type(got[-1]) is EndEvent, got[-1]
    assert [e.seq for e in got] == list(range(42))
    assert source.lost_producers == []


async def test_an_http_edge_answers_last_event_id_from_redis(redis_url: str, key: str) -> None:
    """The http sink on an edge that never saw the streams: an ended one and a live one resume by Last-Event-ID."""
    http = pytest.importorskip("streambus_http", reason="streambus-http is in this plugin's [test] extra")
    import aiohttp

    async def sse(session: aiohttp.ClientSession, url: str, last_event_id: str) -> list[dict[str, Any]]:
        out = []
        async with session.get(url, headers={"Last-Event-ID": last_event_id}) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data: "):
                    out.append(msgspec_json(line[6:]))
                    if out[-1]["type"] in ("end", "error", "abort"):
                        return out
        return out

    async with Bus() as worker, Bus() as edge:
        worker.add_sink(RedisSink(url=redis_url, stream=key, layout="per_stream", batch_max_ms=0))
        async with worker.stream(model="m") as w:
            for j in range(6):
                await w.delta(f"{j} ")
        ended = w.stream
        sink = http.HttpSink(port=0, unknown_stream_timeout=1.0)
        edge.add_sink(sink)
        source = RedisSource(url=redis_url, stream=key, layout="per_stream", start="$", position="none", block_ms=200)
        edge.start_producer(source)
        with anyio.fail_after(10):
            base = await sink.started()
            await source.wait_ready()
        async with aiohttp.ClientSession() as session:
            events = await sse(session, f"{base}/streams/{ended}/sse", f"{ended}:3")
            assert [e["seq"] for e in events] == [4, 5, 6, 7]
            assert _text(events) == "3 4 5 "
            got: list[dict[str, Any]] = []
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    async with worker.stream(model="m") as w:
                        await w.delta("a ")
                        await w.delta("b ")
                        live = w.stream

                        async def read() -> None:
                            got.extend(await sse(session, f"{base}/streams/{live}/sse", f"{live}:1"))

                        tg.start_soon(read)
                        while not sink.hub.known(live):  # noqa: ASYNC110 - fetched by the request, in another task
                            await anyio.sleep(0.01)
                        await w.delta("c ")
            assert [e["seq"] for e in got] == [2, 3, 4], got
            assert _text(got) == "b c "
            async with session.get(f"{base}/streams/no-such-stream/sse") as response:
                assert response.status == 404
        source.stop()
    assert source.followed == {}


def msgspec_json(data: bytes) -> dict[str, Any]:
    import msgspec

    decoded: dict[str, Any] = msgspec.json.decode(data)
    return decoded


def _follow_all(layout: str) -> dict[str, str]:
    return {"follow": "all"} if layout == "per_stream" else {}


async def _sse_until_end(response: Any, stream: str | None = None) -> list[dict[str, Any]]:
    """The SSE events of *response* (of *stream* when given) up to that stream's terminal."""
    out: list[dict[str, Any]] = []
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        event = msgspec_json(line[6:])
        if stream is not None and event.get("stream") != stream:
            continue
        out.append(event)
        if event.get("type") in ("end", "error", "abort"):
            break
    return out


async def test_http_filter_routes_on_an_edge_read_only_what_they_follow(redis_url: str, key: str) -> None:
    """The http sink is the edge's interest too: a filter route makes the edge read what it matches, only that.

    ``/events/sse?meta.user=u7`` is open before 20 streams start: it gets
    stream u7 whole. ``/events/sse?model=late`` opens while its stream is
    already live (the edge did not read it): the stream is followed from its
    start and comes whole too. No other stream's events are read.
    """
    http = pytest.importorskip("streambus_http", reason="streambus-http is in this plugin's [test] extra")
    import aiohttp

    async with Bus() as worker, Bus() as edge:
        worker.add_sink(RedisSink(url=redis_url, stream=key, layout="per_stream", batch_max_ms=0))
        sink = http.HttpSink(port=0)
        edge.add_sink(sink)
        source = RedisSource(url=redis_url, stream=key, layout="per_stream", start="$", position="none", block_ms=200)
        edge.start_producer(source)
        with anyio.fail_after(10):
            base = await sink.started()
            await source.wait_ready()
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
            by_meta: list[dict[str, Any]] = []
            late: list[dict[str, Any]] = []

            async def read(url: str, out: list[dict[str, Any]]) -> None:
                async with session.get(url) as response:
                    assert response.status == 200, await response.text()
                    out.extend(await _sse_until_end(response))

            with anyio.fail_after(30):
                tg.start_soon(read, f"{base}/events/sse?meta.user=u7", by_meta)
                while sink.hub.readers < 1:  # noqa: ASYNC110 - the request is served in another task
                    await anyio.sleep(0.01)

                async def one(i: int) -> None:
                    async with worker.stream(model="m", meta={"user": f"u{i}"}) as w:
                        for j in range(10):
                            await w.delta(f"{i}.{j} ")
                            await anyio.sleep(0.01)

                async with anyio.create_task_group() as producers:
                    for i in range(20):
                        producers.start_soon(one, i)
                async with worker.stream(model="late") as w:
                    await w.delta("a ")
                    await w.delta("b ")
                    while not any(s.stream == w.stream for s in source.live_starts()):  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    assert not sink.hub.known(w.stream), "nobody follows it yet: the edge does not read it"
                    tg.start_soon(read, f"{base}/events/sse?model=late", late)
                    while not sink.hub.known(w.stream):  # noqa: ASYNC110 - its request made the edge read it
                        await anyio.sleep(0.01)
                    await w.delta("c ")
                while len(late) < 5 or len(by_meta) < 12:  # noqa: ASYNC110 - read in other tasks
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        source.stop()
    assert _text(by_meta) == "".join(f"7.{j} " for j in range(10)), by_meta
    assert {e["stream"] for e in by_meta} == {by_meta[0]["stream"]} and by_meta[0]["meta"] == {"user": "u7"}
    assert [e["type"] for e in late] == ["start", "delta", "delta", "delta", "end"] and _text(late) == "a b c "
    # Only the two followed streams came through their keys: start, deltas and end of each.
    assert source.delivered == 12 + 5, source.delivered
