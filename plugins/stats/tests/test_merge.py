"""Merging aggregators equals aggregating the union; states travel between processes as JSON."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import orjson
import pytest
from streambus_stats import StatsAggregator

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, StartEvent, Usage


def streams(n: int, seed: int) -> dict[str, list]:
    """n random streams over two models and providers, with errors, aborts and counted usage."""
    rng = random.Random(seed)
    out: dict[str, list] = {}
    for i in range(n):
        sid = f"s{i}"
        model, provider = rng.choice([("llama3", "ollama"), ("gpt-4o", "openai"), ("qwen", "ollama")])
        t = 1000.0 + rng.random() * 50
        events: list = [StartEvent(stream=sid, seq=0, ts=t, model=model, provider=provider)]
        for _ in range(rng.randrange(0, 30)):
            t += rng.expovariate(30)
            text = rng.choice(["", "to", "ken ", "stream", "ing."])
            channel = "reasoning" if rng.random() < 0.2 else "content"
            events.append(DeltaEvent(stream=sid, seq=len(events), ts=t, text=text, channel=channel))
        t += rng.random()
        fate = rng.random()
        if fate < 0.1:
            events.append(ErrorEvent(stream=sid, seq=len(events), ts=t, kind=rng.choice(["timeout", "http_500"])))
        elif fate < 0.2:
            events.append(AbortEvent(stream=sid, seq=len(events), ts=t, by="client"))
        else:
            usage = None if fate < 0.4 else Usage(prompt_tokens=rng.randrange(1, 99), completion_tokens=len(events))
            events.append(EndEvent(stream=sid, seq=len(events), ts=t, usage=usage, timings={"eval_duration": 0.5}))
        out[sid] = events
    return out


def interleave(groups: list[list], seed: int) -> list:
    """Merge per-stream event lists in a random order that keeps each stream's order."""
    rng = random.Random(seed)
    queues = [list(g) for g in groups if g]
    merged = []
    while queues:
        q = rng.choice(queues)
        merged.append(q.pop(0))
        if not q:
            queues.remove(q)
    return merged


def comparable(agg: StatsAggregator) -> dict:
    state = agg.to_state()
    state["streams"] = sorted(state["streams"], key=lambda r: r["stream"])
    return state


def test_merge_of_two_aggregators_equals_aggregate_of_union() -> None:
    data = streams(300, 7)
    ids = sorted(data)
    left, right = ids[::2], ids[1::2]
    a = StatsAggregator(tokenizer="approx", keep_streams=None)
    b = StatsAggregator(tokenizer="approx", keep_streams=None)
    union = StatsAggregator(tokenizer="approx", keep_streams=None)
    a.feed_many(interleave([data[s] for s in left], 1))
    b.feed_many(interleave([data[s] for s in right], 2))
    union.feed_many(interleave([data[s] for s in ids], 3))
    a.merge(b)
    assert comparable(a) == comparable(union)
    snap_a, snap_u = a.snapshot(streams=False), union.snapshot(streams=False)
    assert snap_a == snap_u
    assert snap_u["overall"]["streams"]["started"] == 300
    assert set(snap_u["models"]) == {"llama3", "gpt-4o", "qwen"}


def test_states_merge_across_processes_as_json() -> None:
    data = streams(60, 11)
    ids = sorted(data)
    parts = []
    for chunk in (ids[:20], ids[20:45], ids[45:]):
        agg = StatsAggregator(tokenizer="approx")
        agg.feed_many(interleave([data[s] for s in chunk], 5))
        parts.append(orjson.dumps(agg.to_state()))  # what /stats/state or state_file carries
    merged = StatsAggregator(tokenizer="approx", keep_streams=None)
    for blob in parts:
        merged.merge(StatsAggregator.from_state(orjson.loads(blob)))
    union = StatsAggregator(tokenizer="approx", keep_streams=None)
    union.feed_many(interleave([data[s] for s in ids], 6))
    assert comparable(merged) == comparable(union)


def test_bad_states_are_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="not a streambus stats state"):
        StatsAggregator.from_state({"hello": 1})
    state = StatsAggregator().to_state()
    del state["groups"]
    with pytest.raises(ValueError, match="missing key 'groups'"):
        StatsAggregator.from_state(state)
    agg = StatsAggregator()
    agg.feed_many(streams(2, 1)["s0"])
    state = agg.to_state()
    del state["groups"][0]["started"]
    with pytest.raises(ValueError, match=r"groups\[0\]"):
        StatsAggregator.from_state(state)
    with pytest.raises(ValueError, match="relative accuracy"):
        StatsAggregator(relative_accuracy=0.01).merge(StatsAggregator(relative_accuracy=0.02))


def test_keep_streams_bounds_the_records() -> None:
    agg = StatsAggregator(keep_streams=5, tokenizer="approx")
    data = streams(20, 3)
    for sid in sorted(data, key=lambda s: int(s[1:])):
        agg.feed_many(data[sid])
    assert [r.stream for r in agg.streams] == [f"s{i}" for i in range(15, 20)]
    assert agg.aggregate().started == 20
    none_kept = StatsAggregator(keep_streams=0)
    none_kept.feed_many(data["s0"])
    assert list(none_kept.streams) == []
    assert msgspec.json.encode(none_kept.snapshot())  # JSON-able


def test_a_state_saved_by_the_previous_aggregator_reads_back_equal() -> None:
    # Saved by the numpy-and-Cython aggregator this one replaced (commit 0e8e236), from these same events:
    # the state format (version 1) is unchanged, so saved states keep loading and merging.
    saved = orjson.loads(Path(__file__).with_name("state-v1-from-0e8e236.json").read_bytes())
    agg = StatsAggregator(tokenizer="approx", keep_streams=None)
    agg.feed_many(interleave(list(streams(60, 21).values()), 22))
    agg.close_incomplete()
    assert comparable(StatsAggregator.from_state(saved)) == comparable(agg)
    both = StatsAggregator.from_state(saved)
    both.merge(agg)
    assert both.aggregate().finished == 2 * agg.aggregate().finished
