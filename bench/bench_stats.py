"""Stats benchmark: what the stats sink costs the bus on the workloads users run, and quantile accuracy.

1. The bus with and without the ``stats`` sink, side by side in one run (asyncio), on the
   token-stream workloads of ``bench_core.py`` (producers are ``bus.stream()`` writers that
   yield to the loop after every token, as a network stream does):

   - per-user: M concurrent streams, each read by its own filtered subscriber
     (``Filter.of(streams=id)``, ``async for``);
   - fan-out: S concurrent streams read by K unfiltered subscribers, ``async for`` and
     ``receive_batch`` readers each;
   - burst (reported, not a goal): pre-built events published in one loop that yields
     every 64 events, to 10 ``receive_batch`` readers.

   The per-user and fan-out rows and their token counts are ``bench_core.py``'s own
   (``PER_USER_SIZES``, ``per_user_tokens``, ``FANOUT_SHAPES``, ``fanout_tokens``): the goal
   is set on that benchmark's workloads. A fan-out row whose run would take under 100 ms of
   CPU runs its S streams in consecutive waves of the same shape (``fanout_waves``), so that
   a run spans many of the sink's batched reads.

   Each run is timed in CPU seconds of this process (the bus is one thread) from the moment
   every producer and reader is in place until every reader and the stats sink saw the last
   event. A row is several rounds of one run without and one with the sink, back to back in
   alternating order; the kept share is the median of the rounds' ratios (the machine is
   shared and its speed drifts, so only runs a moment apart compare well).
   Goal: with the sink attached the bus keeps >= 90% of its throughput on every per-user
   and fan-out row.
2. The aggregator alone: CPU nanoseconds per event of ``StatsAggregator.feed_many``.
3. Quantile accuracy against exact quantiles (the sorted samples) on 1,000,000 values of four
   distributions, for this plugin's ``Distribution``, ``ddsketch.DDSketch`` fed with its own
   ``add`` and ``hdrhistogram`` (if installed); and whether 4 merged distributions equal the
   distribution of the union.

Writes ``bench/results/stats.md``. ``--quick`` for a smoke run.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench_core import FANOUT_SHAPES, PER_USER_SIZES, fanout_tokens, per_user_tokens
from ddsketch import DDSketch
from streambus_stats import COMPILED, Distribution, StatsAggregator, StatsSink

from streambus import Bus, DeltaEvent, EndEvent, Event, Filter, StartEvent, Subscription, Usage, configure_logging

try:
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
except ImportError:  # the peer is in streambus-stats[test]; the rest of the benchmark runs without it
    HdrHistogram = None

OUT = Path(__file__).resolve().parent / "results" / "stats.md"
TOKEN = "tok "
QUANTILES = (0.5, 0.9, 0.99, 0.999)

Run = tuple[float, float]
"""(CPU seconds, wall seconds) of one measured window."""


class Window:
    """Times a run: CPU and wall clock from :meth:`start` until the readers and the stats sink are done."""

    def __init__(self, bus: Bus, with_stats: bool, events: int) -> None:
        self.events = events
        self.sink: StatsSink | None = None
        if with_stats:
            self.sink = StatsSink(interval=0, tokenizer="approx")
            bus.add_sink(self.sink)

    def start(self) -> None:
        gc.collect()
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    async def stop(self) -> Run:
        if self.sink is not None:  # the sink may be in its pause between reads: wait until it read everything
            while self.sink.aggregator.events < self.events:  # noqa: ASYNC110 (the sink signals nothing per read)
                await asyncio.sleep(0.001)
        return time.process_time() - self.cpu0, time.perf_counter() - self.wall0

    def check(self, streams: int) -> None:
        if self.sink is not None:
            finished = self.sink.aggregator.aggregate().finished
            assert finished == streams, f"the stats sink saw {finished} of {streams} streams end"


async def per_user(m: int, tokens: int, with_stats: bool) -> Run:
    """M streams of *tokens* deltas, each read by its own filtered subscriber."""
    go, done = asyncio.Event(), asyncio.Event()
    received = finished = 0
    async with Bus() as bus:
        window = Window(bus, with_stats, m * (tokens + 2))

        async def user(sub: Subscription) -> None:
            nonlocal received, finished
            async with sub:
                async for event in sub:
                    if type(event) is DeltaEvent:
                        received += 1
                    elif type(event) is EndEvent:
                        break
            finished += 1
            if finished == m:
                done.set()

        async def produce(i: int) -> None:
            async with bus.stream(stream=f"u{i}", model="m", provider="bench") as w:
                await go.wait()
                for _ in range(tokens):
                    await w.delta(TOKEN)
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(user(bus.subscribe(Filter.of(streams=f"u{i}")))) for i in range(m)]
        tasks += [asyncio.create_task(produce(i)) for i in range(m)]
        for _ in range(3):
            await asyncio.sleep(0)
        window.start()
        go.set()
        await done.wait()
        run = await window.stop()
        await asyncio.gather(*tasks)
    window.check(m)
    assert received == m * tokens, (received, m * tokens)
    return run


async def fanout(streams: int, readers: int, tokens: int, batch: bool, with_stats: bool, waves: int = 1) -> Run:
    """S concurrent streams of *tokens* deltas each, read by K unfiltered subscribers (``receive_batch`` if *batch*).

    With *waves*, each of the S producers runs that many streams one after the other: the same
    shape (S streams live at once, *tokens* each), for longer.
    """
    go, done = asyncio.Event(), asyncio.Event()
    received = finished = 0
    total = streams * waves
    async with Bus() as bus:
        window = Window(bus, with_stats, total * (tokens + 2))

        async def reader(sub: Subscription) -> None:
            nonlocal received, finished
            ends = 0
            async with sub:
                if batch:
                    while ends < total:
                        for event in await sub.receive_batch():
                            if type(event) is DeltaEvent:
                                received += 1
                            elif type(event) is EndEvent:
                                ends += 1
                else:
                    async for event in sub:
                        if type(event) is DeltaEvent:
                            received += 1
                        elif type(event) is EndEvent:
                            ends += 1
                            if ends == total:
                                break
            finished += 1
            if finished == readers:
                done.set()

        async def produce(i: int) -> None:
            for wave in range(waves):
                async with bus.stream(stream=f"s{i}-{wave}", model="m", provider="bench") as w:
                    if wave == 0:
                        await go.wait()  # the first streams start before the clock, as in bench_core.py
                    for _ in range(tokens):
                        await w.delta(TOKEN)
                        await asyncio.sleep(0)

        tasks = [asyncio.create_task(reader(bus.subscribe())) for _ in range(readers)]
        tasks += [asyncio.create_task(produce(i)) for i in range(streams)]
        for _ in range(3):
            await asyncio.sleep(0)
        window.start()
        go.set()
        await done.wait()
        run = await window.stop()
        await asyncio.gather(*tasks)
    window.check(total)
    assert received == total * tokens * readers
    return run


MIN_RUN_CPU = 0.1
"""CPU seconds a fan-out run takes at least (see :func:`fanout_waves`)."""


def fanout_waves(streams: int, readers: int, tokens: int, batch: bool, quick: bool = False) -> int:
    """How many streams each fan-out producer runs in turn, so a run takes at least ``MIN_RUN_CPU``.

    The stats sink reads in batches up to ``read_pause`` (10 ms) apart, so a run of a few
    milliseconds (S = 100, K = 100, ``receive_batch``: 1,500 tokens in 8 ms) times one or two of
    its reads, and the rounds' ratios spread over 15 points. Consecutive waves keep the row's
    shape (S streams live at once, *tokens* each) and make the run long enough to time the
    sink's steady cost. One run of a single wave without the sink sets the count.
    """
    if quick:
        return 1
    cpu, _ = asyncio.run(fanout(streams, readers, tokens, batch, False))
    return max(1, math.ceil(MIN_RUN_CPU / cpu))


def make_events(n: int, streams: int = 100) -> list[Event]:
    """*streams* concurrent streams interleaved round-robin: start, deltas about 20 ms apart, end with usage."""
    rng = random.Random(1)
    per_stream = max(n // streams - 2, 1)
    clock = [1000.3 + s * 0.001 for s in range(streams)]
    events: list[Event] = [
        StartEvent(stream=f"s{s}", seq=0, ts=1000.0 + s * 0.001, model=f"m{s % 3}", provider="bench")
        for s in range(streams)
    ]
    for k in range(1, per_stream + 1):
        for s in range(streams):
            clock[s] += rng.lognormvariate(math.log(0.02), 0.3)  # gaps spread over some 60 sketch bins
            events.append(DeltaEvent(stream=f"s{s}", seq=k, ts=clock[s], text=TOKEN))
    for s in range(streams):
        usage = Usage(prompt_tokens=10, completion_tokens=per_stream, total_tokens=per_stream + 10)
        events.append(EndEvent(stream=f"s{s}", seq=per_stream + 1, ts=clock[s] + 0.1, usage=usage))
    return events


async def burst(events: list[Event], readers: int, with_stats: bool) -> Run:
    """Pre-built *events* published in one loop (yielding every 64) to *readers* ``receive_batch`` readers."""
    done = asyncio.Event()
    finished = 0
    async with Bus(buffer=4096, overflow="block") as bus:
        window = Window(bus, with_stats, len(events))

        async def reader(sub: Subscription) -> None:
            nonlocal finished
            seen = 0
            async with sub:
                while seen < len(events):
                    seen += len(await sub.receive_batch())
            finished += 1
            if finished == readers:
                done.set()

        tasks = [asyncio.create_task(reader(bus.subscribe(overflow="block"))) for _ in range(readers)]
        await asyncio.sleep(0)
        window.start()
        publish = bus.publish
        for i, event in enumerate(events):
            await publish(event)
            if i % 64 == 0:
                await asyncio.sleep(0)
        await done.wait()
        run = await window.stop()
        await asyncio.gather(*tasks)
    window.check(100)
    return run


Workload = Callable[[bool], Coroutine[Any, Any, Run]]


def paired(workload: Workload, rounds: int) -> list[tuple[Run, Run]]:
    """*rounds* pairs of runs (without, with the sink) back to back, in alternating order, after a warm-up pair."""
    asyncio.run(workload(False))
    asyncio.run(workload(True))
    pairs = []
    for r in range(rounds):
        runs: dict[bool, Run] = {}
        for with_stats in (False, True) if r % 2 == 0 else (True, False):
            runs[with_stats] = asyncio.run(workload(with_stats))
        pairs.append((runs[False], runs[True]))
    return pairs


def row(label: str, tokens: int, pairs: list[tuple[Run, Run]], waves: int = 1) -> tuple[str, float]:
    ratios = [without[0] / with_[0] for without, with_ in pairs]
    kept = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    cost_without = statistics.median(without[0] for without, _ in pairs) / tokens * 1e6
    cost_with = statistics.median(with_[0] for _, with_ in pairs) / tokens * 1e6
    waves_text = f" ({waves} waves)" if waves > 1 else ""
    kept_wall = statistics.median(without[1] / with_[1] for without, with_ in pairs)
    print(f"{label}: kept {kept:.1%} (IQR {q1:.1%}-{q3:.1%}), {cost_without:.2f} / {cost_with:.2f} µs", flush=True)
    return (
        f"| {label} | {tokens:,}{waves_text} | {cost_without:.2f} / {cost_with:.2f} "
        f"| {(cost_with - cost_without) * 1000:,.0f} ns "
        f"| **{kept:.1%}** | {q1:.1%} to {q3:.1%} | {kept_wall:.0%} |"
    ), kept


def overhead(quick: bool) -> list[str]:
    # The host's speed swings 20-30% from run to run: 9 rounds left a row's median about 4 points wide.
    rounds = 3 if quick else 25
    lines = [
        "## Stats sink: overhead on the workloads users run, and quantile accuracy",
        "",
        "The token-stream workloads of `bench_core.py`, with its rows and token counts (each producer a "
        "`bus.stream()` writer yielding to the loop after every token): per-user, M streams each read by its own "
        "filtered subscriber (`Filter.of(streams=id)`), "
        "60,000 tokens in all and at least 30 per stream; fan-out, S streams read by K unfiltered subscribers, "
        "`async for` or `receive_batch`, 150,000 deliveries (tokens x K) per wave of S streams; a row whose wave takes "
        f"under {MIN_RUN_CPU * 1000:.0f} ms of CPU runs that many waves in a row (each producer starts its next stream "
        "when its last one ends), so that a run spans many of the sink's batched reads (up to 10 ms apart; the "
        "S = 100, K = 100 row's single wave took 8 ms and its rounds' ratios spread over 15 points). "
        "Burst: 100 interleaved streams of pre-built events published in one loop yielding every 64 events, "
        "to 10 `receive_batch` readers (reported, not a goal). Each row: "
        f'{rounds} rounds of one run without and one with the `stats` sink (default options, `tokenizer="approx"`), '
        "back to back in alternating order, timed in CPU seconds of the process from the first token until every "
        "reader and the sink saw the last event; kept = the median of the rounds' ratios (CPU without / CPU with).",
        "",
        "| workload | tokens | CPU µs per token, without / with stats (median) | added per token | kept "
        "| interquartile range | kept (wall clock) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    goals: dict[str, float] = {}
    for m in PER_USER_SIZES:
        tokens = per_user_tokens(m, quick)
        label = f"per-user, M = {m:,}"
        pairs = paired(functools.partial(per_user, m, tokens), rounds)
        text, goals[label] = row(label, m * tokens, pairs)
        lines.append(text)
    for streams, readers in FANOUT_SHAPES:
        tokens = fanout_tokens(streams, readers, quick)
        for batch in (False, True):
            waves = fanout_waves(streams, readers, tokens, batch, quick)
            label = f"fan-out, S = {streams}, K = {readers}, {'`receive_batch`' if batch else '`async for`'}"
            pairs = paired(functools.partial(fanout, streams, readers, tokens, batch, waves=waves), rounds)
            text, goals[label] = row(label, streams * tokens * waves, pairs, waves)
            lines.append(text)
    events = make_events(20_000 if quick else 80_000)
    pairs = paired(functools.partial(burst, events, 10), rounds)
    text, _ = row("burst, 10 `receive_batch` readers", len(events), pairs)
    lines.append(text)
    short = [f"{label} ({kept:.1%})" for label, kept in goals.items() if kept < 0.9]
    lines += [
        "",
        "Goal: with the stats sink attached the bus keeps >= 90% of its throughput on every per-user and fan-out "
        f"row — {'met' if not short else 'NOT met; short: ' + ', '.join(short)} "
        f"(lowest {min(goals.values()):.1%}).",
    ]
    return lines


def feed_cost(quick: bool) -> list[str]:
    """CPU nanoseconds per event of StatsAggregator.feed_many, in batches of 1,000 (about what the sink reads)."""
    events = make_events(20_000 if quick else 200_000)
    cost: dict[bool, float] = {}
    for compiled in (True, False) if COMPILED else (False,):
        best = math.inf
        for _ in range(3 if quick else 7):
            agg = StatsAggregator(tokenizer="approx", compiled=compiled)
            t0 = time.process_time()
            for i in range(0, len(events), 1000):
                agg.feed_many(events[i : i + 1000])
            best = min(best, time.process_time() - t0)
        cost[compiled] = best / len(events) * 1e9
    print(f"aggregator: {cost} ns per event (compiled: pure)", flush=True)
    compiled_text = (
        f"{cost[True]:,.0f} ns of CPU per event compiled (the sink's default), {cost[False]:,.0f} with the "
        "pure-Python reference"
        if COMPILED
        else f"{cost[False]:,.0f} ns of CPU per event (pure Python: the compiled path is not built here)"
    )
    return [
        f"The aggregator alone: {compiled_text} (`StatsAggregator.feed_many`, batches of 1,000 "
        "events of 100 interleaved streams, best of several runs; every figure up to date after each batch).",
    ]


def samples(n: int) -> dict[str, list[float]]:
    rng = random.Random(42)
    return {
        "lognormal latency (median 30 ms)": [rng.lognormvariate(math.log(0.03), 0.8) for _ in range(n)],
        "exponential gaps (mean 20 ms)": [rng.expovariate(50.0) for _ in range(n)],
        "Pareto heavy tail (alpha 1.5, from 10 ms)": [rng.paretovariate(1.5) * 0.01 for _ in range(n)],
        "bimodal (cache hit 5 ms / miss 800 ms)": [
            max(rng.gauss(0.005, 0.0005), 1e-4) if rng.random() < 0.8 else max(rng.gauss(0.8, 0.1), 1e-3)
            for _ in range(n)
        ],
    }


def worst_error(estimate: Callable[[float], float], ordered: list[float]) -> float:
    """The largest relative error over QUANTILES against the exact quantile (rank floor(q * (n - 1)))."""
    exact = {q: ordered[math.floor(q * (len(ordered) - 1))] for q in QUANTILES}
    return max(abs(estimate(q) - exact[q]) / exact[q] for q in QUANTILES)


def accuracy(quick: bool) -> list[str]:
    n = 100_000 if quick else 1_000_000
    alpha = 0.01
    lines = [
        f"Quantile accuracy on {n:,} samples: the largest relative error over p50, p90, p99 and p99.9 against the "
        "exact quantile (the sorted samples' value of rank floor(q·(n-1))), and ingest time per value (values "
        f"added in batches of 1,000, as the sink adds a batch's gaps). Relative accuracy setting: {alpha:.0%}.",
        "",
        "| distribution | streambus `Distribution` | ddsketch `DDSketch.add` | hdrhistogram (µs, 2 digits) "
        "| merge of 4 == union |",
        "|---|---:|---:|---:|:---:|",
    ]
    ok = True
    for name, values in samples(n).items():
        ordered = sorted(values)

        dist = Distribution(alpha)
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            dist.add_many(values[i : i + 1000])
        ours_ns = (time.perf_counter() - t0) / n * 1e9
        ours = worst_error(lambda q: dist.quantile(q) or 0.0, ordered)  # noqa: B023 (called at once)

        lib = DDSketch(alpha)
        t0 = time.perf_counter()
        for v in values:
            lib.add(v)
        lib_ns = (time.perf_counter() - t0) / n * 1e9
        theirs = worst_error(lambda q: lib.get_quantile_value(q) or 0.0, ordered)  # noqa: B023

        if HdrHistogram is not None:
            micros = [max(round(v * 1e6), 1) for v in values]
            hdr = HdrHistogram(1, 3_600_000_000, 2)
            t0 = time.perf_counter()
            for v in micros:
                hdr.record_value(v)
            hdr_ns = (time.perf_counter() - t0) / n * 1e9
            hdr_err = worst_error(lambda q: hdr.get_value_at_percentile(q * 100) / 1e6, ordered)  # noqa: B023
            hdr_cell = f"{hdr_err:.3%} ({hdr_ns:,.0f} ns/value)"
        else:
            hdr_cell = "not installed (pip install hdrhistogram)"

        parts = [Distribution(alpha) for _ in range(4)]
        for i, part in enumerate(parts):
            part.add_many(values[i::4])
        merged = parts[0]
        for part in parts[1:]:
            merged.merge(part)
        same = merged == dist
        ok = ok and same and ours <= alpha * (1 + 1e-9)
        lines.append(
            f"| {name} | {ours:.3%} ({ours_ns:,.0f} ns/value) | {theirs:.3%} ({lib_ns:,.0f} ns/value) "
            f"| {hdr_cell} | {'yes' if same else 'NO'} |"
        )
        print(f"{name}: ours {ours:.3%} {ours_ns:.0f} ns, ddsketch {theirs:.3%} {lib_ns:.0f} ns, hdr {hdr_cell}")
    lines += [
        "",
        f"Goal: every quantile within the stated {alpha:.0%} relative error and merges exact — "
        f"{'met' if ok else 'NOT met'}.",
    ]
    return lines


def main() -> int:
    quick = "--quick" in sys.argv
    configure_logging("warning")  # the sink's stats.final lines would drown the results
    lines = [*overhead(quick), "", *feed_cost(quick), "", *accuracy(quick)]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
