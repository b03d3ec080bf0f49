"""Distributed mode end to end: producer process -> Redis (loopback) -> consumer process.

Side by side in one run, each through the same Redis (``STREAMBUS_REDIS_URL``,
default ``redis://127.0.0.1:6379/0``) on a fresh key deleted afterwards:

* **streambus** -- a producer process publishes streams through ``RedisSink``;
  a consumer process reads them with ``RedisSource`` (de-duplication, position
  commits, origin checks all on) into a lossless sink on its bus. Once with
  the default packing (many events per entry), once with one event per entry.
* **plain redis-py** -- a hand-written loop: pipelined ``XADD`` of one JSON
  event per entry (pipelines of 1000), ``XREAD COUNT 1000`` on the other side.
* **broadcaster** -- encode/broadcaster's Redis *Streams* backend
  (``redis-stream://``: ``XADD`` per publish, ``XREAD COUNT 1`` per message)
  and, for reference, its pub/sub backend (``redis://``, no history at all).

Each row is one run at full speed: events/s counts from the producer's first
event to the consumer's last; latency is the consumer's receive time minus the
event's ``ts`` (same host, same clock), so at full speed it includes queueing.
Two more streambus runs offer a fixed rate (100k events/s, the goal's, and
20k events/s) to read latency below saturation. Every run is capped in time; a capped run reports what arrived.

A second table measures an *edge* (a RedisSource feeding a WebSocketSink, the
process browsers connect to) while 1,000 streams are live, tokens arriving one
at a time, and the edge's WebSocket clients (a subscriber per user, in a
process of their own) follow 10 of them (1%): CPU of the edge process per
token delivered to its clients, today's read-everything edge (``single``
layout: every edge reads every event) against interest routing
(``per_stream`` layout: the edge reads the index and the 10 followed streams),
same run, same producer workload.

Usage: ``python bench/bench_redis.py`` (about two minutes; ``edges`` runs the edge table alone, three rounds of
its four rows, about six minutes; ``BENCH_EDGE_ROUNDS`` sets the rounds).
Writes ``bench/results/redis.md`` (``bench/results/redis-edges.md`` for the edge table).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

URL = os.environ.get("STREAMBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = Path(__file__).resolve().parent / "results"
CAP_S = 20.0
STREAMS = 100


def _report(received: int, first_ts: float | None, latencies: list[float]) -> None:
    end = time.time()
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(json.dumps({"received": received, "end": end, "p50": pct(0.50), "p99": pct(0.99), "cpu": _cpu()}), flush=True)


_CPU_START = [0.0]


def _cpu() -> float:
    """CPU seconds used since :func:`_mark` (user + system): a measure the machine's load does not distort."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime - _CPU_START[0]


_WAKES_START = [0]


def _wakes() -> int:
    """Voluntary context switches since :func:`_mark`: how often the process slept and was woken (load-proof)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - _WAKES_START[0]


def _mark() -> None:
    """Start counting CPU here (after imports and connecting)."""
    _CPU_START[0] = 0.0
    _CPU_START[0] = _cpu()
    _WAKES_START[0] = 0
    _WAKES_START[0] = _wakes()


# -- streambus -------------------------------------------------------------------------------
async def sb_produce(url: str, key: str, n: int, rate: float, entry: int) -> None:
    import anyio
    from streambus_redis import RedisSink

    from streambus import Bus

    per_stream = n // STREAMS
    async with Bus(buffer=4096) as bus:
        sink = RedisSink(url=url, stream=key, entry_max_events=entry, batch_max_ms=1, maxlen=0)
        bus.add_sink(sink)
        await sink.wait_ready()  # connected, as the consumer is before the producer starts
        start = time.time()
        print(json.dumps({"start": start}), flush=True)
        _mark()
        sent = [0]

        async def one() -> None:
            async with bus.stream(model="bench") as w:
                for i in range(per_stream - 2):
                    await w.delta("tok ")
                    sent[0] += 1
                    if i % 20 == 19:
                        # Interleave the streams; when paced, hold the offered rate.
                        ahead = start + sent[0] / rate - time.time() if rate else 0.0
                        await anyio.sleep(max(ahead, 0.0))

        async with anyio.create_task_group() as tg:
            for _ in range(STREAMS):
                tg.start_soon(one)


async def sb_consume(url: str, key: str, n: int) -> None:
    from streambus_redis import RedisSource

    from streambus import Bus, Subscription, is_terminal

    source = RedisSource(url=url, stream=key, start="$", position="none", consumer="bench", count=1000)
    latencies: list[float] = []
    state = {"received": 0, "ended": 0}

    class Meter:
        overflow = "block"

        async def run(self, events: Subscription) -> None:
            while batch := await events.receive_batch():
                now = time.time()
                for e in batch:
                    latencies.append(now - e.ts)
                    if is_terminal(e):
                        state["ended"] += 1
                state["received"] += len(batch)
                if state["ended"] >= STREAMS:
                    source.stop()

    async with Bus(buffer=4096) as bus:
        bus.add_sink(Meter())
        bus.start_producer(source)
        await source.wait_ready()
        print("ready", flush=True)
        _mark()
        with_cap = asyncio.get_running_loop().call_later(CAP_S, source.stop)
    with_cap.cancel()
    _report(state["received"], None, latencies)


# -- plain redis-py ------------------------------------------------------------------------------
async def raw_produce(url: str, key: str, n: int) -> None:
    import orjson
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    start = time.time()
    print(json.dumps({"start": start}), flush=True)
    _mark()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(
            key, {"e": orjson.dumps({"type": "delta", "stream": "s", "seq": i, "ts": time.time(), "text": "tok "})}
        )
        if len(pipe) >= 1000:
            await pipe.execute()
    await pipe.execute()
    await client.aclose()


async def raw_consume(url: str, key: str, n: int) -> None:
    import orjson
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    # Resolve "$" once: re-reading with "$" would skip what arrives between two reads.
    last = (await client.xinfo_stream(key))["last-generated-id"] if await client.exists(key) else "0-0"
    print("ready", flush=True)
    _mark()
    latencies: list[float] = []
    received = 0
    deadline = time.monotonic() + CAP_S
    while received < n and time.monotonic() < deadline:
        resp: Any = await client.xread({key: last}, count=1000, block=500)
        now = time.time()
        for _, entries in resp or ():
            for entry_id, fields in entries:
                event = orjson.loads(fields[b"e"])
                latencies.append(now - event["ts"])
                received += 1
                last = entry_id
    await client.aclose()
    _report(received, None, latencies)


# -- broadcaster -----------------------------------------------------------------------------------
def _bc_url(url: str, streams: bool) -> str:
    return url.replace("redis://", "redis-stream://", 1) if streams else url


async def bc_produce(url: str, key: str, n: int, streams: bool) -> None:
    import orjson
    from broadcaster import Broadcast

    async with Broadcast(_bc_url(url, streams)) as broadcast:
        start = time.time()
        print(json.dumps({"start": start}), flush=True)
        _mark()
        deadline = time.monotonic() + CAP_S
        for i in range(n):
            message = orjson.dumps({"type": "delta", "stream": "s", "seq": i, "ts": time.time(), "text": "tok "})
            await broadcast.publish(channel=key, message=message.decode())
            if i % 1000 == 0 and time.monotonic() > deadline:
                break


async def bc_consume(url: str, key: str, n: int, streams: bool) -> None:
    import orjson
    from broadcaster import Broadcast

    latencies: list[float] = []
    received = 0
    async with Broadcast(_bc_url(url, streams)) as broadcast:
        async with broadcast.subscribe(channel=key) as subscriber:
            print("ready", flush=True)
            _mark()
            deadline = time.monotonic() + CAP_S + 2
            iterator = subscriber.__aiter__()
            assert iterator is not None
            while received < n:
                # Give up after 5 s of silence (or at the cap): report what arrived.
                timeout = min(5.0, deadline - time.monotonic())
                if timeout <= 0:
                    break
                try:
                    event = await asyncio.wait_for(iterator.__anext__(), timeout)
                except (TimeoutError, StopAsyncIteration):
                    break
                latencies.append(time.time() - orjson.loads(event.message)["ts"])  # type: ignore[union-attr]
                received += 1
    _report(received, None, latencies)


# -- edges: 1,000 live streams, clients following 1% ---------------------------------------------------------
EDGE_STREAMS = 1000
EDGE_FOLLOWED = 10
EDGE_PRODUCERS = 4  # model workers: the streams are spread over this many producer processes
EDGE_TOKENS = int(os.environ.get("BENCH_EDGE_TOKENS", "300"))  # per stream: a typical chat answer
EDGE_PACE = 0.05  # seconds between two tokens of a stream: 20 tokens/s each, 20k tokens/s in all
EDGE_LINGER_MS = 20  # the interest edge's read_linger_ms in the goal's row (as configs/edges/ ship it)
EDGE_ROUNDS = int(os.environ.get("BENCH_EDGE_ROUNDS", "3"))  # runs of each row, alternating


async def edge_serve(url: str, key: str, layout: str, linger: int) -> None:
    """The edge: RedisSource -> Bus -> WebSocketSink; prints its URL; counts CPU from stdin's ``mark`` to ``report``."""
    import anyio
    from streambus_redis import RedisSource
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    source = RedisSource(
        url=url,
        stream=key,
        layout=layout,
        start="$",
        position="none",
        consumer="edge",
        count=1000,
        read_linger_ms=linger,
    )
    sink = WebSocketSink(port=0)
    async with Bus(buffer=4096) as bus:
        bus.add_sink(sink, name="websocket")
        bus.start_producer(source)
        ws_url = await sink.wait_ready()
        await source.wait_ready()
        print(f"ready {ws_url}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # "mark": warmed up (clients, first streams)
        delivered = source.delivered
        profile = os.environ.get("BENCH_EDGE_PROFILE")  # a file: the measured wave's CPU profile (cProfile)
        if profile:
            import cProfile

            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
        _mark()
        print("marked", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # "report"
        if profile:
            profiler.disable()
            profiler.dump_stats(f"{profile}.{layout}.{linger}")
        print(json.dumps({"cpu": _cpu(), "wakes": _wakes(), "delivered": source.delivered - delivered}), flush=True)
        source.stop()


async def edge_clients(url: str) -> None:
    """EDGE_FOLLOWED WebSocket clients, one per user; each reads its user's warm-up stream, then the measured one."""
    import anyio
    import orjson
    from websockets.asyncio.client import connect

    tokens = [0]

    async def user(i: int, ready: anyio.Event) -> None:
        async with connect(url, max_size=None, proxy=None) as ws:
            await ws.recv()  # hello
            await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "meta": {"user": i}}).decode())
            await ws.recv()  # subscribed
            ready.set()
            ended = 0
            while ended < 2:
                event = orjson.loads(await ws.recv())
                if event.get("type") == "delta" and ended == 1:
                    tokens[0] += event["text"].count("tok ")  # a slow reader's deltas may come coalesced
                elif event.get("type") in ("end", "error", "abort"):
                    ended += 1

    async with anyio.create_task_group() as tg:
        for i in range(EDGE_FOLLOWED):
            ready = anyio.Event()
            tg.start_soon(user, i, ready)
            await ready.wait()
        print("ready", flush=True)
    print(json.dumps({"tokens": tokens[0]}), flush=True)


async def edge_produce(url: str, key: str, layout: str, part: int) -> None:
    """Part *part* of the workload: a warm-up wave (prints ``warm``, waits for a line on stdin), then
    EDGE_STREAMS / EDGE_PRODUCERS paced streams at once (users ``part``, ``part + EDGE_PRODUCERS``, ...)."""
    import anyio
    from streambus_redis import RedisSink

    from streambus import Bus

    async with Bus(buffer=4096) as bus:
        sink = RedisSink(url=url, stream=key, layout=layout, batch_max_ms=2)
        bus.add_sink(sink)
        await sink.wait_ready()

        async def one(i: int, tokens: int) -> None:
            async with bus.stream(model="bench", meta={"user": i}) as w:
                for _ in range(tokens):
                    await w.delta("tok ")
                    await anyio.sleep(EDGE_PACE)

        # Warm-up: every code path of the edge runs once before its CPU is counted (imports, first reads).
        async with anyio.create_task_group() as tg:
            for i in [*range(EDGE_FOLLOWED), *range(EDGE_STREAMS, EDGE_STREAMS + 50)]:
                if i % EDGE_PRODUCERS == part:
                    tg.start_soon(one, i, 5)
        print("warm", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        async with anyio.create_task_group() as tg:
            for i in range(part, EDGE_STREAMS, EDGE_PRODUCERS):
                tg.start_soon(one, i, EDGE_TOKENS)


def run_edge(layout: str, linger: int) -> dict[str, Any]:
    """One edge run: edge process, clients process, producer process; the edge's CPU per delivered token."""
    import redis

    key = f"bench:streambus:{uuid.uuid4().hex[:10]}"
    procs: list[subprocess.Popen[str]] = []

    def line(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def say(proc: subprocess.Popen[str], text: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    try:
        edge = _child("edge-serve", layout, key, 0, str(linger))
        procs.append(edge)
        ready = line(edge)
        if not ready.startswith("ready "):
            raise RuntimeError(f"edge ({layout}) did not start: {ready!r}")
        clients = _child("edge-clients", layout, key, 0, ready.removeprefix("ready "))
        procs.append(clients)
        if line(clients) != "ready":
            raise RuntimeError("the edge clients did not start")
        producers = [_child("edge-produce", layout, key, 0, str(part)) for part in range(EDGE_PRODUCERS)]
        procs += producers
        for producer in producers:
            if line(producer) != "warm":
                raise RuntimeError("a producer's warm-up failed")
        time.sleep(1.0)  # the warm-up's last events reach the edge
        say(edge, "mark")
        if line(edge) != "marked":
            raise RuntimeError("the edge did not start counting")
        started = time.perf_counter()
        for producer in producers:
            say(producer, "go")
        out, _ = clients.communicate(timeout=CAP_S + 60)
        elapsed = time.perf_counter() - started
        tokens = json.loads(out.strip().splitlines()[-1])["tokens"]
        say(edge, "report")
        stats = json.loads(line(edge))
        for producer in producers:
            producer.communicate(timeout=CAP_S + 60)
        edge.communicate(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        client = redis.Redis.from_url(URL)
        names = list(client.scan_iter(match=key + "*", count=1000))
        for i in range(0, len(names), 500):
            client.delete(*names[i : i + 500])
        client.close()
    return {
        "tokens": tokens,
        "cpu": stats["cpu"],
        "wakes": stats["wakes"],
        "read": stats["delivered"],
        "elapsed": elapsed,
        "cpu_us": stats["cpu"] / tokens * 1e6 if tokens else float("nan"),
    }


def edge_rounds(
    rows: list[tuple[str, tuple[Any, ...]]], run_one: Callable[..., dict[str, Any]], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every row (a label and *run_one*'s arguments) in turn, *rounds* times; each row's runs by label.

    One run per row let the read-everything edge's CPU swing by 40% between table runs (2.85 to 4.87 s
    per wave), and the ratio with it: the tables report each row's median run (:func:`edge_table`).
    """
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in rows}
    for round_ in range(rounds):
        for label, args in rows:
            print(f"-- edge, round {round_ + 1} of {rounds}: {label}", flush=True)
            r = run_one(*args)
            runs[label].append(r)
            print(
                f"   {r['tokens']} tokens delivered, edge CPU {r['cpu']:.2f} s, {r['cpu_us']:.0f} µs/token, "
                f"{r['wakes']} wake-ups",
                flush=True,
            )
    return runs


def edge_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each row's median run by CPU per token, and the table of them, ratios to the first row's (in *runs*' order)."""
    results = {label: sorted(rs, key=lambda r: r["cpu_us"])[len(rs) // 2] for label, rs in runs.items()}
    offered = EDGE_STREAMS * EDGE_TOKENS
    base = next(iter(results.values()))["cpu_us"]
    lines = [
        "| edge | tokens produced | events the edge's source delivered | tokens delivered to its clients "
        "| edge CPU s | edge CPU µs per delivered token | ratio | µs per token, every round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in results.items():
        every = ", ".join(f"{x['cpu_us']:.0f}" for x in runs[label])
        lines.append(
            f"| {label} | {offered:,} | {r['read']:,} | {r['tokens']:,} | {r['cpu']:.2f} | {r['cpu_us']:.0f} "
            f"| {r['cpu_us'] / base:.3f}x | {every} |"
        )
    return results, lines


def edges_table() -> list[str]:
    goal_row = f"interest routing (`per_stream`, `read_linger_ms = {EDGE_LINGER_MS}`)"
    rows = [
        ("today: every edge reads every event (`single` layout)", "single", 0),
        ("interest routing (`per_stream`, `read_linger_ms = 0`)", "per_stream", 0),
        (goal_row, "per_stream", EDGE_LINGER_MS),
        ("interest routing (`per_stream`, `read_linger_ms = 50`)", "per_stream", 50),
    ]
    if only := os.environ.get("BENCH_EDGE_ONLY"):  # one row alone (profiling), e.g. per_stream-20; no table
        edge_rounds(
            [(label, (layout, linger)) for label, layout, linger in rows if f"{layout}-{linger}" == only], run_edge, 1
        )
        return []
    runs = edge_rounds([(label, (layout, linger)) for label, layout, linger in rows], run_edge, EDGE_ROUNDS)
    results, table = edge_table(runs)
    lines = [
        f"## An edge while {EDGE_STREAMS:,} streams are live and its clients follow {EDGE_FOLLOWED} (1%)",
        "",
        *table,
    ]
    expected = EDGE_FOLLOWED * EDGE_TOKENS
    ratio = results[goal_row]["cpu_us"] / results[rows[0][0]]["cpu_us"]
    whole = all(r["tokens"] == expected for rs in runs.values() for r in rs)
    lines += [
        "",
        f"Goal: edge CPU per delivered token with 1% interest at most 0.1x today's (the `read_linger_ms = "
        f"{EDGE_LINGER_MS}` row): **{ratio:.3f}x -> "
        f"{'met' if ratio <= 0.1 and whole else 'not met'}**"
        f"{'' if whole else f' (a run delivered other than the {expected:,} tokens expected)'}.",
        "",
        f"Workload: {EDGE_STREAMS:,} streams live at once, each {EDGE_TOKENS} tokens one at a time every "
        f"{EDGE_PACE * 1000:.0f} ms ({EDGE_STREAMS / EDGE_PACE:,.0f} tokens/s in all), from {EDGE_PRODUCERS} producer "
        "processes; "
        f"the edge process (RedisSource + WebSocketSink) serves {EDGE_FOLLOWED} WebSocket clients in a third "
        "process, one per user, each subscribed by its user's meta tag before the streams start. Edge CPU = "
        "user+system CPU of the edge process from the start of the measured wave to its last token (after a "
        "warm-up wave of short streams that runs every code path once; not Redis, not the clients). "
        "`read_linger_ms`: after a read that found entries the interest edge waits that long before the next, "
        "so several followed tokens share a read (up to that much more latency). "
        f"Each row ran {EDGE_ROUNDS} times, the rows in turn; a row's figures are its median run by CPU per "
        "token, and the ratio is the medians' (the last column lists every round's). Runs took "
        + ", ".join(f"{r['elapsed']:.1f}" for rs in runs.values() for r in rs)
        + " s. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
    ]
    return lines


# -- orchestration ---------------------------------------------------------------------------------------
def _child(role: str, variant: str, key: str, n: int, extra: str = "0") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, role, variant, key, str(n), extra],
        stdin=subprocess.PIPE if role in ("edge-serve", "edge-produce") else None,
        stdout=subprocess.PIPE,
        text=True,
    )


def run(variant: str, n: int, extra: str = "0") -> dict[str, Any]:
    import redis

    key = f"bench:streambus:{uuid.uuid4().hex[:10]}"
    consumer = _child("consume", variant, key, n, extra)
    producer: subprocess.Popen[str] | None = None
    try:
        assert consumer.stdout is not None
        ready = consumer.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"{variant} consumer did not start: {ready!r}")
        producer = _child("produce", variant, key, n, extra)
        out, _ = producer.communicate(timeout=CAP_S + 30)
        start = json.loads(out.splitlines()[0])["start"]
        producer_cpu = json.loads(out.splitlines()[-1])["cpu"]
        rest, _ = consumer.communicate(timeout=CAP_S + 30)
        result: dict[str, Any] = json.loads(rest.strip().splitlines()[-1])
    finally:
        for proc in (consumer, producer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        client = redis.Redis.from_url(URL)
        client.delete(key)
        client.close()
    elapsed = result["end"] - start
    result["rate"] = result["received"] / elapsed if elapsed > 0 else 0.0
    result["cpu_us"] = (producer_cpu + result["cpu"]) / result["received"] * 1e6 if result["received"] else float("nan")
    result["offered"] = n
    return result


def child_main(argv: list[str]) -> None:
    from streambus import configure_logging

    configure_logging("warning")  # to stderr: stdout carries the results
    role, variant, key, n_s, extra = argv
    n = int(n_s)
    if role.startswith("edge-"):
        if role == "edge-serve":
            asyncio.run(edge_serve(URL, key, variant, int(extra)))
        elif role == "edge-clients":
            asyncio.run(edge_clients(extra))
        else:
            asyncio.run(edge_produce(URL, key, variant, int(extra)))
        return
    if variant == "streambus":
        coro = sb_produce(URL, key, n, float(extra), 128) if role == "produce" else sb_consume(URL, key, n)
    elif variant == "streambus-1":
        coro = sb_produce(URL, key, n, float(extra), 1) if role == "produce" else sb_consume(URL, key, n)
    elif variant == "redis-py":
        coro = raw_produce(URL, key, n) if role == "produce" else raw_consume(URL, key, n)
    else:
        streams = variant == "broadcaster-streams"
        coro = bc_produce(URL, key, n, streams) if role == "produce" else bc_consume(URL, key, n, streams)
    asyncio.run(coro)
    if role == "produce":
        print(json.dumps({"cpu": _cpu()}), flush=True)


def main(argv: list[str]) -> int:
    if argv == ["edges"]:
        edges = edges_table()
        if not edges:
            return 0
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "redis-edges.md").write_text("\n".join(edges) + "\n", encoding="utf-8")
        print("\n".join(edges))
        return 0
    rows = [
        ("streambus RedisSink -> RedisSource (128 events/entry)", "streambus", 300_000, "0"),
        ("streambus, paced at 100k events/s offered", "streambus", 300_000, "100000"),
        ("streambus, paced at 20k events/s offered", "streambus", 60_000, "20000"),
        ("streambus, one event per entry", "streambus-1", 100_000, "0"),
        ("plain redis-py: pipelined XADD / XREAD COUNT 1000", "redis-py", 100_000, "0"),
        ("broadcaster redis-stream:// (Redis Streams backend)", "broadcaster-streams", 10_000, "0"),
        ("broadcaster redis:// (pub/sub backend, no history)", "broadcaster-pubsub", 10_000, "0"),
    ]
    lines = [
        "## Redis distributed mode (producer process -> Redis loopback -> consumer process)",
        "",
        "| path | events sent | events received | events/s | p50 latency ms | p99 latency ms | CPU µs/event |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results: dict[str, dict[str, Any]] = {}
    for label, variant, n, extra in rows:
        print(f"-- {label}", flush=True)
        r = run(variant, n, extra)
        results[label] = r
        print(
            f"   {r['received']} events, {r['rate']:,.0f}/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms", flush=True
        )
        lines.append(
            f"| {label} | {n:,} | {r['received']:,} | {r['rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['cpu_us']:.1f} |"
        )
    full = results[rows[0][0]]
    paced = results[rows[1][0]]
    met = full["rate"] >= 100_000 and paced["p99"] <= 20.0 and paced["rate"] >= 95_000
    lines += [
        "",
        f"Goal: >= 100k events/s end to end at p99 <= 20 ms. Full speed: {full['rate']:,.0f} events/s; "
        f"at 100k events/s offered: {paced['rate']:,.0f} events/s delivered, p99 {paced['p99']:.1f} ms "
        f"-> **{'met' if met else 'not met'}**.",
        "",
        f"Events are {STREAMS} interleaved streams of deltas; latency = consumer receive time - event ts "
        "(full-speed rows include queueing). CPU µs/event = user+system CPU of the producer and consumer "
        "processes (not Redis) per event received, after start-up: it does not depend on "
        "how busy the machine is. Runs capped at "
        f"{CAP_S:.0f} s; a capped run reports what arrived in time. "
        f"Load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(the machine is shared; the three processes of each run compete for the same cores).",
    ]
    if results[rows[-1][0]]["received"] == 0:
        lines.append(
            "\nbroadcaster 0.3.1's pub/sub backend delivered nothing with redis-py 8.1: its listener task "
            "starts `PubSub.listen()` before `SUBSCRIBE` is registered, `listen()` returns at once "
            "(no channels yet), and the listener then waits for a subscribe that already happened."
        )
    edges = edges_table()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redis.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / "redis-edges.md").write_text("\n".join(edges) + "\n", encoding="utf-8")
    print("\n".join([*lines, "", *edges]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2:
        child_main(sys.argv[1:])
    else:
        sys.exit(main(sys.argv[1:]))
