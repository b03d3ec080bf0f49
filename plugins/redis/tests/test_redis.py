"""The redis sink and source against the shared Redis (STREAMBUS_REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis
from streambus_redis import AsyncioRequired, Deduplicator, RedisSink, RedisSource, Verdict, encode_entry
from structlog.testing import capture_logs

from streambus import (
    Bus,
    ConfigError,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    SinkFailed,
    StartEvent,
    Usage,
    encode,
    is_terminal,
)
from streambus.config import parse_config
from streambus.recording import write_recording

pytestmark = pytest.mark.anyio


async def produce(bus: Bus, streams: int, deltas: int, meta: dict[str, Any] | None = None) -> list[str]:
    ids = []
    for _ in range(streams):
        async with bus.stream(model="m", provider="p", meta=meta or {}) as w:
            for j in range(deltas):
                await w.delta(f"t{j} ")
            await w.end("stop", usage=Usage(completion_tokens=deltas))
        ids.append(w.stream)
    return ids


def source(url: str, key: str, **kw: Any) -> RedisSource:
    kw.setdefault("start", "$")
    kw.setdefault("position", "none")
    kw.setdefault("consumer", "c1")
    kw.setdefault("block_ms", 200)
    kw.setdefault("commit_interval_ms", 10)
    return RedisSource(url=url, stream=key, **kw)


async def test_round_trip_keeps_stream_seq_and_order(
    redis_url: str, key: str, collector: Any, exactly_once: Any
) -> None:
    async with Bus() as consumer:
        consumer.add_sink(collector)
        src = source(redis_url, key)
        consumer.start_producer(src)
        await src.wait_ready()
        sent: list[Any] = []

        class Tap:
            overflow = "block"

            async def run(self, events: Any) -> None:
                async for e in events:
                    sent.append(e)

        async with Bus() as producer:
            producer.add_sink(RedisSink(url=redis_url, stream=key))
            producer.add_sink(Tap())
            ids = await produce(producer, 3, 20)
        await collector.wait_terminals(3)
        src.stop()
    assert [encode(e) for e in collector.events] == [encode(e) for e in sent]
    per = exactly_once(collector.events)
    assert set(per) == set(ids)
    assert all(seqs == list(range(22)) for seqs in per.values())
    assert src.delivered == 66 and src.duplicates == 0


async def test_several_events_per_entry_and_one_per_entry(redis_url: str, key: str, sync_redis: redis.Redis) -> None:
    async with Bus() as producer:
        packed = RedisSink(url=redis_url, stream=key + ":packed", entry_max_events=50, batch_max_ms=50)
        single = RedisSink(url=redis_url, stream=key + ":single", entry_max_events=1, batch_max_events=1)
        producer.add_sink(packed)
        producer.add_sink(single)
        await produce(producer, 2, 98)
    assert packed.sent_events == single.sent_events == 200
    assert sync_redis.xlen(key + ":single") == 200
    entries = sync_redis.xrange(key + ":packed")
    assert len(entries) == packed.sent_entries < 200
    sizes = [fields[b"e"].count(b"\n") for _, fields in entries]
    assert sum(sizes) == 200 and max(sizes) > 1 and max(sizes) <= 50
    # Each entry says who wrote it, and counts up per writer.
    assert [int(f[b"c"]) for _, f in entries] == list(range(1, len(entries) + 1))


async def test_maxlen_trims_approximately(redis_url: str, key: str, sync_redis: redis.Redis) -> None:
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key, maxlen=100, entry_max_events=1, batch_max_events=50))
        await produce(producer, 10, 98)
    length = sync_redis.xlen(key)
    assert 100 <= length < 1000


async def test_bus_never_reconsumes_its_own_events_nor_echoes_foreign_ones(
    redis_url: str, key: str, sync_redis: redis.Redis, make_collector: Any
) -> None:
    a_seen, b_seen = make_collector(), make_collector()
    async with Bus() as a, Bus() as b:
        # Both buses publish to and read from the same key.
        a.add_sink(a_seen)
        b.add_sink(b_seen)
        a.add_sink(RedisSink(url=redis_url, stream=key))
        b.add_sink(RedisSink(url=redis_url, stream=key))
        src_a, src_b = source(redis_url, key, consumer="a"), source(redis_url, key, consumer="b")
        a.start_producer(src_a)
        b.start_producer(src_b)
        await src_a.wait_ready()
        await src_b.wait_ready()
        await produce(a, 2, 5)
        await b_seen.wait_terminals(2)
        # a saw its own two streams once (locally), never again from Redis.
        assert len(a_seen.events) == 14
        assert src_a.delivered == 0
        await produce(b, 1, 5)
        await a_seen.wait_terminals(3)
        src_a.stop()
        src_b.stop()
    assert len(b_seen.events) == 21 and len(a_seen.events) == 21
    # b did not send a's streams back: the key holds each event once.
    total = sum(f[b"e"].count(b"\n") for _, f in sync_redis.xrange(key))
    assert total == 21


async def test_duplicates_in_redis_reach_sinks_once(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any, exactly_once: Any
) -> None:
    events = [
        StartEvent(stream="s1", seq=0, ts=1.0, model="m"),
        DeltaEvent(stream="s1", seq=1, ts=1.1, text="a"),
        DeltaEvent(stream="s1", seq=2, ts=1.2, text="b"),
        EndEvent(stream="s1", seq=3, ts=1.3),
    ]
    # A sender re-sending entry 1 after a dropped reply; a second sender repeating events.
    sync_redis.xadd(key, encode_entry("o1", "p1", 1, events[:2]))
    sync_redis.xadd(key, encode_entry("o1", "p1", 1, events[:2]))
    sync_redis.xadd(key, encode_entry("o1", "p1", 2, events[1:3]))
    sync_redis.xadd(key, encode_entry("o2", "p2", 1, events))
    sync_redis.xadd(key, encode_entry("o1", "p1", 3, events[3:]))
    async with Bus() as bus:
        bus.add_sink(collector)
        src = source(redis_url, key, start="0")
        bus.start_producer(src)
        await collector.wait_terminals(1)
        src.stop()
    assert [e.seq for e in collector.events] == [0, 1, 2, 3]
    exactly_once(collector.events)
    assert src.duplicates == 2 + 1 + 4


async def test_resumes_from_saved_position_in_redis(
    redis_url: str, key: str, make_collector: Any, exactly_once: Any
) -> None:
    first, second = make_collector(), make_collector()
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key))
        old = await produce(producer, 2, 5)
    async with Bus() as bus:
        bus.add_sink(first)
        src = source(redis_url, key, start="last", position="redis", consumer="rec")
        bus.start_producer(src)
        await first.wait_terminals(2)
        src.stop()
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key))
        new = await produce(producer, 2, 5)
    async with Bus() as bus:
        bus.add_sink(second)
        src = source(redis_url, key, start="last", position="redis", consumer="rec")
        bus.start_producer(src)
        await second.wait_terminals(2)
        src.stop()
    assert {e.stream for e in first.events} == set(old)
    assert {e.stream for e in second.events} == set(new)
    exactly_once(first.events + second.events)


async def test_resumes_from_position_file(
    redis_url: str, key: str, tmp_path: Path, make_collector: Any, exactly_once: Any
) -> None:
    pos = tmp_path / "pos.json"
    seen = [make_collector() for _ in range(2)]
    for round_ in range(2):
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=redis_url, stream=key))
            await produce(producer, 1, 3)
        async with Bus() as bus:
            bus.add_sink(seen[round_])
            src = source(redis_url, key, start="last", position="file", position_file=str(pos))
            bus.start_producer(src)
            await seen[round_].wait_terminals(1)
            src.stop()
        assert pos.exists()
    assert len(seen[0].events) == len(seen[1].events) == 5
    assert seen[0].events[0].stream != seen[1].events[0].stream
    exactly_once(seen[0].events + seen[1].events)


async def test_start_zero_reads_retained_and_dollar_only_new(redis_url: str, key: str, make_collector: Any) -> None:
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key))
        old = await produce(producer, 1, 2)
    everything, only_new = make_collector(), make_collector()
    async with Bus() as bus, Bus() as producer:
        bus.add_sink(everything)
        bus.add_sink(only_new)
        src0 = source(redis_url, key, start="0", consumer="zero")
        # A second bus for "$" so the two sources do not share a de-duplicator's output.
        async with Bus() as bus2:
            bus2.add_sink(only_new)
            src_new = source(redis_url, key, start="$", consumer="new")
            bus.start_producer(src0)
            bus2.start_producer(src_new)
            await src0.wait_ready()
            await src_new.wait_ready()
            producer.add_sink(RedisSink(url=redis_url, stream=key))
            new = await produce(producer, 1, 2)
            await everything.wait_terminals(2)
            await only_new.wait_for(lambda evs: sum(e.stream in new and is_terminal(e) for e in evs) >= 1)
            src0.stop()
            src_new.stop()
    assert [e.stream for e in everything.events] == old * 4 + new * 4
    assert {e.stream for e in only_new.events} <= set(old) | set(new)
    assert [e for e in only_new.events if e.stream in new] and src_new.delivered == 4


async def test_consumer_group_shares_acks_and_claims_stale_entries(
    redis_url: str, key: str, sync_redis: redis.Redis, make_collector: Any, exactly_once: Any
) -> None:
    group = "recorders"
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key, entry_max_events=4))
        await produce(producer, 4, 6)
    total_entries = sync_redis.xlen(key)
    # A consumer that reads two entries and dies before acknowledging them.
    sync_redis.xgroup_create(key, group, id="0")
    dead = sync_redis.xreadgroup(group, "dead", {key: ">"}, count=2)
    assert len(dead[0][1]) == 2
    c1, c2 = make_collector(), make_collector()
    async with Bus() as b1, Bus() as b2:
        b1.add_sink(c1)
        b2.add_sink(c2)
        s1 = source(redis_url, key, group=group, consumer="r1", claim_idle_ms=1000, count=1)
        s2 = source(redis_url, key, group=group, consumer="r2", claim_idle_ms=1000, count=1)
        b1.start_producer(s1)
        b2.start_producer(s2)
        # Two processes' worth of state in Redis: poll it, bounded.
        with anyio.fail_after(10):
            while len(c1.events) + len(c2.events) < 32:  # noqa: ASYNC110 - two buses, no shared event
                await anyio.sleep(0.01)
        with anyio.fail_after(10):
            while sync_redis.xpending(key, group)["pending"]:  # noqa: ASYNC110 - state inside Redis
                await anyio.sleep(0.02)
        s1.stop()
        s2.stop()
    both = c1.events + c2.events
    assert len(both) == 32
    assert len({(e.stream, e.seq) for e in both}) == 32
    exactly_once(c1.events)
    exactly_once(c2.events)
    assert total_entries > 2


async def test_key_per_namespace(redis_url: str, key: str, sync_redis: redis.Redis, collector: Any) -> None:
    async with Bus() as bus:
        bus.add_sink(collector)
        src = source(redis_url, key, namespaces=["acme"])
        assert src.keys == [key + ":acme"]
        bus.start_producer(src)
        await src.wait_ready()
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=redis_url, stream=key, namespace_tag="tenant"))
            acme = await produce(producer, 1, 2, meta={"tenant": "acme"})
            await produce(producer, 1, 2, meta={"tenant": "other"})
            await produce(producer, 1, 2)
        await collector.wait_terminals(1)
        src.stop()
    assert {e.stream for e in collector.events} == set(acme)
    assert sync_redis.xlen(key + ":acme") and sync_redis.xlen(key + ":other") and sync_redis.xlen(key)


async def test_bad_lines_are_reported_and_good_events_kept(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any
) -> None:
    good = [StartEvent(stream="s", seq=0, ts=1.0), EndEvent(stream="s", seq=2, ts=1.2)]
    payload = encode(good[0]) + b'\n{"type": "delta", "stream": "s", "seq": 1, "ts": 1.1}\n' + encode(good[1]) + b"\n"
    sync_redis.xadd(key, {"x": "not ours"})
    sync_redis.xadd(key, {"o": "o", "p": "p", "c": 1, "e": payload})
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(collector)
            src = source(redis_url, key, start="0")
            bus.start_producer(src)
            await collector.wait_terminals(1)
            src.stop()
    # The start is kept; the stream, missing seq 1, ends with an explicit error instead of a silent hole.
    assert [e.seq for e in collector.events] == [0, 1]
    gap = collector.events[1]
    assert isinstance(gap, ErrorEvent) and gap.kind == "redis_gap" and "1..1" in gap.message
    bad = [entry for entry in logs if entry["event"] == "redis.bad_event"]
    assert bad and bad[0]["line"] == 2 and "text" in bad[0]["error"]
    assert any(entry["event"] == "redis.foreign_entry" for entry in logs)


async def test_restarted_recorder_seeded_from_its_recording_skips_what_it_wrote(
    redis_url: str, key: str, tmp_path: Path, collector: Any
) -> None:
    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key))
        await produce(producer, 2, 3)
    entries = redis.Redis.from_url(redis_url).xrange(key)
    written = [msgspec.json.decode(line) for _, f in entries for line in f[b"e"].splitlines()]
    from streambus import decode

    first_stream = [decode(msgspec.json.encode(e)) for e in written if e["stream"] == written[0]["stream"]]
    rec = tmp_path / "rec.jsonl"
    write_recording(rec, first_stream[:3])  # killed after three events of the first stream
    async with Bus() as bus:
        bus.add_sink(collector)
        src = source(redis_url, key, start="0", seed_recording=str(rec))
        bus.start_producer(src)
        await collector.wait_terminals(2)
        src.stop()
    assert len(collector.events) == 10 - 3
    assert [e.seq for e in collector.events if e.stream == written[0]["stream"]] == [3, 4]


async def test_entry_counter_jump_is_reported_as_gap(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any
) -> None:
    sync_redis.xadd(key, encode_entry("o", "p", 1, [StartEvent(stream="s", seq=0, ts=1.0)]))
    # Entry 2 of sender "p" (seq 1) vanished before this consumer read it.
    sync_redis.xadd(key, encode_entry("o", "p", 3, [DeltaEvent(stream="s", seq=2, ts=1.0, text="x")]))
    sync_redis.xadd(key, encode_entry("o", "p", 4, [EndEvent(stream="s", seq=3, ts=1.0)]))
    async with Bus() as bus:
        bus.add_sink(collector)
        src = source(redis_url, key, start="0")
        bus.start_producer(src)
        await collector.wait_terminals(1)
        src.stop()
    assert len(src.gaps) == 1 and src.gaps[0].lost == 1 and "sender p" in src.gaps[0].how
    assert [type(e).__name__ for e in collector.events] == ["StartEvent", "ErrorEvent"]
    assert collector.events[1].seq == 1


def test_dedup_verdicts() -> None:
    d = Deduplicator(max_ended=2)
    s0 = StartEvent(stream="a", seq=0, ts=0)
    assert d.check(s0) is Verdict.NEW
    assert d.check(s0) is Verdict.DUPLICATE
    assert d.check(DeltaEvent(stream="a", seq=3, ts=0, text="x")) is Verdict.GAP
    assert d.check(DeltaEvent(stream="a", seq=3, ts=0, text="x", first_seq=1)) is Verdict.NEW
    assert d.check(EndEvent(stream="a", seq=4, ts=0)) is Verdict.NEW
    assert d.check(DeltaEvent(stream="a", seq=9, ts=0, text="late")) is Verdict.DUPLICATE
    state = d.snapshot()
    fresh = Deduplicator()
    fresh.restore(state)
    assert fresh.check(EndEvent(stream="a", seq=4, ts=0)) is Verdict.DUPLICATE
    for s in "bcd":
        d.end(s, 1)
    assert not d.knows("a")  # only the last two ended streams are remembered
    with pytest.raises(ValueError, match="max_ended"):
        Deduplicator(max_ended=0)


@pytest.mark.parametrize(
    ("cls", "options", "key_name"),
    [
        (RedisSink, {"maxlen": -1}, "maxlen"),
        (RedisSink, {"batch_max_events": 0}, "batch_max_events"),
        (RedisSink, {"batch_max_ms": -1}, "batch_max_ms"),
        (RedisSink, {"entry_max_events": 0}, "entry_max_events"),
        (RedisSink, {"stream": ""}, "stream"),
        (RedisSource, {"position": "file"}, "position_file"),
        (RedisSource, {"count": 0}, "count"),
        (RedisSource, {"block_ms": 0}, "block_ms"),
        (RedisSource, {"consumer": ""}, "consumer"),
        (RedisSource, {"group": ""}, "group"),
    ],
)
def test_bad_options_name_the_key(cls: Any, options: dict[str, Any], key_name: str) -> None:
    with pytest.raises((ValueError, msgspec.ValidationError), match=key_name):
        cls(**options)


def test_config_file_builds_both_and_names_bad_keys() -> None:
    pipeline = parse_config(
        {
            "producers": [{"type": "redis", "stream": "k", "group": "g", "consumer": "c", "start": "0"}],
            "sinks": [{"type": "redis", "stream": "k", "maxlen": 1000, "batch_max_events": 10, "batch_max_ms": 5}],
        }
    )
    src = pipeline.producers[0]
    assert isinstance(src, RedisSource) and src.options.group == "g" and src.keys == ["k"]
    assert isinstance(pipeline.sinks[0].sink, RedisSink)
    with pytest.raises(ConfigError, match=r"producers\[0\].start"):
        parse_config({"producers": [{"type": "redis", "start": "first"}]})
    with pytest.raises(ConfigError, match=r"sinks\[0\].*maxlen"):
        parse_config({"sinks": [{"type": "redis", "maxlen": -5}]})
    with pytest.raises(ConfigError, match=r"sinks\[0\].bogus"):
        parse_config({"sinks": [{"type": "redis", "bogus": 1}]})


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error(redis_url: str) -> None:
    with pytest.raises(SinkFailed) as info:
        async with Bus() as bus:
            bus.add_sink(RedisSink(url=redis_url), critical=True)
            await bus.wait_stopped()
    assert isinstance(info.value.__cause__, AsyncioRequired)
    assert "asyncio" in str(info.value.__cause__) and "trio" in str(info.value.__cause__)
    async with Bus() as bus:
        with pytest.raises(AsyncioRequired, match='backend="asyncio"'):
            await RedisSource(url=redis_url).run(bus)


async def test_position_is_committed_only_after_lossless_sinks_handled_the_events(
    redis_url: str, key: str, sync_redis: redis.Redis
) -> None:
    release = anyio.Event()
    holding = anyio.Event()
    handled: list[Any] = []

    class SlowRecorder:
        overflow = "block"

        async def run(self, events: Any) -> None:
            while batch := await events.receive_batch():
                holding.set()
                await release.wait()  # e.g. a disk write in progress
                handled.extend(batch)

    async with Bus() as producer:
        producer.add_sink(RedisSink(url=redis_url, stream=key))
        await produce(producer, 1, 3)
    src = source(redis_url, key, start="last", position="redis", consumer="slow", commit_interval_ms=1)
    async with Bus() as bus:
        bus.add_sink(SlowRecorder())
        bus.start_producer(src)
        await holding.wait()
        # The source read everything, but the recorder has not written it: nothing is committed.
        for _ in range(20):
            await anyio.sleep(0.005)  # several commit intervals pass
        assert src.positions[key] != "0-0"
        assert sync_redis.get(src.position_key) is None
        release.set()
        with anyio.fail_after(10):
            while sync_redis.get(src.position_key) is None:  # noqa: ASYNC110 - state inside Redis
                await anyio.sleep(0.005)
        src.stop()
    saved = msgspec.json.decode(sync_redis.get(src.position_key))
    assert saved["positions"][key] == src.positions[key]
    assert len(handled) == 5


async def test_a_lone_event_is_sent_after_batch_max_ms_not_held_for_a_full_batch(
    redis_url: str, key: str, collector: Any
) -> None:
    async with Bus() as consumer:
        consumer.add_sink(collector)
        src = source(redis_url, key)
        consumer.start_producer(src)
        await src.wait_ready()
        async with Bus() as producer:
            producer.add_sink(RedisSink(url=redis_url, stream=key, batch_max_events=1000, batch_max_ms=20))
            async with producer.stream(model="m") as w:
                await w.delta("alone")
                # The producer bus stays open and the batch is far from full: the time bound sends it.
                await collector.wait_count(2)
        await collector.wait_terminals(1)
        src.stop()
    assert [e.seq for e in collector.events] == [0, 1, 2]


def test_public_api_is_exported_and_sorted() -> None:
    import streambus_redis

    assert streambus_redis.__all__ == sorted(streambus_redis.__all__, key=lambda n: (not n.isupper(), n))
    for name in streambus_redis.__all__:
        assert getattr(streambus_redis, name).__doc__ or name.isupper(), name
