"""Stop latency: from a stop request at one edge to the ``abort`` at subscribers on another edge, through Redis.

Four processes on this machine and the shared Redis (``STREAMBUS_REDIS_URL``):

* **host** -- the producers: N remote and N local streams,
  each writing a token every 1/``RATE`` s until stopped, published with a
  ``RedisSink``; a ``redis-control`` sink; and, for the same-host baseline, an
  ``http`` and a ``websocket`` sink on its own bus.
* **edge A** -- ``RedisSource`` + ``redis-control`` + ``http`` sink: stops are asked here.
* **edge B** -- ``RedisSource`` + ``redis-control`` + ``websocket`` sink: one
  subscriber per stream (a user each) waits here for its stream's ``abort``.
* the driver (this process) holds the clients and one clock.

Side by side in one run:

* **across hosts**: ``POST /streams/{id}/abort`` at edge A; latency = the
  ``abort`` frame at edge B's subscriber minus the moment the request was sent;
* **same host** (baseline): the same POST at the host's own ``http`` sink,
  the ``abort`` read from the host's own ``websocket`` sink.

Two workloads (``WORKLOADS``: 100 and 25 streams per path) run one after
the other. The streams stop one after another (``GAP`` s apart, the two paths taking
turns so a burst of load on the shared machine hits both alike) while the
others keep streaming. Usage: ``python bench/bench_stop.py`` (about 45 s). Writes
``bench/results/stop.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

URL = os.environ.get("STREAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = (100, 25)  # live streams per path: the heavier one first, then a lighter one in the same run
RATE = 20.0  # tokens/s per stream while it runs
GAP = 0.05  # seconds between two stops
GOAL_P99_MS = 50.0


# -- the processes -------------------------------------------------------------------
async def host(url: str, key: str, channel: str, streams: str) -> None:
    import anyio
    from streambus_http import HttpSink
    from streambus_redis import RedisControl, RedisSink
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    async with Bus() as bus:
        bus.add_sink(RedisSink(url=url, stream=key))
        control = RedisControl(url=url, channel=channel)
        bus.add_sink(control)
        http = HttpSink(port=0)
        bus.add_sink(http)
        ws = WebSocketSink(port=0, max_clients=10_000, max_message_rate=1000)
        bus.add_sink(ws)
        http_url, ws_url = await http.started(), await ws.wait_ready()
        await control.wait_ready()

        async def stream(sid: str) -> None:
            async with bus.stream(stream=sid, model="bench") as w:
                began = anyio.current_time()
                i = 0
                while True:
                    await anyio.sleep_until(began + i / RATE)
                    await w.delta(f"t{i} ")
                    i += 1

        for i in range(int(streams)):
            bus.start_soon(stream, f"r{i}")
            bus.start_soon(stream, f"l{i}")
        print("ready " + json.dumps({"http": http_url, "ws": ws_url}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        await bus.shutdown()


async def edge(url: str, key: str, channel: str, kind: str) -> None:
    import anyio
    from streambus_http import HttpSink
    from streambus_redis import RedisControl, RedisSource
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    async with Bus() as bus:
        source = RedisSource(url=url, stream=key, start="last", block_ms=1000)
        bus.start_producer(source)
        control = RedisControl(url=url, channel=channel)
        bus.add_sink(control)
        if kind == "http":
            sink: Any = HttpSink(port=0)
            bus.add_sink(sink)
            served = await sink.started()
        else:
            sink = WebSocketSink(port=0, max_clients=10_000, max_message_rate=1000)
            bus.add_sink(sink)
            served = await sink.wait_ready()
        await source.wait_ready()
        await control.wait_ready()
        print("ready " + json.dumps({"url": served}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        source.stop()
        await bus.shutdown()


# -- the driver ------------------------------------------------------------------------
def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def ready(proc: subprocess.Popen[bytes]) -> dict[str, str]:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("ready "):
        raise SystemExit(f"a process did not start: {line!r}")
    answer: dict[str, str] = json.loads(line[6:])
    return answer


async def follow(
    url: str,
    stream: str,
    seen: dict[str, float],
    published: dict[str, float],
    subscribed: asyncio.Event,
    count: list[int],
    total: int,
) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, proxy=None) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps({"op": "subscribe", "streams": [stream]}))
        while True:
            data = await ws.recv()
            if '"delta"' in data:
                continue  # the driver is not what is measured: skip parsing the tokens
            frame = json.loads(data)
            if frame.get("op") == "subscribed":
                count[0] += 1
                if count[0] == total:
                    subscribed.set()
            elif frame.get("type") == "abort":
                seen[stream] = time.perf_counter()
                published[stream] = frame["ts"]  # the owner's wall clock as it published the abort
                return


def pct(values: list[float], p: float) -> float:
    """The *p* quantile of sorted *values*, in ms."""
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")


async def measure(
    paths: dict[str, str],
    streams: int,
    seen: dict[str, float],
    published: dict[str, float],
    followers: list[asyncio.Task[None]],
) -> dict[str, Any]:
    """Stop stream i of every path in turn (paths interleaved, so load bursts hit both alike)."""
    import httpx

    sent: dict[str, float] = {}
    wall: dict[str, float] = {}
    answers: dict[str, list[float]] = {prefix: [] for prefix in paths}
    outcomes: dict[str, dict[str, int]] = {prefix: {} for prefix in paths}
    clients = {prefix: httpx.AsyncClient(base_url=url, timeout=10) for prefix, url in paths.items()}
    try:
        for client in clients.values():
            await client.get("/streams")  # the connection is open before the first stop
        for i in range(streams):
            for prefix, client in clients.items():
                sid = f"{prefix}{i}"
                sent[sid], wall[sid] = time.perf_counter(), time.time()
                r = await client.post(f"/streams/{sid}/abort", json={"reason": "bench"})
                answers[prefix].append(time.perf_counter() - sent[sid])
                outcome = r.json().get("outcome", str(r.status_code))
                outcomes[prefix][outcome] = outcomes[prefix].get(outcome, 0) + 1
                await asyncio.sleep(GAP)
    finally:
        for client in clients.values():
            await client.aclose()
    await asyncio.wait(followers, timeout=10)  # each follower returns at its stream's abort
    result = {}
    for prefix in paths:
        mine = [s for s in sent if s.startswith(prefix)]
        latencies = sorted(seen[s] - sent[s] for s in mine if s in seen)
        # Split at the abort's ts (same machine, same wall clock): request -> the owner publishes it.
        to_owner = sorted(published[s] - wall[s] for s in mine if s in published)
        result[prefix] = {
            "to_owner_p50": pct(to_owner, 0.50),
            "to_owner_p99": pct(to_owner, 0.99),
            "stops": len(mine),
            "seen": len(latencies),
            "outcomes": outcomes[prefix],
            "p50": pct(latencies, 0.50),
            "p99": pct(latencies, 0.99),
            "max": latencies[-1] * 1000 if latencies else float("nan"),
            "answer_p50": pct(sorted(answers[prefix]), 0.50),
        }
    return result


async def run_workload(streams: int) -> tuple[dict[str, Any], dict[str, Any], float]:
    """One run with *streams* live streams per path; returns the two paths' figures and the load average."""
    key = f"bench:stop:{uuid.uuid4().hex[:8]}"
    channel = f"{key}:control"
    procs = [spawn("edge", URL, key, channel, "http"), spawn("edge", URL, key, channel, "websocket")]
    try:
        edge_a, edge_b = ready(procs[0])["url"], ready(procs[1])["url"]
        procs.append(spawn("host", URL, key, channel, str(streams)))
        own = ready(procs[2])
        seen: dict[str, float] = {}
        published: dict[str, float] = {}
        subscribed = asyncio.Event()
        count = [0]
        followers = [
            asyncio.create_task(follow(url, f"{prefix}{i}", seen, published, subscribed, count, 2 * streams))
            for prefix, url in (("r", edge_b), ("l", own["ws"]))
            for i in range(streams)
        ]
        await asyncio.wait_for(subscribed.wait(), 30)
        await asyncio.sleep(1.0)  # every stream is flowing through Redis to edge B
        load = os.getloadavg()[0]
        both = await measure({"r": edge_a, "l": own["http"]}, streams, seen, published, followers)
        for task in followers:
            task.cancel()
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        import redis

        client = redis.Redis.from_url(URL)
        names = list(client.scan_iter(match=key + "*"))
        if names:
            client.delete(*names)
        client.close()
    return both["r"], both["l"], load


async def drive() -> None:
    runs = []
    for streams in WORKLOADS:
        runs.append((streams, *await run_workload(streams)))
    write(runs)


def write(runs: list[tuple[int, dict[str, Any], dict[str, Any], float]]) -> None:
    def row(name: str, r: dict[str, Any]) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        return (
            f"| {name} | {r['stops']} ({outcomes}) | {r['seen']} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['max']:.1f} | {r['to_owner_p50']:.1f} / {r['to_owner_p99']:.1f} | {r['answer_p50']:.1f} |"
        )

    header = (
        "| live streams | path | stops (answers) | aborts seen | p50 ms | p99 ms | max ms "
        "| to the owner's abort p50 / p99 ms | HTTP answer p50 ms |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    verdicts = []
    loads = []
    for streams, remote, local, load in runs:
        rows.append(
            f"| {2 * streams} "
            + row("across hosts: POST at edge A -> redis-control -> owner -> Redis -> edge B", remote)
        )
        rows.append(
            f"| {2 * streams} "
            + row("same host (baseline): POST at the owner's http sink -> its websocket sink", local)
        )
        met = remote["seen"] == remote["stops"] and remote["p99"] <= GOAL_P99_MS
        verdicts.append(f"{2 * streams} streams: p99 {remote['p99']:.1f} ms, **{'met' if met else 'NOT met'}**")
        loads.append(f"{load:.1f}")
    text = f"""## Stop latency (a stop at one edge -> `abort` at subscribers on another edge, through Redis)

{header}
{chr(10).join(rows)}

Goal: p99 <= {GOAL_P99_MS:.0f} ms across hosts. {"; ".join(verdicts)}.

Workload: N live streams at {RATE:.0f} tokens/s each (half followed through Redis by edge B, half followed
on the producer host itself), one WebSocket subscriber per stream; the streams are stopped one by one,
{GAP * 1000:.0f} ms apart, the two paths taking turns, while the others keep streaming. Latency is
measured in one process (the driver sends the request and reads the subscriber's frame), so no clocks
are compared; "to the owner's abort" is the abort's `ts` (the producer host's clock, the same
machine's) minus the request's, the rest is the event's way to the subscriber. Four processes and
Redis share the machine's 2 cores with whatever else runs; load average when the stops began:
{" / ".join(loads)}.
"""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stop.md").write_text(text, encoding="utf-8")
    print(text)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "host":
        from streambus import configure_logging

        configure_logging("warning")
        asyncio.run(host(*argv[1:]))
    elif argv and argv[0] == "edge":
        from streambus import configure_logging

        configure_logging("warning")
        asyncio.run(edge(*argv[1:]))
    else:
        asyncio.run(drive())


if __name__ == "__main__":
    main(sys.argv[1:])
