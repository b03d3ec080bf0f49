"""The aggregator's per-event path: the same figures however the events are batched, and edge cases of it."""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streambus_stats import StatsAggregator
from streambus_stats._distribution import CHUNK_BUCKETS, COMPILED, TOKEN_BUCKETS, digest
from streambus_stats._tokens import approximate_tokens, count_pieces

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, ModerationEvent, StartEvent, Usage


def aggregator() -> StatsAggregator:
    return StatsAggregator(tokenizer="approx", keep_streams=None)


def deltas(stream: str, times: list[float], texts: list[str], ns: list[int] | None = None) -> list[Event]:
    ns = ns or [1] * len(times)
    return [
        DeltaEvent(stream=stream, seq=i + 1, ts=t, text=text, n=n)
        for i, (t, text, n) in enumerate(zip(times, texts, ns, strict=True))
    ]


def test_coalesced_delta_after_many_plain_ones_in_one_batch() -> None:
    agg = StatsAggregator(tokenizer="approx")
    times = [1.0 + 0.5 * i for i in range(50)]
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0, model="m", provider="p")]
    events += deltas("s", times, ["x"] * 50)
    events.append(DeltaEvent(stream="s", seq=51, ts=times[-1] + 2.0, text="abcd", n=4))
    events.append(EndEvent(stream="s", seq=52, ts=30.0, usage=Usage(completion_tokens=54)))
    agg.feed_many(events)
    (r,) = agg.snapshot()["streams"]
    assert r["chunks"] == 54
    assert r["time_to_first_chunk"] == 1.0
    assert r["inter_chunk_max"] == 0.5
    assert r["inter_chunk_mean"] == pytest.approx((times[-1] + 2.0 - 1.0) / 53)
    gaps = agg.aggregate().dists["inter_chunk_latency_seconds"]
    assert (gaps.count, gaps.min, gaps.max) == (53, 0.5, 0.5)  # 49 gaps of 0.5, then 2.0 spread over 4


def test_empty_deltas_inside_a_batch_are_counted_and_not_timed() -> None:
    agg = StatsAggregator(tokenizer="approx")
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0, model="m", provider="p")]
    events += deltas("s", [1.0, 1.25, 1.5, 1.75, 2.0], ["a", "", "b", "", "c"])
    events.append(EndEvent(stream="s", seq=6, ts=2.5))
    agg.feed_many(events)
    (r,) = agg.snapshot()["streams"]
    assert (r["chunks"], r["empty_deltas"]) == (3, 2)
    assert (r["inter_chunk_mean"], r["inter_chunk_max"]) == (0.5, 0.5)
    assert agg.aggregate().dists["inter_chunk_latency_seconds"].count == 2


def test_a_stream_id_used_again_starts_from_nothing() -> None:
    agg = StatsAggregator(tokenizer="approx")
    first: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0, model="m", provider="p")]
    first += deltas("s", [1.0, 2.0], ["a", "b"])
    first.append(EndEvent(stream="s", seq=3, ts=3.0))
    second: list[Event] = [StartEvent(stream="s", seq=0, ts=10.0, model="m", provider="p")]
    second += deltas("s", [10.5, 10.75], ["c", "d"])
    second.append(EndEvent(stream="s", seq=3, ts=11.0))
    agg.feed_many(first + second)
    a, b = agg.snapshot()["streams"]
    assert (a["time_to_first_chunk"], a["inter_chunk_max"], a["chunks"]) == (1.0, 1.0, 2)
    assert (b["time_to_first_chunk"], b["inter_chunk_max"], b["chunks"]) == (0.5, 0.25, 2)


def test_a_second_start_finishes_the_live_stream_as_incomplete() -> None:
    agg = StatsAggregator(tokenizer="approx")
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0, model="m", provider="p")]
    events += deltas("s", [1.0, 1.5], ["a", "b"])
    events.append(StartEvent(stream="s", seq=0, ts=5.0, model="m", provider="p"))
    events += deltas("s", [6.0], ["c"])
    agg.feed_many(events)
    agg.close_incomplete()
    a, b = agg.snapshot()["streams"]
    assert (a["outcome"], a["chunks"], a["inter_chunk_mean"]) == ("incomplete", 2, 0.5)
    assert (b["outcome"], b["chunks"], b["inter_chunk_mean"]) == ("incomplete", 1, None)


def test_integer_timestamps_take_the_general_path() -> None:
    agg = StatsAggregator(tokenizer="approx")
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0, model="m", provider="p")]
    events += deltas("s", [1, 3, 4.5, 5], ["a", "b", "c", "d"])  # type: ignore[list-item]
    events.append(EndEvent(stream="s", seq=5, ts=6))
    agg.feed_many(events)
    (r,) = agg.snapshot()["streams"]
    assert (r["time_to_first_chunk"], r["inter_chunk_max"], r["inter_chunk_mean"]) == (1, 2, 4 / 3)


def test_orphan_deltas_and_moderation_are_counted() -> None:
    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(
        [
            DeltaEvent(stream="ghost", seq=4, ts=1.0, text="x"),
            DeltaEvent(stream="ghost", seq=5, ts=1.5, text=""),
            ModerationEvent(stream="ghost", seq=6, ts=2.0, action="flag", start=0, end=1),
            AbortEvent(stream="ghost", seq=7, ts=2.5, by="client"),
        ]
    )
    assert agg.orphans == 4
    assert agg.snapshot()["overall"]["streams"]["started"] == 0


# -- the property: the same figures whatever the batching ------------------------------------------------------


def fresh(sid: str) -> str:
    """An equal but distinct str object, as events decoded from the wire carry (one per event)."""
    return "".join(list(sid)) if len(sid) > 1 else sid


@st.composite
def stream_events(draw: st.DrawFn, sid: str) -> list[Event]:
    t = draw(st.floats(0, 100, allow_nan=False))
    events: list[Event] = [StartEvent(stream=sid, seq=0, ts=t, model=draw(st.sampled_from("ab")), provider="p")]
    for _ in range(draw(st.integers(0, 25))):
        t += draw(st.sampled_from([0.0, 0.001, 0.02, 0.25, 1.5, -0.01]))
        kind = draw(st.integers(0, 9))
        if kind == 0:
            action = draw(st.sampled_from(["flag", "redact"]))
            events.append(ModerationEvent(stream=sid, seq=len(events), ts=t, action=action, start=0, end=1))
            continue
        text = draw(st.sampled_from(["", "tok", "en ", "日本"]))
        channel = draw(st.sampled_from(["content", "content", "reasoning", "tool"]))
        n = draw(st.sampled_from([1, 1, 1, 1, 2, 5]))
        events.append(DeltaEvent(stream=fresh(sid), seq=len(events), ts=t, text=text, channel=channel, n=n))
    fate = draw(st.integers(0, 4))
    t += 0.5
    if fate == 0:
        events.append(ErrorEvent(stream=sid, seq=len(events), ts=t, kind="timeout"))
    elif fate == 1:
        events.append(AbortEvent(stream=sid, seq=len(events), ts=t, by="client"))
    elif fate < 4:
        usage = Usage(completion_tokens=7) if fate == 3 else None
        events.append(EndEvent(stream=sid, seq=len(events), ts=t, usage=usage))
    return events  # fate 4: no terminal event (incomplete)


@st.composite
def feeds(draw: st.DrawFn) -> tuple[list[Event], list[int]]:
    count = draw(st.integers(1, 6))
    # Stream ids may repeat: a later stream reuses the id of an earlier one. They come in every width CPython
    # stores (1, 2 and 4 bytes per character).
    ids = [f"{prefix}{i}" for prefix in ("s", "stream-0123456789abcdef-", "流れ", "s🙂") for i in range(count + 1)]
    groups = [draw(stream_events(draw(st.sampled_from(ids)))) for _ in range(count)]
    rng = random.Random(draw(st.integers(0, 2**32)))
    merged: list[Event] = []
    queues = [list(g) for g in groups]
    while queues:
        q = rng.choice(queues)
        merged.append(q.pop(0))
        if not q:
            queues.remove(q)
    merged.insert(rng.randrange(len(merged) + 1), DeltaEvent(stream="nobody", seq=1, ts=1.0, text="x"))
    cuts = sorted(draw(st.lists(st.integers(0, len(merged)), max_size=6)))
    return merged, cuts


def figures(agg: StatsAggregator) -> dict[str, object]:
    agg.close_incomplete()
    state = agg.to_state()
    return {"snapshot": agg.snapshot(), "state": state}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feeds())
def test_batches_give_the_same_figures(feed: tuple[list[Event], list[int]]) -> None:
    events, cuts = feed
    reference = aggregator()
    for event in events:  # one event at a time
        reference.feed(event)
    expected = figures(reference)
    agg = aggregator()
    for lo, hi in zip([0, *cuts], [*cuts, len(events)], strict=True):
        agg.feed_many(events[lo:hi])
    assert figures(agg) == expected
    whole = aggregator()
    whole.feed_many(iter(events))  # one batch, and any iterable does
    assert figures(whole) == expected


def test_many_streams_with_lookalike_ids_give_the_same_figures() -> None:
    # Many live streams, ids that differ in one character, and every delta carrying its own copy of the id.
    ids = [f"req-{i:06d}" for i in range(1500)]
    events: list[Event] = [StartEvent(stream=sid, seq=0, ts=0.0, model="m", provider="p") for sid in ids]
    for k in range(1, 4):
        events += [DeltaEvent(stream=fresh(sid), seq=k, ts=k * 0.5 + i * 1e-4, text="ab") for i, sid in enumerate(ids)]
    events += [EndEvent(stream=fresh(sid), seq=4, ts=3.0) for sid in ids]
    results = []
    for size in (700, len(events)):
        agg = aggregator()
        for lo in range(0, len(events), size):
            agg.feed_many(events[lo : lo + size])
        results.append(figures(agg))
        assert agg.orphans == 0
        assert agg.aggregate().dists["inter_chunk_latency_seconds"].count == 2 * len(ids)
    assert results[0] == results[1]


def test_a_str_subclass_stream_id_is_looked_up_like_a_str() -> None:
    class Sid(str):
        pass

    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0.0, model="m", provider="p")]
    events += [DeltaEvent(stream=Sid("s"), seq=k, ts=float(k), text="x") for k in range(1, 4)]
    events.append(EndEvent(stream="s", seq=4, ts=5.0))
    agg = aggregator()
    agg.feed_many(events)
    assert agg.orphans == 0
    assert agg.aggregate().chunks == 3


def test_special_gaps_and_long_streams() -> None:
    # Gaps on, just under and just over every bucket bound of the inter-chunk figure; zero, negative (clamped),
    # tiny and huge. Then one stream of 20,000 chunks with no usage, so its completion tokens are counted from
    # every text it kept, in order. Batched or not, the figures are the same.
    bounds = StatsAggregator().aggregate().dists["inter_chunk_latency_seconds"].bounds
    specials = [0.0, -0.01, 1e-12, 99_999.0, 1e5, 2e5]
    for b in bounds:
        specials += [b, math.nextafter(b, 0.0), math.nextafter(b, math.inf)]
    events: list[Event] = []
    for i, gap in enumerate(specials):
        sid = f"special-{i}"
        events.append(StartEvent(stream=sid, seq=0, ts=-1.0, model="m", provider="p"))
        events += deltas(sid, [0.0, gap], ["a", "b"])  # the gap is exactly `gap` (gap - 0.0)
        events.append(EndEvent(stream=sid, seq=3, ts=3e5))
    count = 20_000
    rng = random.Random(7)
    texts = [rng.choice(["tok", "en ", "日本", " a b"]) + str(k % 10) for k in range(count)]
    times = list(itertools.accumulate(rng.choice([0.0, 0.001, 0.02, 0.3, 2.5]) for _ in range(count)))
    events.append(StartEvent(stream="long", seq=0, ts=-1.0, model="m", provider="p"))
    events += deltas("long", times, texts)
    events.append(EndEvent(stream="long", seq=count + 1, ts=times[-1] + 1.0))
    results = []
    for size in (3000, 1):
        agg = aggregator()
        for lo in range(0, len(events), size):
            agg.feed_many(events[lo : lo + size])
        results.append(figures(agg))
        dist = agg.aggregate().dists["inter_chunk_latency_seconds"]
        assert dist.count == len(specials) + count - 1
        assert dist.clamped == 1
        assert dist.max == 2e5
        (long,) = [r for r in agg.snapshot()["streams"] if r["stream"] == "long"]
        assert long["chunks"] == count
        assert long["completion_tokens"] == approximate_tokens("".join(texts))
    assert results[0] == results[1]


def test_a_finished_stream_id_used_again_starts_afresh() -> None:
    sid = "stream-s"
    agg = aggregator()
    agg.feed(StartEvent(stream=sid, seq=0, ts=0.0, model="m", provider="p"))
    agg.feed_many(deltas(fresh(sid), [float(k) for k in range(1, 41)], ["x"] * 40))
    assert agg.live[sid].texts == ["x"] * 40
    agg.feed(EndEvent(stream=sid, seq=41, ts=50.0))
    assert sid not in agg.live
    agg.feed(StartEvent(stream=sid, seq=0, ts=100.0, model="m", provider="p"))
    agg.feed_many(deltas(fresh(sid), [101.0, 103.0], ["y", "z"]))
    assert agg.live[sid].texts == ["y", "z"] and agg.live[sid].gap_sum == 2.0
    assert agg.orphans == 0


def test_every_gap_lands_in_the_bin_ddsketch_gives_it() -> None:
    # Gaps go into the sketch a batch at a time, those of one bin as one weighted value; the bins must be the
    # ones ddsketch's own add puts each value in, on and right next to bin edges too.
    dist = StatsAggregator().aggregate().dists["inter_chunk_latency_seconds"]
    gamma = dist.mapping.gamma
    rng = random.Random(11)
    values = [10 ** rng.uniform(-9, 4.9) for _ in range(4000)]
    for k in range(-1000, 580, 3):  # bin edges gamma**k, from about 1e-9 s to 1e5 s
        edge = dist.mapping.value(k) * (1 + gamma) / 2
        values += [edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)]
    values += [1.0, 2.0, 0.5, 1e-300, 5e-324, 2.2250738585072014e-308]  # exact powers of two, tiny and subnormal
    events: list[Event] = []
    for i, gap in enumerate(values):
        sid = f"k{i}"
        events.append(StartEvent(stream=sid, seq=0, ts=-1.0, model="m", provider="p"))
        events += deltas(sid, [0.0, gap], ["a", "b"])
    agg = aggregator()
    agg.feed_many(events)
    got = agg.aggregate().dists["inter_chunk_latency_seconds"]
    reference = DDSketch(got.relative_accuracy)
    for v in values:
        reference.add(v)
    for q in (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999):
        assert got.sketch.get_quantile_value(q) == reference.get_quantile_value(q), q
    single = type(got)(got.relative_accuracy, got.bounds)
    for v in values:
        single.add(v)
    assert got == single  # bins, zero count, buckets, sum, min and max


# -- the compiled twins (streambus_stats/_compiled.pyx) against the pure-Python reference ------------------------


def require_compiled() -> None:
    """The compiled path must be there unless the pure one was asked for: a build that lost it fails here."""
    if os.environ.get("STREAMBUS_STATS_PURE", "") not in ("", "0"):
        pytest.skip("STREAMBUS_STATS_PURE is set: only the pure-Python path runs")
    assert COMPILED, "streambus_stats._compiled was not built (pip install -e plugins/stats needs a C compiler)"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feeds())
def test_compiled_and_pure_paths_give_identical_figures(feed: tuple[list[Event], list[int]]) -> None:
    require_compiled()
    events, cuts = feed
    results = []
    for compiled in (False, True):
        agg = StatsAggregator(tokenizer="approx", keep_streams=None, compiled=compiled)
        assert agg.compiled is compiled
        for lo, hi in zip([0, *cuts], [*cuts, len(events)], strict=True):
            agg.feed_many(events[lo:hi])
        results.append((figures(agg), agg.orphans, agg.events))
    assert results[0] == results[1]


def test_aggregators_fed_in_turn_with_the_same_id_objects_keep_their_own_streams() -> None:
    # The compiled path remembers a stream id's Live by the id's identity in slots every call shares:
    # two aggregators fed in turn with the very same id objects (as two sinks of one bus are) must
    # each find their own Live, with more streams than slots and streams ending and starting again.
    require_compiled()
    ids = [f"s{i}" for i in range(1500)]

    def run(scale: float, text: str) -> list[Event]:
        events: list[Event] = [StartEvent(stream=sid, seq=0, ts=0.0, model="m", provider="p") for sid in ids]
        for k in range(1, 6):
            events += [DeltaEvent(stream=sid, seq=k, ts=scale * (k + i * 1e-4), text=text) for i, sid in enumerate(ids)]
            if k == 3:  # half the streams end and start again mid-run
                events += [EndEvent(stream=sid, seq=4, ts=scale * 3.5) for sid in ids[::2]]
                events += [StartEvent(stream=sid, seq=0, ts=scale * 3.6, model="m", provider="p") for sid in ids[::2]]
        return [*events, *(EndEvent(stream=sid, seq=6, ts=scale * 9) for sid in ids)]

    first, second = run(1.0, "ab"), run(2.5, "a b c")
    results = []
    for compiled in (False, True):
        one = StatsAggregator(tokenizer="approx", keep_streams=None, compiled=compiled)
        two = StatsAggregator(tokenizer="approx", keep_streams=None, compiled=compiled)
        for lo in range(0, len(first), 512):
            one.feed_many(first[lo : lo + 512])
            two.feed_many(second[lo : lo + 512])
        results.append((figures(one), figures(two), one.orphans, two.orphans))
    assert results[0] == results[1]
    assert results[1][0] != results[1][1]
    assert results[1][2:] == (0, 0)


def test_compiled_and_pure_paths_agree_on_integer_and_odd_timestamps() -> None:
    require_compiled()
    events: list[Event] = [StartEvent(stream="s", seq=0, ts=0, model="m", provider="p")]
    stamps: list[float] = [1, 2, 2.5, 4, 4.0, 7, math.inf, 9.0, 8.0, 1e308, 12, -3.0]
    events += deltas("s", stamps, ["ab"] * len(stamps))
    events.append(EndEvent(stream="s", seq=len(stamps) + 1, ts=20))
    results = []
    for compiled in (False, True):
        agg = StatsAggregator(tokenizer="approx", compiled=compiled)
        for lo in range(0, len(events), 3):
            agg.feed_many(events[lo : lo + 3])
        results.append(figures(agg))
    assert results[0] == results[1]


def test_compiled_path_is_refused_by_name_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import streambus_stats._aggregator as module

    monkeypatch.setattr(module, "COMPILED", False)
    with pytest.raises(ValueError, match="compiled: the compiled per-event path is not available"):
        StatsAggregator(compiled=True)
    assert StatsAggregator().compiled is False


def _values(rng: random.Random, mapping: LogarithmicMapping) -> list[float]:
    size = rng.choice([0, 1, 2, 17, 300, 3000])
    pick = rng.random()
    if pick < 0.15:  # few distinct values: long runs of equal keys
        return [rng.choice([0.5, 0.25, 3.0, 0.0]) for _ in range(size)]
    if pick < 0.3:  # on and next to bin edges
        out = []
        for _ in range(size):
            edge = mapping.value(rng.randint(-2000, 1500)) * (1 + mapping.gamma) / 2
            out.append(rng.choice([edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)]))
        return out
    values = [
        rng.choice(
            [
                rng.lognormvariate(math.log(0.005), 3),
                rng.uniform(-1, 1),
                0.0,
                -0.0,
                1e-12 * rng.random(),
                5e-324,
                float(rng.randint(0, 10**6)),
                rng.randint(0, 5),  # ints: what a recording with integer stamps gives
                1e299,
                rng.choice([math.nan, math.inf, -math.inf, 1.7e300, -1.7e300]),
            ]
        )
        for _ in range(size)
    ]
    if rng.random() < 0.3:
        values.sort(key=float)
    return values


def test_compiled_digest_equals_the_reference() -> None:
    require_compiled()
    from streambus_stats._compiled import digest as compiled_digest

    rng = random.Random(5)
    for accuracy in (0.01, 0.001, 0.2):
        mapping = LogarithmicMapping(accuracy)
        for trial in range(50):
            values = _values(rng, mapping)
            for bounds in (CHUNK_BUCKETS, TOKEN_BUCKETS, ()):
                # Both add into a distribution's buckets and bins in place: start from the same non-empty ones.
                start_buckets, start_keyed = [3] * (len(bounds) + 1), {-5: 2, 40: 1}
                want_buckets, want_keyed = list(start_buckets), dict(start_keyed)
                expected = digest(values, bounds, mapping, want_buckets, want_keyed)
                got_buckets, got_keyed = list(start_buckets), dict(start_keyed)
                got = compiled_digest(values, bounds, mapping, got_buckets, got_keyed)
                assert (got, got_buckets, got_keyed) == (expected, want_buckets, want_keyed), (accuracy, trial, bounds)
                if got is not None:
                    assert type(got[4]) is int and all(type(k) is int for k in got_keyed), "exact ints, as Python's"


def test_compiled_digest_sums_huge_values_exactly() -> None:
    require_compiled()
    from streambus_stats._compiled import digest as compiled_digest

    mapping = LogarithmicMapping(0.01)
    values = [4.6e9, 4.6e9, 1e299, 3e9] * 500  # nanounits past an int64, alone and summed
    got = compiled_digest(values, CHUNK_BUCKETS, mapping, [0] * 14, {})
    assert got == digest(values, CHUNK_BUCKETS, mapping, [0] * 14, {})
    assert (
        got is not None
        and got[4] == 500 * (2 * 4_600_000_000_000_000_000 + 3_000_000_000_000_000_000) + round(1e299 * 1e9) * 500
    )


@given(
    st.text(
        alphabet=st.one_of(st.sampled_from("ab_9 \t\n\x1c\x85.,!?'-é中ß٣\u00a0\u2028\U0001f600"), st.characters()),
        max_size=300,
    )
)
def test_compiled_token_approximation_equals_the_regex(text: str) -> None:
    require_compiled()
    from streambus_stats._compiled import approximate_tokens as compiled_count

    ascii = text.encode("ascii", "ignore").decode()  # (the ASCII fast path)
    assert compiled_count(text) == count_pieces(text)
    assert compiled_count(ascii) == count_pieces(ascii)
