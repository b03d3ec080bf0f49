"""Core bus benchmark: the workloads users run, then burst fan-out, paced latency, memory.

Token-stream workloads (producers yield to the loop after every token, as a
network stream does), each beside its peer in the same run, judged on CPU
time per token (the machine is shared: wall time moves with the neighbours):

- per-user: M concurrent streams, each read by its own filtered subscriber
  (``Filter.of(streams=id)``), against one ``asyncio.Queue`` per user;
- fan-out: 1 and 100 concurrent streams read by K unfiltered readers
  (``async for`` and ``receive_batch``), against one ``asyncio.Queue`` per reader;
- paced latency with 1,000 live per-user streams, against Queue-per-user;
- memory per idle subscriber and per live stream, at 10,000 of each.

Burst mode, side by side in one run, on asyncio:
- streambus (``async for`` readers, and ``receive_batch`` readers),
- a naive fan-out: one unbounded ``asyncio.Queue`` per subscriber,
- anyio memory object streams (one per subscriber),
- ``broadcaster`` with its memory backend,
- ``pyee``: the synchronous ``EventEmitter`` (callbacks, no queues at all)
  and the ``AsyncIOEventEmitter`` (a task per listener per event).

Every system gets the same publisher: build events up front, publish them in
a loop, yield to the loop every 64 events. Throughput is deliveries (events x
subscribers) per CPU second, from the first publish until every subscriber
has seen the last event. Writes ``bench/results/core.md``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio

from streambus import Bus, DeltaEvent, EndEvent, Event, Filter, StartEvent, Subscription

YIELD_EVERY = 64
OUT = Path(__file__).resolve().parent / "results" / "core.md"


def make_events(n: int, streams: int = 4) -> list[Event]:
    return [DeltaEvent(stream=f"s{i % streams}", seq=i // streams + 1, ts=0.0, text="tok ") for i in range(n)]


# -- throughput -------------------------------------------------------------------


async def tp_naive_queue(events: list[Event], subs: int) -> float:
    queues: list[asyncio.Queue[Event | None]] = [asyncio.Queue() for _ in range(subs)]

    async def consume(q: asyncio.Queue[Event | None]) -> None:
        while (await q.get()) is not None:
            pass

    tasks = [asyncio.create_task(consume(q)) for q in queues]
    await asyncio.sleep(0)
    t0 = time.process_time()
    for i, e in enumerate(events):
        for q in queues:
            q.put_nowait(e)
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    return time.process_time() - t0


async def tp_anyio_streams(events: list[Event], subs: int) -> float:
    pairs = [anyio.create_memory_object_stream[Event](max_buffer_size=float("inf")) for _ in range(subs)]

    async def consume(recv: anyio.abc.ObjectReceiveStream[Event]) -> None:
        async with recv:
            async for _ in recv:
                pass

    async with anyio.create_task_group() as tg:
        for _, recv in pairs:
            tg.start_soon(consume, recv)
        await asyncio.sleep(0)
        t0 = time.process_time()
        for i, e in enumerate(events):
            for send, _ in pairs:
                send.send_nowait(e)
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        for send, _ in pairs:
            send.close()
    return time.process_time() - t0


async def tp_broadcaster(events: list[Event], subs: int) -> float:
    from broadcaster import Broadcast

    broadcast = Broadcast("memory://")
    await broadcast.connect()
    ready = 0
    all_ready = asyncio.Event()
    last = events[-1]

    async def consume() -> None:
        nonlocal ready
        async with broadcast.subscribe(channel="bench") as subscriber:
            ready += 1
            if ready == subs:
                all_ready.set()
            async for message in subscriber:  # type: ignore[union-attr]
                if message.message is last:  # type: ignore[union-attr]
                    return

    tasks = [asyncio.create_task(consume()) for _ in range(subs)]
    await all_ready.wait()
    t0 = time.process_time()
    for i, e in enumerate(events):
        await broadcast.publish(channel="bench", message=e)
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    elapsed = time.process_time() - t0
    await broadcast.disconnect()
    return elapsed


async def tp_pyee_sync(events: list[Event], subs: int) -> float:
    from pyee import EventEmitter

    ee = EventEmitter()
    counts = [0] * subs
    for k in range(subs):

        def listener(e: Event, k: int = k) -> None:
            counts[k] += 1

        ee.on("event", listener)
    t0 = time.process_time()
    for i, e in enumerate(events):
        ee.emit("event", e)
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    elapsed = time.process_time() - t0
    assert counts == [len(events)] * subs
    return elapsed


async def tp_pyee_async(events: list[Event], subs: int) -> float:
    from pyee.asyncio import AsyncIOEventEmitter

    ee = AsyncIOEventEmitter()
    done = asyncio.Event()
    remaining = len(events) * subs

    for _ in range(subs):

        async def listener(e: Event) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                done.set()

        ee.on("event", listener)
    t0 = time.process_time()
    for i, e in enumerate(events):
        ee.emit("event", e)
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    await done.wait()
    return time.process_time() - t0


class Counters:
    """*subs* counting sinks that each read *n* events (``receive_batch`` or ``async for``); ``all_done`` then.

    Shared with ``bench_stats.py``, which measures the stats sink on this same fan-out.
    """

    def __init__(self, n: int, subs: int, batch: bool) -> None:
        self.n, self.subs, self.batch = n, subs, batch
        self.finished = 0
        self.all_done = asyncio.Event()

    async def run(self, sub: Subscription) -> None:
        n = self.n
        seen = 0
        if self.batch:
            while seen < n:
                seen += len(await sub.receive_batch())
        else:
            async for _ in sub:
                seen += 1
                if seen == n:
                    break
        self.finished += 1
        if self.finished == self.subs:
            self.all_done.set()


async def _streambus(events: list[Event], subs: int, batch: bool) -> float:
    counters = Counters(len(events), subs, batch)
    all_done = counters.all_done
    async with Bus(buffer=4096, overflow="block") as bus:
        for _ in range(subs):
            bus.add_sink(counters)
        await asyncio.sleep(0)
        t0 = time.process_time()
        publish = bus.publish
        for i, e in enumerate(events):
            await publish(e)
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await all_done.wait()
        return time.process_time() - t0


async def tp_streambus_iter(events: list[Event], subs: int) -> float:
    return await _streambus(events, subs, batch=False)


async def tp_streambus_batch(events: list[Event], subs: int) -> float:
    return await _streambus(events, subs, batch=True)


SYSTEMS: dict[str, Callable[[list[Event], int], Coroutine[Any, Any, float]]] = {
    "streambus (async for)": tp_streambus_iter,
    "streambus (receive_batch)": tp_streambus_batch,
    "naive asyncio.Queue fan-out": tp_naive_queue,
    "anyio memory object streams": tp_anyio_streams,
    "broadcaster (memory)": tp_broadcaster,
    "pyee EventEmitter (sync callbacks)": tp_pyee_sync,
    "pyee AsyncIOEventEmitter": tp_pyee_async,
}


def best_of(
    fn: Callable[[list[Event], int], Coroutine[Any, Any, float]], events: list[Event], subs: int, runs: int
) -> float:
    times: list[float] = []
    for _ in range(runs):
        gc.collect()
        times.append(asyncio.run(fn(events, subs)))
    return min(times)


# -- latency -----------------------------------------------------------------------


async def lat_streambus(total: int, rate: float, subs: int) -> list[float]:
    lat: list[float] = []

    class Timer:
        async def run(self, sub: Subscription) -> None:
            async for e in sub:
                lat.append(time.perf_counter() - e.ts)

    async with Bus() as bus:
        for _ in range(subs):
            bus.add_sink(Timer())
        await _paced(total, rate, bus.publish)
    return lat


async def lat_queue(total: int, rate: float, subs: int) -> list[float]:
    lat: list[float] = []
    queues: list[asyncio.Queue[Event | None]] = [asyncio.Queue() for _ in range(subs)]

    async def consume(q: asyncio.Queue[Event | None]) -> None:
        while (e := await q.get()) is not None:
            lat.append(time.perf_counter() - e.ts)

    tasks = [asyncio.create_task(consume(q)) for q in queues]

    async def publish(e: Event) -> None:
        for q in queues:
            q.put_nowait(e)

    await _paced(total, rate, publish)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    return lat


async def lat_anyio(total: int, rate: float, subs: int) -> list[float]:
    lat: list[float] = []
    pairs = [anyio.create_memory_object_stream[Event](max_buffer_size=float("inf")) for _ in range(subs)]

    async def consume(recv: anyio.abc.ObjectReceiveStream[Event]) -> None:
        async with recv:
            async for e in recv:
                lat.append(time.perf_counter() - e.ts)

    async with anyio.create_task_group() as tg:
        for _, recv in pairs:
            tg.start_soon(consume, recv)

        async def publish(e: Event) -> None:
            for send, _ in pairs:
                send.send_nowait(e)

        await _paced(total, rate, publish)
        for send, _ in pairs:
            send.close()
    return lat


async def _paced(total: int, rate: float, publish: Callable[[Event], Awaitable[None]]) -> None:
    # Publish one event every 1/rate seconds, stamped with the time it was
    # published; sleep between ticks so readers run as they would in an app.
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(total):
        target = start + i * interval
        now = time.perf_counter()
        if target > now:
            await asyncio.sleep(target - now)
        await publish(DeltaEvent(stream="s", seq=i + 1, ts=time.perf_counter(), text="tok "))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- memory ------------------------------------------------------------------------


async def mem_streambus(events: list[Event]) -> tuple[int, int]:
    async with Bus(buffer=1024) as bus:
        sub = bus.subscribe(overflow="coalesce", max_bytes=64 * 1024 * 1024)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for e in events:
            await bus.publish(e)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        held = sub.pending
        sub.close()
    return used, held


async def mem_queue(events: list[Event]) -> tuple[int, int]:
    q: asyncio.Queue[Event] = asyncio.Queue()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for e in events:
        q.put_nowait(e)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used, q.qsize()


# -- token-stream workloads --------------------------------------------------------
#
# Every workload below returns (deliveries, CPU seconds, wall seconds) counted from the
# moment every producer and reader is in place until the last reader saw its last event.

TOKEN = "tok "

PER_USER_SIZES = (10, 100, 1_000, 10_000)
"""The per-user rows' numbers of concurrent streams M (each read by its own filtered subscriber)."""

FANOUT_SHAPES = tuple((streams, readers) for streams in (1, 100) for readers in (1, 10, 100))
"""The token-stream fan-out rows: (concurrent streams S, unfiltered readers K)."""


def per_user_tokens(m: int, quick: bool = False) -> int:
    """Tokens per stream in a per-user row: 60,000 in all (30,000 quick), and at least 30 per stream.

    A short answer: fewer would time the stream set-up, not its tokens. ``bench_stats.py`` runs
    the same rows, so the stats sink's goal is measured on this benchmark's workloads.
    """
    return max(30, (30_000 if quick else 60_000) // m)


def fanout_tokens(streams: int, readers: int, quick: bool = False) -> int:
    """Tokens per stream in a fan-out row: 150,000 deliveries (tokens x K) in all, 50,000 quick."""
    return max(1, (50_000 if quick else 150_000) // readers // streams)


class Clock:
    """CPU and wall time between ``start()`` and ``stop()``."""

    def start(self) -> None:
        gc.collect()
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def stop(self) -> tuple[float, float]:
        return time.process_time() - self.cpu0, time.perf_counter() - self.wall0


async def per_user_bus(m: int, tokens: int) -> tuple[int, float, float]:
    go, done, clock = asyncio.Event(), asyncio.Event(), Clock()
    received = finished = 0
    async with Bus() as bus:

        async def user(sub: Subscription) -> None:
            nonlocal received, finished
            async with sub:
                async for event in sub:
                    if type(event) is DeltaEvent:
                        received += event.n
                    elif type(event) is EndEvent:
                        break
            finished += 1
            if finished == m:
                done.set()

        async def produce(i: int) -> None:
            async with bus.stream(stream=f"u{i}") as w:
                await go.wait()
                for _ in range(tokens):
                    await w.delta(TOKEN)
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(user(bus.subscribe(Filter.of(streams=f"u{i}")))) for i in range(m)]
        tasks += [asyncio.create_task(produce(i)) for i in range(m)]
        for _ in range(3):
            await asyncio.sleep(0)
        clock.start()
        go.set()
        await done.wait()
        cpu, wall = clock.stop()
        await asyncio.gather(*tasks)
    assert received == m * tokens, (received, m * tokens)
    return received, cpu, wall


async def per_user_queue(m: int, tokens: int) -> tuple[int, float, float]:
    go, done, clock = asyncio.Event(), asyncio.Event(), Clock()
    received = finished = 0
    queues: list[asyncio.Queue[Event | None]] = [asyncio.Queue() for _ in range(m)]

    async def user(q: asyncio.Queue[Event | None]) -> None:
        nonlocal received, finished
        while (event := await q.get()) is not None:
            if type(event) is DeltaEvent:
                received += event.n
        finished += 1
        if finished == m:
            done.set()

    async def produce(i: int, q: asyncio.Queue[Event | None]) -> None:
        # The same typed events the bus's writer builds (numbered, stamped).
        stream = f"u{i}"
        q.put_nowait(StartEvent(stream=stream, seq=0, ts=time.time()))
        await go.wait()
        for k in range(tokens):
            q.put_nowait(DeltaEvent(stream=stream, seq=k + 1, ts=time.time(), text=TOKEN))
            await asyncio.sleep(0)
        q.put_nowait(EndEvent(stream=stream, seq=tokens + 1, ts=time.time()))
        q.put_nowait(None)

    tasks = [asyncio.create_task(user(q)) for q in queues]
    tasks += [asyncio.create_task(produce(i, q)) for i, q in enumerate(queues)]
    for _ in range(3):
        await asyncio.sleep(0)
    clock.start()
    go.set()
    await done.wait()
    cpu, wall = clock.stop()
    await asyncio.gather(*tasks)
    assert received == m * tokens
    return received, cpu, wall


async def fanout_bus(streams: int, readers: int, tokens: int, batch: bool) -> tuple[int, float, float]:
    """*streams* concurrent streams of *tokens* deltas each, read by *readers* unfiltered subscribers."""
    go, done, clock = asyncio.Event(), asyncio.Event(), Clock()
    received = finished = 0
    async with Bus() as bus:

        async def reader(sub: Subscription) -> None:
            nonlocal received, finished
            ends = 0
            async with sub:
                if batch:
                    while ends < streams:
                        for event in await sub.receive_batch():
                            if type(event) is DeltaEvent:
                                received += event.n
                            elif type(event) is EndEvent:
                                ends += 1
                else:
                    async for event in sub:
                        if type(event) is DeltaEvent:
                            received += event.n
                        elif type(event) is EndEvent:
                            ends += 1
                            if ends == streams:
                                break
            finished += 1
            if finished == readers:
                done.set()

        async def produce(i: int) -> None:
            async with bus.stream(stream=f"s{i}") as w:
                await go.wait()
                for _ in range(tokens):
                    await w.delta(TOKEN)
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(reader(bus.subscribe())) for _ in range(readers)]
        tasks += [asyncio.create_task(produce(i)) for i in range(streams)]
        for _ in range(3):
            await asyncio.sleep(0)
        clock.start()
        go.set()
        await done.wait()
        cpu, wall = clock.stop()
        await asyncio.gather(*tasks)
    assert received == streams * tokens * readers, (received, streams * tokens * readers)
    return received, cpu, wall


async def fanout_queue(streams: int, readers: int, tokens: int, batch: bool = False) -> tuple[int, float, float]:
    go, done, clock = asyncio.Event(), asyncio.Event(), Clock()
    received = finished = 0
    queues: list[asyncio.Queue[Event | None]] = [asyncio.Queue() for _ in range(readers)]

    async def reader(q: asyncio.Queue[Event | None]) -> None:
        nonlocal received, finished
        ends = 0
        while ends < streams:
            event = await q.get()
            if type(event) is DeltaEvent:
                received += event.n
            elif type(event) is EndEvent:
                ends += 1
        finished += 1
        if finished == readers:
            done.set()

    async def produce(i: int) -> None:
        stream = f"s{i}"
        await go.wait()
        for k in range(tokens):
            event = DeltaEvent(stream=stream, seq=k + 1, ts=time.time(), text=TOKEN)
            for q in queues:
                q.put_nowait(event)
            await asyncio.sleep(0)
        end = EndEvent(stream=stream, seq=tokens + 1, ts=time.time())
        for q in queues:
            q.put_nowait(end)

    tasks = [asyncio.create_task(reader(q)) for q in queues]
    tasks += [asyncio.create_task(produce(i)) for i in range(streams)]
    for _ in range(3):
        await asyncio.sleep(0)
    clock.start()
    go.set()
    await done.wait()
    cpu, wall = clock.stop()
    await asyncio.gather(*tasks)
    assert received == streams * tokens * readers
    return received, cpu, wall


def cpu_per_delivery(fn: Workload, *args: object) -> float:
    """Run one workload in a fresh loop, after a full collection; return CPU seconds per delivery."""
    gc.collect()
    delivered, cpu, _ = asyncio.run(fn(*args))
    return cpu / delivered


Workload = Callable[..., Coroutine[Any, Any, tuple[int, float, float]]]


def alternate(rounds: int, systems: dict[str, tuple[Workload, tuple[object, ...]]]) -> dict[str, float]:
    """Run the systems in turn for *rounds*; return each one's lowest CPU seconds per delivery."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (fn, args) in systems.items():
            cost = cpu_per_delivery(fn, *args)
            best[name] = min(best.get(name, cost), cost)
    return best


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def per_user_section(quick: bool) -> list[str]:
    total = 30_000 if quick else 60_000
    rounds = 2 if quick else 5  # the shared machine swings by 30% from run to run
    lines = [
        "## Per-user streams (the commonest pattern)",
        "",
        f"M concurrent streams, each read by its own subscriber `bus.subscribe(Filter.of(streams=id))`, "
        f"each producer a `bus.stream()` writer yielding to the loop after every token; {total:,} tokens in all "
        "(at least 30 per stream) "
        f"per run. Peer: one `asyncio.Queue` per user fed the same typed events. Lowest CPU time of {rounds} "
        "alternating runs; tokens/s = tokens / CPU seconds.",
        "",
        "| concurrent users M | Queue-per-user tokens/s | bus tokens/s | bus / Queue | bus CPU µs per token |",
        "|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[int, float] = {}
    cost: dict[int, float] = {}
    for m in PER_USER_SIZES:
        tokens = per_user_tokens(m, quick)
        best = alternate(rounds, {"queue": (per_user_queue, (m, tokens)), "bus": (per_user_bus, (m, tokens))})
        ratios[m] = best["queue"] / best["bus"]
        cost[m] = best["bus"]
        print(f"per-user M={m}: queue {1 / best['queue']:,.0f}/s bus {1 / best['bus']:,.0f}/s", flush=True)
        queue_rate, bus_rate = 1 / best["queue"], 1 / best["bus"]
        lines.append(f"| {m:,} | {queue_rate:,.0f} | {bus_rate:,.0f} | {ratios[m]:.2f}x | {best['bus'] * 1e6:.2f} |")
    flat = cost[PER_USER_SIZES[-1]] / cost[PER_USER_SIZES[0]]
    lines += [
        "",
        f"Goal: at least 0.8x Queue-per-user at every M — {verdict(min(ratios.values()) >= 0.8)} "
        f"(lowest {min(ratios.values()):.2f}x). CPU per token at M = 10,000 at most 1.5x its value at M = 10 — "
        f"{verdict(flat <= 1.5)} ({flat:.2f}x).",
    ]
    return lines


def fanout_section(quick: bool) -> list[str]:
    deliveries = 50_000 if quick else 150_000
    rounds = 2 if quick else 4
    lines = [
        "## Token-stream fan-out",
        "",
        f"S concurrent streams read by K unfiltered subscribers, each producer a `bus.stream()` writer yielding "
        f"after every token; {deliveries:,} deliveries (tokens x K) per run. Peer: one `asyncio.Queue` per "
        f"reader, fed by the same producers. Lowest CPU time of {rounds} alternating runs; "
        "deliveries/s = deliveries / CPU seconds.",
        "",
        "| streams S | readers K | Queue deliveries/s | `async for` | ratio | `receive_batch` | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals: list[bool] = []
    for streams, readers in FANOUT_SHAPES:
        tokens = fanout_tokens(streams, readers, quick)
        best = alternate(
            rounds,
            {
                "queue": (fanout_queue, (streams, readers, tokens)),
                "iter": (fanout_bus, (streams, readers, tokens, False)),
                "batch": (fanout_bus, (streams, readers, tokens, True)),
            },
        )
        it, bt = best["queue"] / best["iter"], best["queue"] / best["batch"]
        goals.append(it >= (1.0 if readers == 1 else 1.5))
        if readers == 100:
            goals.append(bt >= 3.0)
        print(f"fan-out S={streams} K={readers}: async for {it:.2f}x, receive_batch {bt:.2f}x", flush=True)
        lines.append(
            f"| {streams} | {readers} | {1 / best['queue']:,.0f} | {1 / best['iter']:,.0f} | {it:.2f}x "
            f"| {1 / best['batch']:,.0f} | {bt:.2f}x |"
        )
    lines += [
        "",
        "Goals, for both S: `async for` at least 1.0x the Queue at K = 1 and 1.5x at K = 10 and 100; "
        f"`receive_batch` at least 3x at K = 100 — {verdict(all(goals))} "
        f"({sum(goals)} of {len(goals)} rows met).",
    ]
    return lines


class _Samples:
    """What a paced per-user run's readers report: each token's latency, and when all streams started."""

    def __init__(self, users: int, tokens: int) -> None:
        self.users, self.tokens = users, tokens
        self.lat: list[float] = []
        self.started = 0
        self.live = asyncio.Event()  # every reader took its stream's start
        self.read = asyncio.Event()  # every token was read

    def start(self) -> None:
        self.started += 1
        if self.started == self.users:
            self.live.set()

    def token(self, ts: float) -> None:
        self.lat.append(time.perf_counter() - ts)
        if len(self.lat) == self.tokens:
            self.read.set()


async def paced_users_bus(m: int, total: int, rate: float) -> list[float]:
    samples = _Samples(m, total)
    async with Bus() as bus:

        async def user(sub: Subscription) -> None:
            async for event in sub:
                if type(event) is DeltaEvent:
                    samples.token(event.ts)
                elif type(event) is StartEvent:
                    samples.start()

        tasks = [asyncio.create_task(user(bus.subscribe(Filter.of(streams=f"u{i}")))) for i in range(m)]
        await _paced_users(samples, rate, bus.publish)
        for sub in bus.subscriptions:
            sub.close()
        await asyncio.gather(*tasks)
    return samples.lat


async def paced_users_queue(m: int, total: int, rate: float) -> list[float]:
    samples = _Samples(m, total)
    queues: list[asyncio.Queue[Event | None]] = [asyncio.Queue() for _ in range(m)]
    index = {f"u{i}": q for i, q in enumerate(queues)}

    async def user(q: asyncio.Queue[Event | None]) -> None:
        while (event := await q.get()) is not None:
            if type(event) is DeltaEvent:
                samples.token(event.ts)
            elif type(event) is StartEvent:
                samples.start()

    async def publish(event: Event) -> None:
        index[event.stream].put_nowait(event)

    tasks = [asyncio.create_task(user(q)) for q in queues]
    await _paced_users(samples, rate, publish)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    return samples.lat


async def _paced_users(samples: _Samples, rate: float, publish: Callable[[Event], Awaitable[None]]) -> None:
    # The same for both systems: every user's stream starts and is live (its reader took the start)
    # before the first token, so the samples are of live streams, not of 1,000 readers waking for
    # their starts at once; one token every 1/rate seconds, round robin over the streams; every
    # token read before the streams end, so no sample waits behind the ends' publishing.
    m, total = samples.users, samples.tokens
    for i in range(m):
        await publish(StartEvent(stream=f"u{i}", seq=0, ts=0.0))
    async with asyncio.timeout(30):  # a reader that never took its start: fail, do not hang
        await samples.live.wait()
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(total):
        target = start + i * interval
        now = time.perf_counter()
        if target > now:
            await asyncio.sleep(target - now)
        await publish(DeltaEvent(stream=f"u{i % m}", seq=i // m + 1, ts=time.perf_counter(), text=TOKEN))
    async with asyncio.timeout(30):  # a token never read: fail, do not hang
        await samples.read.wait()
    for i in range(m):
        await publish(EndEvent(stream=f"u{i}", seq=total // m + 2, ts=0.0))


def paced_users_section(quick: bool) -> list[str]:
    m, total, rate = 1_000, (5_000 if quick else 20_000), 10_000.0
    rounds = 1 if quick else 5  # one run's p99 swings by 20% or more either way here (docs/decisions.md)
    figures: dict[str, list[tuple[float, float, float]]] = {"bus": [], "queue": []}
    for _ in range(rounds):
        for name, fn in (("queue", paced_users_queue), ("bus", paced_users_bus)):
            gc.collect()  # each run starts clean: the last run's garbage must not time this one's full collection
            lat = asyncio.run(fn(m, total, rate))
            figures[name].append((pct(lat, 0.5), pct(lat, 0.99), max(lat)))
    med = {name: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for name, runs in figures.items()}
    ok = med["bus"][1] <= med["queue"][1] * 1.1
    print(f"paced users: bus p99 {med['bus'][1] * 1e6:.0f}us queue p99 {med['queue'][1] * 1e6:.0f}us", flush=True)
    return [
        "",
        f"Latency with {m:,} live per-user streams: {total:,} tokens paced at {rate:,.0f}/s in all, round robin "
        f"over the streams, each stream read by its own filtered subscriber (the peer: a queue per user); both "
        "systems start every stream and let each reader take its start before the first token, and read every "
        "token before the streams end, so each sample is of a live stream; a full collection before each run; "
        f"median over {rounds} alternating rounds.",
        "",
        "| system | p50 (µs) | p99 (µs) | max (µs) | p99 of every round (µs) |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {label} | {med[key][0] * 1e6:,.0f} | {med[key][1] * 1e6:,.0f} | {med[key][2] * 1e6:,.0f} "
            f"| {', '.join(f'{r[1] * 1e6:.0f}' for r in figures[key])} |"
            for key, label in (
                ("bus", "streambus, a filtered subscriber per user"),
                ("queue", "asyncio.Queue per user"),
            )
        ),
        "",
        f"Goal: p99 no worse than Queue-per-user's (within 10% measurement noise) — {verdict(ok)}.",
    ]


async def mem_per_user(n: int) -> tuple[float, float]:
    """Bytes per idle filtered subscriber, then per live stream, with *n* of each."""
    ids = [f"u{i}" for i in range(n)]
    async with Bus() as bus:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        subs = [bus.subscribe(Filter.of(streams=stream)) for stream in ids]
        with_subs = tracemalloc.get_traced_memory()[0]
        writers = [bus.stream(stream=stream) for stream in ids]
        for w in writers:
            await w.__aenter__()
        with_streams = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        for w in reversed(writers):  # writers nest like `async with` blocks
            await w.__aexit__(None, None, None)
        for sub in subs:
            sub.close()
    return (with_subs - base) / n, (with_streams - with_subs) / n


async def mem_queue_per_user(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    queues = [asyncio.Queue[Event]() for _ in range(n)]
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del queues
    return used / n


def memory_section() -> list[str]:
    n = 10_000
    per_sub, per_stream = asyncio.run(mem_per_user(n))
    per_queue = asyncio.run(mem_queue_per_user(n))
    print(f"memory: {per_sub:.0f} B per idle subscriber, {per_stream:.0f} B per live stream", flush=True)
    return [
        "",
        f"Memory at {n:,} users (tracemalloc): {n:,} idle subscribers `Filter.of(streams=id)`, then one live "
        "stream each (an entered `bus.stream()` writer; its `start` buffered in its subscriber).",
        "",
        "| what | bytes each |",
        "|---|---:|",
        f"| idle filtered subscriber | {per_sub:,.0f} |",
        f"| live stream (writer, start event, routing entry) | {per_stream:,.0f} |",
        f"| peer: an idle `asyncio.Queue` | {per_queue:,.0f} |",
    ]


_TABLE = "-- table --"  # a section run alone prints this line before its table


def section_alone(name: str, quick: bool) -> list[str]:
    """Run one token-stream section in a fresh interpreter; echo its progress, return its table.

    Each table starts from the same clean heap for the bus and its peer: run
    in one process after the per-user table's 10,000 subscribers, the fan-out
    S = 100, K = 1 row measured 0.99-1.02x, 1.02-1.03x alone (docs/decisions.md).
    """
    args = [sys.executable, __file__, name, *(["--quick"] if quick else [])]
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout  # a failure's traceback shows
    progress, table = out.split(_TABLE + "\n", 1)
    print(progress, end="", flush=True)
    return table.rstrip("\n").split("\n")


def main() -> None:
    quick = "--quick" in sys.argv
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    if only:  # e.g. `python bench/bench_core.py per_user fanout --quick`, printed, nothing written
        sections = {"per_user": per_user_section, "fanout": fanout_section, "paced": paced_users_section}
        unknown = [name for name in only if name not in {*sections, "memory"}]
        if unknown:
            named = ", ".join(map(repr, unknown))
            sys.exit(f"bench_core.py: unknown section {named}; choose from per_user, paced, memory, fanout")
        for name in only:
            table = memory_section() if name == "memory" else sections[name](quick)
            print(_TABLE, *table, sep="\n", flush=True)
        return
    token_lines = [*section_alone("per_user", quick), *section_alone("paced", quick), *section_alone("memory", quick)]
    token_lines += ["", *section_alone("fanout", quick), ""]
    n_events = 20_000 if quick else 100_000
    runs = 1 if quick else 2
    lines = [
        *token_lines,
        "## Core bus: burst fan-out",
        "",
        f"Throughput: {n_events:,} delta events published in one loop (yielding every {YIELD_EVERY}), "
        f"best of {runs} runs, deliveries/s = events x subscribers / CPU seconds until every subscriber saw the last "
        "one (CPU time: the machine is shared).",
        "",
        "| system | 1 subscriber | 10 subscribers | 100 subscribers |",
        "|---|---:|---:|---:|",
    ]
    results: dict[str, dict[int, float]] = {}
    for name, fn in SYSTEMS.items():
        row = {}
        for subs in (1, 10, 100):
            events = make_events(n_events if subs < 100 else n_events // 5)
            if name == "pyee AsyncIOEventEmitter" or name == "broadcaster (memory)":
                events = events[: len(events) // 5]  # a task per delivery: keep the run bounded
            elapsed = best_of(fn, events, subs, runs)
            row[subs] = len(events) * subs / elapsed
            print(f"{name:<36} subs={subs:<4} {row[subs]:>14,.0f} deliveries/s", flush=True)
        results[name] = row
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:,.0f}" for s in (1, 10, 100)) + " |")

    sb = {s: max(results["streambus (async for)"][s], results["streambus (receive_batch)"][s]) for s in (1, 10, 100)}
    naive = results["naive asyncio.Queue fan-out"]
    pyee = results["pyee EventEmitter (sync callbacks)"]
    lines += [
        "",
        "| ratio (streambus best / peer) | 1 | 10 | 100 |",
        "|---|---:|---:|---:|",
        "| vs naive asyncio.Queue | " + " | ".join(f"{sb[s] / naive[s]:.2f}x" for s in (1, 10, 100)) + " |",
        "| vs pyee sync callbacks | " + " | ".join(f"{sb[s] / pyee[s]:.2f}x" for s in (1, 10, 100)) + " |",
        "",
    ]
    goal_q = all(sb[s] >= 3 * naive[s] for s in (10, 100))
    goal_p = all(sb[s] >= 0.5 * pyee[s] for s in (10, 100))
    lines.append(
        f"Goal at 10 and 100 subscribers: >= 3x naive asyncio.Queue — {'met' if goal_q else 'NOT met'}; "
        f"within 2x of pyee sync callbacks — {'met' if goal_p else 'NOT met'}."
    )

    total, rate, subs = (5_000 if quick else 20_000), 10_000.0, 10
    # p99 of one run swings by 20% or more either way here: alternate the systems over five
    # rounds, each after a full collection, and report the median of each figure.
    rounds = 1 if quick else 5
    lines += [
        "",
        f"Latency: {total:,} events paced at {rate:,.0f} events/s to {subs} subscribers, publish-to-receive; "
        f"a full collection before each run; median over {rounds} alternating rounds per system.",
        "",
        "| system | p50 (µs) | p99 (µs) | max (µs) |",
        "|---|---:|---:|---:|",
    ]
    systems = (
        ("streambus", lat_streambus),
        ("naive asyncio.Queue fan-out", lat_queue),
        ("anyio memory object streams", lat_anyio),
    )
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in systems}
    for _ in range(rounds):
        for name, lfn in systems:
            gc.collect()
            lat = asyncio.run(lfn(total, rate, subs))
            figures[name].append((pct(lat, 0.5), pct(lat, 0.99), max(lat)))
            print(f"latency {name}: p50={pct(lat, 0.5) * 1e6:.0f}us p99={pct(lat, 0.99) * 1e6:.0f}us", flush=True)
    lat_results: dict[str, tuple[float, float, float]] = {}
    for name, _ in systems:
        measured = figures[name]
        p50, p99, worst = (statistics.median(r[i] for r in measured) for i in range(3))
        lat_results[name] = (p50, p99, worst)
        lines.append(f"| {name} | {p50 * 1e6:,.0f} | {p99 * 1e6:,.0f} | {worst * 1e6:,.0f} |")
    ok = lat_results["streambus"][1] <= lat_results["naive asyncio.Queue fan-out"][1] * 1.1
    lines.append("")
    lines.append(
        "Goal: streambus p99 no worse than asyncio.Queue's (within 10% measurement noise) — "
        + ("met." if ok else "NOT met.")
    )

    mem_events = make_events(100_000, streams=10)
    used_sb, held_sb = asyncio.run(mem_streambus(mem_events))
    used_q, held_q = asyncio.run(mem_queue(mem_events))
    lines += [
        "",
        "Memory held by a stalled subscriber after 100,000 deltas of 4 characters on 10 streams:",
        "",
        "| system | items held | memory (KiB) |",
        "|---|---:|---:|",
        f"| streambus `coalesce` (buffer 1024) | {held_sb:,} | {used_sb / 1024:,.0f} |",
        f"| naive unbounded asyncio.Queue | {held_q:,} | {used_q / 1024:,.0f} |",
        "",
        "The coalescing subscriber keeps every character (merged deltas) in a bounded number of items; "
        "the events themselves are shared with the publisher, so the queue's figure counts only its slots.",
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
