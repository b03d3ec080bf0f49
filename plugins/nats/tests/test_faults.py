"""Faults against a private nats-server: restarts mid-stream, a killed producer process, a killed edge.

Every test counts, per stream, the characters the consumer lacks without an
``error`` event saying so (*lost*) and the characters it got twice
(*duplicated*): both must be zero within retention. The sleeps here *are* the
faults' timing (how long the server is down, how fast a producer writes);
nothing is asserted about how long anything took.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from streambus_nats import NatsSink, NatsSource

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, is_terminal
from streambus.recording import read_recording

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

# Under `make test` (pytest-xdist, --dist loadgroup) the tests that take servers down run on one
# worker, one at a time: two outages at once on two cores stretch each other's timing.
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("outages")]

PROC = str(Path(__file__).with_name("proc.py"))
PACE = 0.05  # seconds between two deltas of one stream


async def paced(bus: Bus, produced: dict[str, str], i: int, deltas: int, started: anyio.Event | None = None) -> None:
    """One stream of *deltas* deltas, one every PACE seconds; its text is kept in *produced*."""
    async with bus.stream(model="m", meta={"i": i}) as w:
        produced[w.stream] = ""
        for j in range(deltas):
            text = f"{i}.{j} "
            await w.delta(text)
            produced[w.stream] += text
            if started is not None and j == 2:
                started.set()
            await anyio.sleep(PACE)


@pytest.mark.parametrize("outage", [1.0, 15.0], ids=["short-outage", "15s-outage"])
async def test_server_restart_mid_stream_loses_and_doubles_nothing(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    outage: float,
) -> None:
    """The server is stopped mid-stream and started again with its storage: every stream arrives whole, once.

    Streams span the outage, start during it (their producers block in the
    sink's lossless subscription) and start after it.
    """
    server = nats_server()
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none", heartbeat_ms=200)
    sink = NatsSink(url=server.url, batch_max_ms=1)
    produced: dict[str, str] = {}
    async with Bus() as edge, Bus() as worker:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        worker.add_sink(sink)
        await sink.wait_ready()
        async with anyio.create_task_group() as tg:
            spanning = [anyio.Event() for _ in range(3)]
            for i, ev in enumerate(spanning):
                tg.start_soon(paced, worker, produced, i, 40, ev)
            for ev in spanning:
                await ev.wait()
            await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) for e in evs) >= 6)
            server.stop()
            for i in range(3, 5):  # start while the server is down
                tg.start_soon(paced, worker, produced, i, 10)
            await anyio.sleep(outage)
            server.start()
            for i in range(5, 7):  # start after it is back
                tg.start_soon(paced, worker, produced, i, 10)
        await got.wait_terminals(7, seconds=30)
        source.stop()
    exactly_once(got.events)
    counts = count_chars(produced, got.events)
    assert {s: c for s, c in counts.items() if c != {"lost": 0, "duplicated": 0, "terminals": 1}} == {}
    assert all(isinstance(e, EndEvent) for e in got.events if is_terminal(e))  # the data was kept: no error at all
    assert source.gaps == []
    assert source.reconnects >= 1


async def test_server_losing_its_storage_is_reported_never_a_silent_hole(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """The server comes back *without* its data: no stream has a hole; those that lost events end in nats_gap."""
    server = nats_server()
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none", heartbeat_ms=200, gap_grace_ms=500)
    sink = NatsSink(url=server.url, batch_max_ms=1)
    produced: dict[str, str] = {}
    async with Bus() as edge, Bus() as worker:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        worker.add_sink(sink)
        await sink.wait_ready()
        async with anyio.create_task_group() as tg:
            spanning = [anyio.Event() for _ in range(3)]
            for i, ev in enumerate(spanning):
                tg.start_soon(paced, worker, produced, i, 40, ev)
            for ev in spanning:
                await ev.wait()
            await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) for e in evs) >= 6)
            server.stop()
            server.wipe()
            await anyio.sleep(1.0)
            server.start()
            for i in range(3, 5):
                tg.start_soon(paced, worker, produced, i, 10)
        await got.wait_terminals(5, seconds=30)
        source.stop()
    exactly_once(got.events)
    counts = count_chars(produced, got.events)
    assert {s: c for s, c in counts.items() if c["lost"] or c["duplicated"] or c["terminals"] != 1} == {}
    later = [s for s, text in produced.items() if text.startswith(("3.", "4."))]
    for e in got.events:
        if isinstance(e, ErrorEvent):
            assert e.kind == "nats_gap" and e.stream not in later
    # Streams that started after the loss arrive whole.
    assert all(counts[s]["lost"] == 0 for s in later)
    # The sink re-sent what it held, so the loss may be invisible (every stream whole) or reported; never silent.
    assert source.gaps or all(isinstance(e, EndEvent) for e in got.events if is_terminal(e))


async def test_killed_producer_process_ends_its_streams_with_producer_lost(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """A producer killed with SIGKILL: its open streams end with one producer_lost error after the timeout.

    A slow producer that is alive (silent between deltas for longer than the
    timeout, heartbeats still flowing) is not declared lost.
    """
    server = nats_server()
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none", producer_timeout_ms=1500, heartbeat_ms=200)
    proc = None
    async with Bus() as edge, Bus() as worker:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        worker.add_sink(NatsSink(url=server.url, heartbeat_ms=200))
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read line by line below
            [sys.executable, PROC, "produce", server.url, "3", "1000", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            killed = {}
            for _ in range(3):
                _, stream, i = proc.stdout.readline().decode().split()
                killed[stream] = int(i)
            async with worker.stream(model="slow") as slow:
                await slow.delta("alive ")
                await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) and e.stream in killed for e in evs) >= 15)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                await got.wait_terminals(3, seconds=15)
                await anyio.sleep(2.5)  # silent for longer than the timeout; its sink's heartbeats go on
                await slow.delta("still here")
            await got.wait_terminals(4, seconds=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        source.stop()
    exactly_once(got.events)
    for stream, i in killed.items():
        events = [e for e in got.events if e.stream == stream]
        terminal = events[-1]
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "producer_lost", terminal
        assert "producer_timeout_ms = 1500" in terminal.message
        text = "".join(e.text for e in events if isinstance(e, DeltaEvent))
        n = text.count(" ")
        assert text == "".join(f"{i}.{j} " for j in range(n))  # no hole before the end
        assert sum(map(is_terminal, events)) == 1
    slow_events = [e for e in got.events if e.stream == slow.stream]
    assert isinstance(slow_events[-1], EndEvent)
    assert "".join(e.text for e in slow_events if isinstance(e, DeltaEvent)) == "alive still here"
    assert source.producers_lost == 3


async def test_killed_edge_resumes_without_loss_or_duplicate(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """An edge (consumer process with a recorder) killed with SIGKILL mid-stream and restarted records every
    stream exactly once: its position and de-duplication state live beside its recording."""
    server = nats_server()
    out = tmp_path / "rec.jsonl"
    log = open(tmp_path / "edge.log", "ab")  # noqa: SIM115, ASYNC230 - handed to the children

    def spawn(expect: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, PROC, "consume", server.url, str(out), str(expect)], stdout=subprocess.PIPE, stderr=log
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        return proc

    produced: dict[str, str] = {}
    edge = await anyio.to_thread.run_sync(spawn, 6)
    try:
        async with Bus() as worker:
            sink = NatsSink(url=server.url, batch_max_ms=1)
            worker.add_sink(sink)
            await sink.wait_ready()
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(paced, worker, produced, i, 30)
                while out.stat().st_size < 2000 if out.exists() else True:  # noqa: ASYNC110 - another process's file
                    await anyio.sleep(0.05)
                edge.send_signal(signal.SIGKILL)
                edge.communicate()
                finished = sum(map(is_terminal, read_recording(out, lenient=True).events))
                assert finished < 6, "the edge must be killed mid-stream"
                await anyio.sleep(0.3)
                edge = await anyio.to_thread.run_sync(spawn, 6)
        await anyio.to_thread.run_sync(lambda: edge.wait(30))
    finally:
        if edge.poll() is None:
            edge.kill()
        edge.communicate()
        log.close()
    recorded = read_recording(out).events
    exactly_once(recorded)
    counts = count_chars(produced, recorded)
    assert {s: c for s, c in counts.items() if c != {"lost": 0, "duplicated": 0, "terminals": 1}} == {}
    assert all(isinstance(e, EndEvent) for e in recorded if is_terminal(e))


async def test_edge_and_worker_started_before_the_server_connect_when_it_comes(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """Neither side needs NATS up when it starts: both keep trying (nats-py's reconnect loop) and nothing
    published meanwhile is lost."""
    server = nats_server()
    server.stop()  # its port is known; nothing listens there yet
    got = make_collector()
    source = NatsSource(url=server.url, start="0", position="none", heartbeat_ms=200)
    sink = NatsSink(url=server.url, batch_max_ms=1)
    produced: dict[str, str] = {}
    async with Bus() as edge, Bus() as worker:
        edge.add_sink(got)
        edge.start_producer(source)
        worker.add_sink(sink)
        async with anyio.create_task_group() as tg:
            tg.start_soon(paced, worker, produced, 0, 10)  # blocks in the sink's lossless subscription meanwhile
            await anyio.sleep(1.0)  # the outage at start
            server.start()
        await got.wait_terminals(1, seconds=30)
        source.stop()
    exactly_once(got.events)
    assert count_chars(produced, got.events) == {s: {"lost": 0, "duplicated": 0, "terminals": 1} for s in produced}
    assert source.gaps == []


@pytest.mark.parametrize("in_flight", [1, 16])
async def test_server_restart_with_batches_in_flight_keeps_every_stream_whole_and_in_order(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    in_flight: int,
) -> None:
    """Many fast streams, several batches unacknowledged at once, and the server restarted under them.

    The batches lost with the connection are re-sent while later batches of
    other streams land first: no stream may lose, double or reorder an event
    (the consumer would end it with a ``nats_gap`` error).
    """
    server = nats_server()
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none", heartbeat_ms=200)
    sink = NatsSink(url=server.url, batch_max_ms=0.5, batches_in_flight=in_flight)
    produced: dict[str, str] = {}

    async def fast(i: int) -> None:
        async with worker.stream(model="m") as w:
            produced[w.stream] = ""
            for j in range(150):
                text = f"{i}.{j} "
                await w.delta(text)
                produced[w.stream] += text
                await anyio.sleep(0.004)

    async with Bus() as edge, Bus() as worker:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        worker.add_sink(sink)
        await sink.wait_ready()
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(fast, i)
            await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) for e in evs) >= 300)
            server.stop()
            await anyio.sleep(0.3)
            server.start()
        await got.wait_terminals(20, seconds=30)
        source.stop()
    exactly_once(got.events)
    counts = count_chars(produced, got.events)
    assert {s: c for s, c in counts.items() if c != {"lost": 0, "duplicated": 0, "terminals": 1}} == {}
    assert all(isinstance(e, EndEvent) for e in got.events if is_terminal(e))
    assert source.gaps == []
    assert sink.sent_events >= 20 * 152
