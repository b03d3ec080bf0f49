"""Issue 26 on NATS: resume on any edge, interest routing, all-or-nothing history, with a real nats-server.

The producer (``proc.py paced``) writes through a NatsSink with ``index =
true``; each edge (``proc.py edge``) is a NatsSource with ``follow =
"interested"`` feeding a WebSocketSink. A client reading on edge B loses B
(``SIGKILL``) mid-stream and resumes on edge C, a process started only then;
later it drops again and resumes on B restarted. The text it ends with must be
exactly what was produced: no gap, no duplicate.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import nats
import pytest
from streambus_nats import NatsSink, NatsSource

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, StartEvent

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

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


@pytest.fixture
def server(nats_server: Callable[..., NatsServer]) -> NatsServer:
    return nats_server()


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


async def test_a_client_resumes_on_a_fresh_edge_and_on_a_restarted_one(server: NatsServer, procs: Procs) -> None:
    deltas = 150
    tag = uuid.uuid4().hex[:8]
    spawn = anyio.to_thread.run_sync
    edge_b, url_b = await spawn(procs.spawn, "edge", server.url)
    seen: list[dict[str, Any]] = []
    async with testing.connect(url_b) as peer:
        subscribed = await peer.subscribe(id=1, meta={"tag": tag})
        assert subscribed["streams"] == []
        await spawn(procs.spawn, "paced", server.url, "1", str(deltas), "0.02", tag)
        start = await peer.frame()
        assert start["type"] == "start" and start["seq"] == 0, start
        stream = start["stream"]
        seen = [start, *await _read_until(peer, stream, 30)]
        # Edge B dies under the client: no close frame, no goodbye.
        await spawn(procs.kill, edge_b)
    last = seen[-1]["seq"]
    assert [e["seq"] for e in seen] == list(range(last + 1))

    # Edge C is a process that never saw the stream: it answers from JetStream.
    _, url_c = await spawn(procs.spawn, "edge", server.url)
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
    _, url_b2 = await spawn(procs.spawn, "edge", server.url)
    async with testing.connect(url_b2) as peer:
        subscribed = await peer.subscribe(id=1, streams=[stream], since={stream: last})
        assert subscribed["recovering"] and subscribed["recovered"], subscribed
        rest = await peer.events_until_end(stream)
    seen += rest
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(len(seen))), f"gap or duplicate: {seqs}"
    assert seen[-1]["type"] == "end"
    assert _text(seen) == "".join(f"0.{j} " for j in range(deltas))


async def test_history_gone_is_answered_not_recovered(server: NatsServer, procs: Procs) -> None:
    """A stream purged from JetStream, or missing its beginning, is all or nothing: recovered false, no replay."""
    tag = uuid.uuid4().hex[:8]
    spawn = anyio.to_thread.run_sync
    async with Bus() as worker:
        sink = NatsSink(url=server.url, batch_max_ms=0, index=True, message_max_events=1)
        worker.add_sink(sink)
        await sink.wait_ready()
        streams = []
        for _ in range(2):
            async with worker.stream(model="m", meta={"tag": tag}) as w:
                for j in range(5):
                    await w.delta(f"{j} ")
            streams.append(w.stream)
    gone, holed = streams
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        await js.purge_stream("STREAMBUS", subject=f"streambus.ev.{gone}")  # expired / lost with the server
        sub = await js.subscribe(f"streambus.ev.{holed}", ordered_consumer=True)
        first = await sub.next_msg(timeout=5)
        await sub.unsubscribe()
        await js.delete_msg("STREAMBUS", first.metadata.sequence.stream)  # retention took its start
    finally:
        await client.close()
    _, url = await spawn(procs.spawn, "edge", server.url)
    async with testing.connect(url) as peer:
        for stream in (gone, holed, "never-written"):
            subscribed = await peer.subscribe(id=stream, streams=[stream], since={stream: 2})
            assert subscribed["recovering"] and not subscribed["recovered"], subscribed
            assert subscribed["unrecovered"] == [stream] and subscribed["replayed"] == 0, subscribed


async def test_an_expired_stream_is_not_recovered(server: NatsServer) -> None:
    """Retention by age removed the stream: the archive answers None, never part of it."""
    async with Bus() as worker, Bus() as edge:
        sink = NatsSink(url=server.url, batch_max_ms=0, index=True, max_age_s=1, duplicate_window_s=1)
        worker.add_sink(sink)
        await sink.wait_ready()
        source = NatsSource(url=server.url, follow="interested", start="$")
        edge.start_producer(source)
        with anyio.fail_after(10):
            await source.wait_ready()
        async with worker.stream(model="m") as w:
            await w.delta("x")
        # The sink sends in the background: wait until JetStream holds the whole stream.
        with anyio.fail_after(10):
            while (fetched := await source.fetch(w.stream)) is None or len(fetched) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert [type(e) for e in fetched] == [StartEvent, DeltaEvent, EndEvent]
        with anyio.fail_after(10):
            while await source.fetch(w.stream) is not None:  # noqa: ASYNC110 - polls the server, no event
                await anyio.sleep(0.25)
        source.stop()


@pytest.mark.parametrize("linger", [0, 20, 40])
async def test_an_edge_reads_only_the_streams_its_clients_follow(server: NatsServer, linger: int) -> None:
    """Interest routing: of 20 live streams the edge reads the one a client follows, plus the index.

    With a linger, held tokens go out when it passed or, sooner, when a token arrives after half of it
    (40 ms: the 10 ms tokens take both ways); either way the client gets them all, in order.
    """
    async with Bus() as edge, Bus() as worker:
        sink = websocket.WebSocketSink(port=0)
        edge.add_sink(sink, name="websocket")
        source = NatsSource(url=server.url, follow="interested", start="$", deliver_linger_ms=linger)
        edge.start_producer(source)
        nsink = NatsSink(url=server.url, batch_max_ms=0, index=True)
        worker.add_sink(nsink)
        with anyio.fail_after(10):
            await nsink.wait_ready()
            await sink.wait_ready()
            await source.wait_ready()
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
        with anyio.fail_after(10):
            while source.followed:  # noqa: ASYNC110 - ends on a message from the server
                await anyio.sleep(0.05)
        assert len(source.live_starts()) == 0, "every stream ended: the index shows none live"
        source.stop()
    # Only one stream's events came through a followed subject.
    assert source.delivered == 12, source.delivered  # start, 10 deltas, end of stream 7


def test_bad_edge_options_are_refused_naming_the_key(tmp_path: Path) -> None:
    """Bad config: an edge keeps no position; a linger is bounded; the errors name the key."""
    with pytest.raises(ValueError, match="follow"):
        NatsSource(follow="interested", position_file=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="follow"):
        NatsSource(follow="interested", seed_recording=str(tmp_path / "r.jsonl"))
    with pytest.raises(ValueError, match="deliver_linger_ms"):
        NatsSource(follow="interested", deliver_linger_ms=5000)
    with pytest.raises(ValueError, match="follow"):
        NatsSource(follow="some")


class _WantsAll:
    """An Interest following every stream (stands in for a client whose filter matches all)."""

    def wants(self, start: StartEvent) -> bool:
        return True


async def test_an_interest_edge_ends_a_killed_producer_s_stream_with_producer_lost(
    server: NatsServer, procs: Procs, make_collector: Callable[[], Collector]
) -> None:
    """The producer process is killed mid-stream: the followed stream ends with producer_lost, not silence."""
    from streambus.archive import add_interest

    tag = uuid.uuid4().hex[:8]
    got = make_collector()
    async with Bus() as edge:
        add_interest(edge, _WantsAll())
        edge.add_sink(got)
        source = NatsSource(url=server.url, follow="interested", producer_timeout_ms=1000)
        edge.start_producer(source)
        with anyio.fail_after(10):
            await source.wait_ready()
        producer, _ = await anyio.to_thread.run_sync(procs.spawn, "paced", server.url, "1", "1000", "0.02", tag)
        await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) for e in evs) >= 10)
        await anyio.to_thread.run_sync(procs.kill, producer)
        await got.wait_terminals(1, seconds=15)
        with anyio.fail_after(10):
            while source.followed:  # noqa: ASYNC110 - emptied by the source's own follow loop
                await anyio.sleep(0.05)
        source.stop()
    errors = [e for e in got.events if isinstance(e, ErrorEvent)]
    assert [e.kind for e in errors] == ["producer_lost"], got.events[-3:]
    seqs = [e.seq for e in got.events]
    assert seqs == list(range(len(seqs))), "no gap, no duplicate before the error"
    assert source.producers_lost == 1


async def test_an_interest_edge_loses_nothing_across_a_server_restart(
    server: NatsServer, make_collector: Callable[[], Collector]
) -> None:
    """nats-server restarts (storage kept) mid-stream: the followed stream arrives whole, once, in order."""
    from streambus.archive import add_interest

    got = make_collector()
    deltas = 60
    async with Bus() as edge, Bus() as worker:
        add_interest(edge, _WantsAll())
        edge.add_sink(got)
        source = NatsSource(url=server.url, follow="interested", reconnect_wait_s=0.05, heartbeat_ms=200)
        edge.start_producer(source)
        sink = NatsSink(url=server.url, batch_max_ms=0, index=True, reconnect_wait_s=0.05)
        worker.add_sink(sink)
        with anyio.fail_after(10):
            await sink.wait_ready()
            await source.wait_ready()
        async with worker.stream(model="m") as w:
            for j in range(deltas):
                await w.delta(f"{j} ")
                if j == 20:
                    await anyio.to_thread.run_sync(server.stop)
                    await anyio.sleep(1.0)
                    await anyio.to_thread.run_sync(server.start)
                await anyio.sleep(0.02)
        await got.wait_terminals(1, seconds=30)
        source.stop()
    events = [e for e in got.events if e.stream == w.stream]
    assert [e.seq for e in events] == list(range(deltas + 2)), "no gap, no duplicate"
    assert isinstance(events[-1], EndEvent)
    assert "".join(e.text for e in events if isinstance(e, DeltaEvent)) == "".join(f"{j} " for j in range(deltas))


async def test_http_filter_routes_on_an_edge_read_only_what_they_follow(server: NatsServer) -> None:
    """The http sink is the edge's interest too: a filter route makes the edge read what it matches, only that.

    ``/events/sse?meta.user=u7`` is open before 20 streams start: it gets
    stream u7 whole. ``/events/sse?model=late`` opens while its stream is
    already live (the edge did not read it): the stream is followed from its
    start and comes whole too. No other stream's events are read.
    """
    http = pytest.importorskip("streambus_http", reason="streambus-http is in this plugin's [test] extra")
    import aiohttp
    import msgspec

    async def sse_until_end(response: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for line in response.content:
            if line.startswith(b"data: "):
                out.append(msgspec.json.decode(line[6:]))
                if out[-1].get("type") in ("end", "error", "abort"):
                    break
        return out

    async with Bus() as worker, Bus() as edge:
        nsink = NatsSink(url=server.url, batch_max_ms=0, index=True)
        worker.add_sink(nsink)
        sink = http.HttpSink(port=0)
        edge.add_sink(sink)
        source = NatsSource(url=server.url, follow="interested", start="$")
        edge.start_producer(source)
        with anyio.fail_after(10):
            await nsink.wait_ready()
            base = await sink.started()
            await source.wait_ready()
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
            by_meta: list[dict[str, Any]] = []
            late: list[dict[str, Any]] = []

            async def read(url: str, out: list[dict[str, Any]]) -> None:
                async with session.get(url) as response:
                    assert response.status == 200, await response.text()
                    out.extend(await sse_until_end(response))

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
    # Only the two followed streams came through their subjects: start, deltas and end of each.
    assert source.delivered == 12 + 5, source.delivered
