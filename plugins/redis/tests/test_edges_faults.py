"""Issue 26's fault tests for the ``per_stream`` layout, counted where users are: at a WebSocket client.

A producer (a RedisSink in this process) writes paced streams to a
redis-server of the test's own; edges are separate processes (``proc.py
edge``: RedisSource following what its clients want, WebSocketSink); a
client in this process follows the streams by a meta tag and, whenever its
connection drops, reconnects to the next edge with ``since`` = the last seq it
holds of each stream. The faults: Redis restarted mid-stream (a 3 s and a
15 s outage, its data saved), Redis restarted *without* its data, and the
client's edge killed (``SIGKILL``). Per stream, the characters lost and the
events duplicated are counted: zero within retention; where Redis lost the
data, each stream either completes or ends in one ``error`` event, the text
before it exactly what was produced, never a silent hole. The sleeps are the
faults' timing (how long Redis is down), nothing waits on them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis
from streambus_redis import RedisSink
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from streambus import Bus

# Under `make test` (pytest-xdist, --dist loadgroup) the tests that take servers down run on one
# worker, one at a time: two outages at once on two cores stretch each other's timing.
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("outages")]

testing = pytest.importorskip("streambus_websocket.testing", reason="streambus-websocket is in the [test] extra")

PROC = str(Path(__file__).with_name("proc.py"))
PACE = 0.03


@dataclass
class Client:
    """What one user saw, across reconnections."""

    tag: str
    urls: list[str]
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    duplicates: int = 0
    reconnects: int = 0
    unrecovered: list[str] = field(default_factory=list)
    connected: anyio.Event = field(default_factory=anyio.Event)

    def last(self) -> dict[str, int]:
        return {s: evs[-1]["seq"] for s, evs in self.events.items() if evs[-1]["type"] not in _TERMINAL}

    def ended(self) -> int:
        return sum(evs[-1]["type"] in _TERMINAL for evs in self.events.values())

    async def run(self, expect: int) -> None:
        """Read until *expect* streams ended, reconnecting to ``urls[-1]`` (the newest edge) on any drop."""
        while self.ended() < expect:
            try:
                async with testing.connect(self.urls[-1]) as peer:
                    since = self.last()
                    sub = await peer.subscribe(id=1, meta={"tag": self.tag}, **({"since": since} if since else {}))
                    if since and not sub["recovered"]:
                        self.unrecovered += sub["unrecovered"] or []
                    self.connected.set()
                    while self.ended() < expect:
                        self._take(msgspec.json.decode(await peer.ws.recv()))
            except (ConnectionClosed, OSError, InvalidHandshake):
                self.reconnects += 1
                await anyio.sleep(0.1)

    def _take(self, msg: dict[str, Any]) -> None:
        if "op" in msg:
            return
        seen = self.events.setdefault(msg["stream"], [])
        if seen and msg["seq"] <= seen[-1]["seq"]:
            self.duplicates += 1
            return
        seen.append(msg)


_TERMINAL = ("end", "error", "abort")


def _spawn_edge(url: str, prefix: str, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = open(logs, "ab")  # noqa: SIM115 - the child's
    proc = subprocess.Popen([sys.executable, PROC, "edge", url, prefix], stdout=subprocess.PIPE, stderr=log)
    log.close()
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("ready "):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(f"the edge did not start: {line!r}\n{logs.read_text(errors='replace')[-3000:]}")
    return proc, line.removeprefix("ready ")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _shutdown(server: Any, save: bool) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        client.shutdown(save=save, nosave=not save)
    except redis.ConnectionError:
        pass  # the server closed the connection as it exited
    finally:
        client.close()
    assert server.proc is not None
    server.proc.wait(10)
    server.proc = None


def _count(client: Client, produced: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Characters lost in silence per stream, and every other problem."""
    lost: dict[str, int] = {}
    problems = []
    for stream, text in produced.items():
        events = client.events.get(stream, [])
        seqs = [e["seq"] for e in events]
        if seqs != list(range(len(seqs))):
            problems.append(f"{stream}: seqs {seqs} are not 0, 1, 2, ...")
        got = "".join(e.get("text", "") for e in events if e["type"] == "delta")
        end = events[-1] if events else {}
        if end.get("type") == "end" and got == text:
            continue
        if end.get("type") == "error" and text.startswith(got):
            continue  # said so: what came before the error is exactly what was produced
        lost[stream] = len(text) - len(got) if text.startswith(got) else -1
    return lost, problems


async def _scenario(private_redis: Any, tmp_path: Path, fault: str, outage: float) -> tuple[Client, dict[str, str]]:
    server = await anyio.to_thread.run_sync(lambda: private_redis(directory=tmp_path))
    prefix = f"edges:{uuid.uuid4().hex[:8]}"
    edges = [await anyio.to_thread.run_sync(_spawn_edge, server.url, prefix, tmp_path / "edge-0.log")]
    client = Client(uuid.uuid4().hex[:8], [edges[0][1]])
    produced: dict[str, str] = {}
    try:
        async with Bus() as producer, anyio.create_task_group() as tg:
            producer.add_sink(RedisSink(url=server.url, stream=prefix, layout="per_stream", batch_max_ms=1))
            tg.start_soon(client.run, 6)
            await client.connected.wait()
            halfway = anyio.Event()
            back = anyio.Event()

            async def stream(i: int, begin: anyio.Event | None, pieces: int) -> None:
                if begin is not None:
                    await begin.wait()
                async with producer.stream(model="m", meta={"tag": client.tag, "i": i}) as w:
                    for j in range(pieces):
                        produced[w.stream] = produced.get(w.stream, "") + f"{i}.{j} "
                        await w.delta(f"{i}.{j} ")
                        if j == 30:
                            halfway.set()
                        await anyio.sleep(PACE)

            async with anyio.create_task_group() as streams:
                for i in range(4):  # open across the fault
                    streams.start_soon(stream, i, None, 120)
                for i in range(4, 6):  # start once the fault is over
                    streams.start_soon(stream, i, back, 40)
                await halfway.wait()
                if fault == "kill_edge":
                    await anyio.to_thread.run_sync(_reap, edges[0][0])
                    edges.append(await anyio.to_thread.run_sync(_spawn_edge, server.url, prefix, tmp_path / "e1.log"))
                    client.urls.append(edges[-1][1])
                else:
                    await anyio.to_thread.run_sync(_shutdown, server, fault == "restart_saved")
                    await anyio.sleep(outage)
                    await anyio.to_thread.run_sync(server.start)
                back.set()
            with anyio.fail_after(60):
                while client.ended() < 6:  # noqa: ASYNC110 - the client task reads on its own
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        for proc, _ in edges:
            await anyio.to_thread.run_sync(_reap, proc)
    return client, produced


@pytest.mark.parametrize("outage", [pytest.param(3.0, id="3s"), pytest.param(15.0, id="15s", marks=pytest.mark.slow)])
async def test_redis_restarted_with_its_data_costs_no_character(
    private_redis: Any, tmp_path: Path, outage: float
) -> None:
    client, produced = await _scenario(private_redis, tmp_path, "restart_saved", outage)
    lost, problems = _count(client, produced)
    assert len(produced) == 6
    assert not problems and not client.duplicates, (problems, client.duplicates)
    assert lost == {}, f"characters lost per stream: {lost}"
    assert all(evs[-1]["type"] == "end" for evs in client.events.values()), "no stream may end in error"


async def test_an_edge_killed_under_its_client_costs_no_character(private_redis: Any, tmp_path: Path) -> None:
    client, produced = await _scenario(private_redis, tmp_path, "kill_edge", 0)
    lost, problems = _count(client, produced)
    assert client.reconnects >= 1 and not client.unrecovered, (client.reconnects, client.unrecovered)
    assert not problems and not client.duplicates, (problems, client.duplicates)
    assert lost == {}, f"characters lost per stream: {lost}"
    assert all(evs[-1]["type"] == "end" for evs in client.events.values())


async def test_redis_restarted_without_its_data_is_never_a_silent_hole(private_redis: Any, tmp_path: Path) -> None:
    client, produced = await _scenario(private_redis, tmp_path, "restart_lost", 3.0)
    lost, problems = _count(client, produced)
    assert not problems and not client.duplicates, (problems, client.duplicates)
    assert lost == {}, f"characters lost without an error event, per stream: {lost}"
    ends = {evs[-1].get("kind") or evs[-1]["type"] for evs in client.events.values()}
    assert ends <= {"end", "redis_gap"}, ends
