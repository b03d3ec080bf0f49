"""Stop latency: from a stop request at one edge to the ``abort`` at subscribers on another edge, through Redis.

Four processes on this machine and the shared Redis (``STREAMBUS_REDIS_URL``):

* **host** -- the producers: ``STREAMS`` remote and ``STREAMS`` local streams,
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

The streams stop one after another (``GAP`` s apart) while the others keep
streaming. Usage: ``python bench/bench_stop.py`` (about 30 s). Writes
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
STREAMS = int(os.environ.get("BENCH_STOP_STREAMS", "100"))  # per path; the committed table uses 100
RATE = 20.0  # tokens/s per stream while it runs
GAP = 0.05  # seconds between two stops
GOAL_P99_MS = 50.0


# -- the processes -------------------------------------------------------------------
async def host(url: str, key: str, channel: str) -> None:
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

        for i in range(STREAMS):
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


async def follow(url: str, stream: str, seen: dict[str, float], subscribed: asyncio.Event, count: list[int]) -> None:
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
                if count[0] == 2 * STREAMS:
                    subscribed.set()
            elif frame.get("type") == "abort":
                seen[stream] = time.perf_counter()
                return


async def measure(
    http_url: str, prefix: str, seen: dict[str, float], followers: list[asyncio.Task[None]]
) -> dict[str, Any]:
    import httpx

    sent: dict[str, float] = {}
    answers: list[float] = []
    outcomes: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        await client.get("/streams")  # the connection is open before the first stop
        for i in range(STREAMS):
            sid = f"{prefix}{i}"
            sent[sid] = time.perf_counter()
            r = await client.post(f"/streams/{sid}/abort", json={"reason": "bench"})
            answers.append(time.perf_counter() - sent[sid])
            outcome = r.json().get("outcome", str(r.status_code))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            await asyncio.sleep(GAP)
    await asyncio.wait(followers, timeout=10)  # each follower returns at its stream's abort
    latencies = sorted(seen[s] - sent[s] for s in sent if s in seen)
    answers.sort()

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")

    return {
        "stops": len(sent),
        "seen": len(latencies),
        "outcomes": outcomes,
        "p50": pct(latencies, 0.50),
        "p99": pct(latencies, 0.99),
        "max": latencies[-1] * 1000 if latencies else float("nan"),
        "answer_p50": pct(answers, 0.50),
    }


async def drive() -> None:
    key = f"bench:stop:{uuid.uuid4().hex[:8]}"
    channel = f"{key}:control"
    procs = [spawn("edge", URL, key, channel, "http"), spawn("edge", URL, key, channel, "websocket")]
    try:
        edge_a, edge_b = ready(procs[0])["url"], ready(procs[1])["url"]
        procs.append(spawn("host", URL, key, channel))
        own = ready(procs[2])
        seen: dict[str, float] = {}
        subscribed = asyncio.Event()
        count = [0]
        remote = [asyncio.create_task(follow(edge_b, f"r{i}", seen, subscribed, count)) for i in range(STREAMS)]
        local = [asyncio.create_task(follow(own["ws"], f"l{i}", seen, subscribed, count)) for i in range(STREAMS)]
        await asyncio.wait_for(subscribed.wait(), 30)
        await asyncio.sleep(1.0)  # every stream is flowing through Redis to edge B
        load = os.getloadavg()[0]
        across = await measure(edge_a, "r", seen, remote)
        same = await measure(own["http"], "l", seen, local)
        for task in remote + local:
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
    write(across, same, load)


def write(remote: dict[str, Any], local: dict[str, Any], load: float) -> None:
    def row(name: str, r: dict[str, Any]) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        return (
            f"| {name} | {r['stops']} ({outcomes}) | {r['seen']} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['max']:.1f} | {r['answer_p50']:.1f} |"
        )

    met = remote["seen"] == remote["stops"] and remote["p99"] <= GOAL_P99_MS
    verdict = "met" if met else "NOT met"
    text = f"""## Stop latency (a stop at one edge -> `abort` at subscribers on another edge, through Redis)

| path | stops (answers) | aborts seen | p50 ms | p99 ms | max ms | HTTP answer p50 ms |
|---|---:|---:|---:|---:|---:|---:|
{row("across hosts: POST at edge A -> redis-control -> producer host -> Redis -> edge B websocket", remote)}
{row("same host (baseline): POST at the producer's http sink -> its websocket sink", local)}

Goal: p99 <= {GOAL_P99_MS:.0f} ms across hosts. Measured p99 {remote["p99"]:.1f} ms -> **{verdict}**.

Workload: {2 * STREAMS} live streams at {RATE:.0f} tokens/s each ({STREAMS} followed through Redis by edge B,
{STREAMS} followed on the host itself), one WebSocket subscriber per stream; the streams are stopped one by one,
{GAP * 1000:.0f} ms apart, while the others keep streaming. Latency is measured in one process (the driver sends
the request and reads the subscriber's frame), so no clocks are compared. Four processes and Redis share the
machine's 2 cores; load average when the stops began: {load:.1f}.
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
