"""Every discontinuity a consumer can meet, one by one, against the shared Redis (issue 18).

A lost key (its epoch changed), a stream first seen in its middle, a sender's
entry counter jumping over a stream's tail, and a restart with nothing to
vouch for the key: each stream that cannot be completed ends with exactly one
``redis_gap`` error naming what is missing, and every other stream arrives whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest
import redis
from streambus_redis import Deduplicator, RedisSink, RedisSource, encode_entry, epoch_key
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from streambus.recording import write_recording

pytestmark = pytest.mark.anyio


def source(url: str, key: str, **kw: Any) -> RedisSource:
    kw.setdefault("start", "0")
    kw.setdefault("position", "none")
    kw.setdefault("consumer", "c1")
    kw.setdefault("block_ms", 100)
    kw.setdefault("commit_interval_ms", 10)
    kw.setdefault("gap_grace_ms", 0)
    return RedisSource(url=url, stream=key, **kw)


def start(stream: str) -> StartEvent:
    return StartEvent(stream=stream, seq=0, ts=1.0, model="m")


def delta(stream: str, seq: int, text: str = "x") -> DeltaEvent:
    return DeltaEvent(stream=stream, seq=seq, ts=1.0, text=text)


def end(stream: str, seq: int) -> EndEvent:
    return EndEvent(stream=stream, seq=seq, ts=1.0)


def per_stream(events: list[Event]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.stream, []).append(f"{type(e).__name__.removesuffix('Event').lower()}{e.seq}")
    return out


def gap_errors(events: list[Event]) -> list[ErrorEvent]:
    return [e for e in events if isinstance(e, ErrorEvent) and e.kind == "redis_gap"]


async def test_stream_first_seen_in_its_middle_ends_with_one_error(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any
) -> None:
    # Its start and first deltas are gone (trimmed, or lost with the key); a whole stream follows.
    sync_redis.xadd(key, encode_entry("o", "p", 1, [delta("mid", 7), delta("mid", 8), start("whole")]))
    sync_redis.xadd(key, encode_entry("o", "p", 2, [end("mid", 9), delta("whole", 1), end("whole", 2)]))
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(collector)
            src = source(redis_url, key)
            bus.start_producer(src)
            await collector.wait_terminals(2)
            src.stop()
    assert per_stream(collector.events) == {"mid": ["error0"], "whole": ["start0", "delta1", "end2"]}
    (error,) = gap_errors(collector.events)
    assert "events 0..6" in error.message and not error.retryable
    assert [entry["stream"] for entry in logs if entry["event"] == "redis.stream_gap"] == ["mid"]


async def test_counter_jump_over_a_streams_tail_ends_it(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any
) -> None:
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("a"), start("b")]))
    # Entry 2 (a's last delta and its end) was lost; b goes on in entry 3 as if nothing happened.
    sync_redis.xadd(key, encode_entry("o", "p", 3, [delta("b", 1)]))
    sync_redis.xadd(key, encode_entry("o", "p", 4, [end("b", 2)]))
    async with Bus() as bus:
        bus.add_sink(collector)
        src = source(redis_url, key)
        bus.start_producer(src)
        await collector.wait_terminals(2)
        src.stop()
    assert per_stream(collector.events) == {"a": ["start0", "error1"], "b": ["start0", "delta1", "end2"]}
    assert len(src.gaps) == 1 and src.gaps[0].lost == 1
    (error,) = gap_errors(collector.events)
    assert "events from 1 on" in error.message and "sender p skipped" in error.message


async def test_lost_key_ends_the_streams_it_took_with_it(
    redis_url: str, key: str, sync_redis: redis.Redis, collector: Any
) -> None:
    """Redis lost the key (as when it restarts empty) while the consumer ran: its epoch changes."""
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("a"), start("b"), delta("b", 1)]))
    sync_redis.xadd(key, encode_entry("o", "q", 1, [start("c")]))
    sync_redis.xadd(key, encode_entry("o", "r", 1, [start("e"), start("f")]))
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(collector)
            src = source(redis_url, key, gap_grace_ms=2000)
            bus.start_producer(src)
            await collector.wait_count(6)
            old = src.epochs[key]
            # Gone with the key, unread: p's entry 2 (a's end) and q's entry 2 (c's tail; q writes no more).
            sync_redis.delete(key, epoch_key(key))
            # p goes on after a hole: only b's own next event proves b whole.
            sync_redis.xadd(key, encode_entry("o", "p", 3, [delta("b", 2), end("b", 3)]))
            # r goes on in sequence (it held entry 2 while Redis was away): none of its streams lost anything,
            # not even e, which has nothing new yet.
            sync_redis.xadd(key, encode_entry("o", "r", 2, [delta("f", 1)]))
            await collector.wait_for(lambda evs: len(gap_errors(evs)) == 2)
            sync_redis.xadd(key, encode_entry("o", "r", 3, [end("e", 1), end("f", 2)]))
            await collector.wait_terminals(5)
            src.stop()
    assert per_stream(collector.events) == {
        "a": ["start0", "error1"],
        "b": ["start0", "delta1", "delta2", "end3"],
        "c": ["start0", "error1"],
        "e": ["start0", "end1"],
        "f": ["start0", "delta1", "end2"],
    }
    assert src.epochs[key] != old
    assert sorted(gap.how.split(",")[0] for gap in src.gaps) == ["sender p skipped", "the key was lost and recreated"]
    assert all("events from 1 on" in e.message and "were lost" in e.message for e in gap_errors(collector.events))
    assert len([entry for entry in logs if entry["event"] == "redis.gap" and entry["log_level"] == "error"]) == 2


async def test_position_file_beside_the_recording_survives_a_lost_key(
    redis_url: str, key: str, sync_redis: redis.Redis, tmp_path: Path, make_collector: Any
) -> None:
    """The state a recorder resumes from is kept beside its recording, not in the Redis that lost the key."""
    recording = tmp_path / "rec.jsonl"
    first, second = make_collector(), make_collector()
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("a"), delta("a", 1)]))
    async with Bus() as bus:
        bus.add_sink(first)
        src = source(redis_url, key, start="last", position="auto", seed_recording=str(recording))
        bus.start_producer(src)
        await first.wait_count(2)
        src.stop()
    assert src.store == "file" and src.state_file == tmp_path / "rec.jsonl.redis-position"
    state = orjson.loads(src.state_file.read_bytes())
    assert state["epochs"] == {key: src.epochs[key]} and state["dedup"]["live"] == {"a": 1}
    write_recording(recording, first.events)  # what the recorder had written
    # Redis restarts empty while the consumer is down; the sink's later entries land in a new key.
    sync_redis.delete(key, epoch_key(key))
    sync_redis.xadd(key, encode_entry("o", "p", 5, [delta("a", 5), end("a", 6), start("n"), end("n", 1)]))
    async with Bus() as bus:
        bus.add_sink(second)
        src = source(redis_url, key, start="last", position="auto", seed_recording=str(recording))
        bus.start_producer(src)
        await second.wait_terminals(2)
        src.stop()
    assert per_stream(second.events) == {"a": ["error2"], "n": ["start0", "end1"]}
    assert "events 2..4" in gap_errors(second.events)[0].message


async def test_key_gone_back_to_an_older_save_is_a_gap(
    redis_url: str, key: str, sync_redis: redis.Redis, tmp_path: Path, make_collector: Any
) -> None:
    """Redis restarted from a save older than its last writes: same epoch, but the key is behind the consumer."""
    first, second = make_collector(), make_collector()
    state = tmp_path / "state.json"
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("a")]))
    sync_redis.xadd(key, encode_entry("o", "p", 2, [delta("a", 1)]))
    async with Bus() as bus:
        bus.add_sink(first)
        src = source(redis_url, key, start="last", position="file", position_file=str(state))
        bus.start_producer(src)
        await first.wait_count(2)
        src.stop()
    # The save held only entry 1; a's end followed the lost entry 2. The epoch key was saved with it.
    sync_redis.delete(key)
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("a")]), id="1-1")
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(second)
            src = source(redis_url, key, start="last", position="file", position_file=str(state))
            bus.start_producer(src)
            await second.wait_terminals(1)
            src.stop()
    assert per_stream(second.events) == {"a": ["error2"]}
    assert "went back to 1-1" in gap_errors(second.events)[0].message
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["redis.gap", "redis.stream_gap"]


async def test_seeded_streams_with_nothing_to_vouch_for_the_key_end_unless_their_history_is_there(
    redis_url: str, key: str, sync_redis: redis.Redis, tmp_path: Path, collector: Any
) -> None:
    recording = tmp_path / "rec.jsonl"
    # Recorded by a previous run whose position was not saved (position = "none").
    write_recording(recording, [start("kept"), delta("kept", 1), start("lost"), delta("lost", 1)])
    # The key still holds kept's history (and it is slow: nothing new of it yet), not lost's.
    sync_redis.xadd(key, encode_entry("o", "p", 1, [start("kept"), delta("kept", 1), start("other")]))
    sync_redis.xadd(key, encode_entry("o", "p", 2, [end("other", 1)]))
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(collector)
            src = source(redis_url, key, seed_recording=str(recording))
            bus.start_producer(src)
            await collector.wait_terminals(2)
            sync_redis.xadd(key, encode_entry("o", "p", 3, [end("kept", 2)]))
            await collector.wait_terminals(3)
            src.stop()
    assert per_stream(collector.events) == {"lost": ["error2"], "other": ["start0", "end1"], "kept": ["end2"]}
    assert any(entry["event"] == "redis.unvouched" and entry["streams"] == 2 for entry in logs)


async def test_sink_stamps_the_key_epoch_and_logs_when_the_key_was_lost(
    redis_url: str, key: str, sync_redis: redis.Redis
) -> None:
    async with Bus() as producer:
        sink = RedisSink(url=redis_url, stream=key, batch_max_ms=0)
        producer.add_sink(sink)
        with capture_logs() as logs:
            async with producer.stream(model="m") as w:
                await w.delta("before")
                await _until(lambda: sink.sent_events >= 2)
                first = sink.epochs[key]
                assert sync_redis.get(epoch_key(key)) == first.encode()
                sync_redis.delete(key, epoch_key(key))
                await w.delta("after")
                await _until(lambda: sink.sent_events >= 3)
    assert sink.epochs[key] != first and sync_redis.get(epoch_key(key)) == sink.epochs[key].encode()
    changed = [entry for entry in logs if entry["event"] == "redis.epoch_changed"]
    assert len(changed) == 1 and changed[0]["old"] == first


async def _until(condition: Any) -> None:
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the sink's counters, no event to wait on
            await anyio.sleep(0.005)


def test_accept_next_is_the_fast_path_of_check() -> None:
    d = Deduplicator()
    assert not d.accept_next("s", 1)  # unknown stream: judge it with check()
    assert d.check(start("s")).value == "new"
    assert d.accept_next("s", 1) and d.last("s") == 1
    assert not d.accept_next("s", 1) and not d.accept_next("s", 3)  # a duplicate, a hole
    d.end("s", 2)
    assert not d.accept_next("s", 3)  # ended
    assert d.live == {}


@pytest.mark.parametrize(
    ("options", "key_name"),
    [
        ({"gap_grace_ms": -1}, "gap_grace_ms"),
        ({"gap_grace_ms": float("nan")}, "gap_grace_ms"),
        ({"position": "redis", "position_file": "p.json"}, "position_file"),
        ({"position": "file"}, "position_file"),
        ({"position": "somewhere"}, "position"),
    ],
)
def test_bad_gap_and_position_options_name_the_key(options: dict[str, Any], key_name: str) -> None:
    with pytest.raises((ValueError, msgspec.ValidationError), match=key_name):
        RedisSource(**options)


def test_position_defaults() -> None:
    assert RedisSource().store == "redis" and RedisSource().state_file is None
    seeded = RedisSource(seed_recording="/tmp/none.jsonl")
    assert seeded.store == "file" and seeded.state_file == Path("/tmp/none.jsonl.redis-position")
    assert RedisSource(seed_recording="r.jsonl", position="none").store == "none"
    assert RedisSource(position="file", position_file="p.json").state_file == Path("p.json")
