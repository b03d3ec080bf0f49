"""The sketch-backed distribution: accuracy, exact merges, saved state."""

from __future__ import annotations

import math
import random

import orjson
import pytest
from streambus_stats import Distribution


def values(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(-3, 1.2) for _ in range(n)]


@pytest.mark.parametrize("accuracy", [0.01, 0.02, 0.05])
def test_quantiles_within_relative_accuracy(accuracy: float) -> None:
    data = values(20_000, 1)
    dist = Distribution(accuracy)
    for v in data:
        dist.add(v)
    for q in (0.01, 0.25, 0.5, 0.9, 0.99, 0.999):
        exact = sorted(data)[math.floor(q * (len(data) - 1))]
        got = dist.quantile(q)
        assert got is not None
        assert abs(got - exact) <= accuracy * exact * (1 + 1e-9), (q, got, exact)
    assert dist.quantile(0.0) == min(data)
    assert dist.quantile(1.0) == max(data)
    assert dist.count == len(data)
    assert dist.total == pytest.approx(sum(data), rel=1e-9)


def test_merge_equals_union_exactly() -> None:
    data = [*values(9_000, 2), 0.0, 0.0]
    a, b, union = Distribution(), Distribution(), Distribution()
    for i, v in enumerate(data):
        (a if i % 3 else b).add(v)
        union.add(v)
    a.merge(b)
    assert a == union  # same bins, buckets, count, nanounit sum, min, max
    for q in (0.5, 0.9, 0.99):
        assert a.quantile(q) == union.quantile(q)
    assert a.zeros == 2


def test_state_round_trip_through_json() -> None:
    dist = Distribution(0.02)
    for v in values(5_000, 3):
        dist.add(v)
    again = Distribution.from_state(orjson.loads(orjson.dumps(dist.to_state())))
    assert again == dist
    assert again.summary() == dist.summary()
    empty = Distribution.from_state(Distribution().to_state())
    assert empty.summary() == {
        "count": 0,
        "mean": None,
        "min": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_bad_state_and_mismatched_merges_are_named() -> None:
    state = Distribution().to_state()
    del state["bins"]
    with pytest.raises(ValueError, match="missing key 'bins'"):
        Distribution.from_state(state)
    dist = Distribution()
    dist.add(1.0)
    state = dist.to_state()
    state["count"] = 5
    with pytest.raises(ValueError, match="do not add up"):
        Distribution.from_state(state)
    with pytest.raises(ValueError, match="relative accuracy"):
        Distribution(0.01).merge(Distribution(0.02))
    with pytest.raises(ValueError, match="bucket bounds"):
        Distribution(0.01, (1.0,)).merge(Distribution(0.01, (2.0,)))
    with pytest.raises(ValueError, match="relative_accuracy"):
        Distribution(0.0)
    with pytest.raises(ValueError, match="quantile"):
        Distribution().quantile(1.5)


def test_buckets_are_exact_and_cumulative() -> None:
    dist = Distribution(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 1.5, 2.0):
        dist.add(v)
    assert dist.cumulative_buckets() == [(0.1, 2), (1.0, 4), (float("inf"), 6)]


def test_nan_is_ignored_and_large_values_sum_exactly() -> None:
    dist = Distribution(bounds=())
    dist.add(float("nan"))
    dist.add(float("inf"))
    dist.add(-float("inf"))
    dist.add(1e12)
    dist.add(1e12)
    assert dist.count == 2
    assert dist.total == 2e12
    assert dist.bins()[0][2] == 2


def test_bucket_counts_match_a_count_per_value_in_big_batches() -> None:
    # Values on, just below and just above every bound, ingested in one vectorised flush, against a count
    # made value by value with the `le` rule (bounds[i-1] < v <= bounds[i]).
    bounds = (0.01, 0.1, 1.0, 10.0)
    rng = random.Random(7)
    vals = [b * f for b in bounds for f in (1.0, 1 - 1e-12, 1 + 1e-12)] + [rng.uniform(0, 20) for _ in range(5000)]
    dist = Distribution(0.01, bounds)
    for v in vals:
        dist.add(v)
    expected = [0] * (len(bounds) + 1)
    for v in vals:
        expected[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
    assert dist.count == len(vals)
    assert dist.buckets == expected


def test_a_batch_records_what_its_values_would_one_by_one() -> None:
    rng = random.Random(5)
    batch = [*values(3_000, 4), 0.0, -0.5, 1e-320, float("nan"), float("inf"), 7.0, 7.0, 0.01, 2.5]
    rng.shuffle(batch)
    one_by_one, batched = Distribution(), Distribution()
    for v in batch:
        one_by_one.add(v)
    batched.add_many(batch)
    assert batched == one_by_one
    assert (batched.count, batched.clamped, batched.zeros) == (len(batch) - 2, 1, 3)


def test_a_weighted_value_counts_as_many() -> None:
    weighted, repeated = Distribution(), Distribution()
    weighted.add(0.02, weight=5)
    for _ in range(5):
        repeated.add(0.02)
    assert weighted == repeated
    assert weighted.count == 5
