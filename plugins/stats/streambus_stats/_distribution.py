"""One distribution of a figure: exact count, sum, min and max, fixed buckets, and a DDSketch for quantiles.

The sketch is the ``ddsketch`` library's, through its public API. Its
:class:`~ddsketch.mapping.LogarithmicMapping` decides which bin each value
falls in; the counts per bin are kept here (a dict by bin key, plus the
values counted as zero), and the :class:`~ddsketch.ddsketch.BaseDDSketch`
that answers quantiles is built from them over a
:class:`~ddsketch.store.DenseStore` when one is asked for, the way
``ddsketch.pb`` reads a sketch back. Any quantile read from it is within
``relative_accuracy`` of the exact quantile (for values above zero; zero is
counted exactly).

Everything merges exactly: two distributions fed disjoint values and merged
hold the same bins, counts, bucket counts, min and max as one distribution
fed all of them; the sum is kept in integer nanounits (1e-9) so it does not
depend on the order of additions either.
"""

from __future__ import annotations

import math
import os
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

__all__ = [
    "CHUNK_BUCKETS",
    "COMPILED",
    "DURATION_BUCKETS",
    "RATE_BUCKETS",
    "TOKEN_BUCKETS",
    "Digest",
    "Distribution",
    "Quantiles",
    "digest",
]

DURATION_BUCKETS: tuple[float, ...] = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
"""Advisory bucket boundaries (seconds) of the OpenTelemetry GenAI duration histograms."""

CHUNK_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
"""Advisory bucket boundaries (seconds) of ``gen_ai.client.operation.time_per_output_chunk``."""

TOKEN_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(14))
"""Advisory bucket boundaries of ``gen_ai.client.token.usage``: 1, 4, 16, ... 67108864."""

RATE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Bucket boundaries (tokens per second) for rates."""

_NANO = 1_000_000_000
_NANO_FLOAT = 1e9
_LARGEST = sys.float_info.max / _NANO  # the largest value whose nanounits are still a finite float

Quantiles = dict[str, float | int | None]

_SURELY_BELOW, _SURELY_ABOVE = 1 - 1e-9, 1 + 1e-9
"""A value this close to a bin edge (relatively) is placed by the mapping's key, not by the edge."""


def _power(gamma: float, key: int) -> float:
    """``gamma ** key``, infinite past the largest float (the top bins of a huge value)."""
    try:
        return gamma**key
    except OverflowError:
        return math.inf


Digest = tuple[int, int, float, float, int, int]
"""What a batch adds to a distribution besides buckets and bins: ``(count, clamped, min, max, sum_nano, zeros)``."""


def digest(
    values: list[float],
    bounds: Sequence[float],
    mapping: LogarithmicMapping,
    buckets: list[int],
    keyed: dict[int, int],
) -> Digest | None:
    """Digest a batch of *values* for a distribution with *bounds* and *mapping* (``None``: nothing to add).

    The values' counts per bucket are added to *buckets* (one more than *bounds*) and their
    counts per sketch bin to *keyed*, in place; the rest is returned.

    The behaviour reference: ``streambus_stats._compiled.digest`` computes the same in C, and a
    test demands identical results. A batch costs one sort, and one mapping look-up per sketch bin
    its values fill: the mapping's key never decreases as the value grows, so a bin's values are a
    run of the sorted batch, ending at ``gamma ** key`` (the bin's upper edge). Where a value lies
    so close to that edge that rounding could put it either side, the mapping's own key decides:
    every value lands in the bin ``sketch.add(value)`` would put it in.
    """
    ordered = sorted(values)
    if ordered and (not math.isfinite(sum(ordered)) or ordered[-1] > _LARGEST or ordered[0] < -_LARGEST):
        # NaN, infinities and values whose nanounits overflow a float (a recording with ts = 1e308
        # gives such gaps) have no place in a sketch or an integer sum: left out, as a missing figure.
        ordered = sorted(v for v in ordered if abs(v) <= _LARGEST)
    if not ordered:
        return None
    negative = bisect_left(ordered, 0.0)
    if negative:
        ordered[:negative] = [0.0] * negative
    n = len(ordered)
    sum_nano = sum(map(round, map(_NANO_FLOAT.__mul__, ordered)))  # (round(v * 1e9) for each v)
    low = 0
    for i, bound in enumerate(bounds):
        high = bisect_right(ordered, bound, low)
        buckets[i] += high - low
        low = high
    buckets[len(bounds)] += n - low
    key_of, gamma = mapping.key, mapping.gamma
    i = bisect_right(ordered, mapping.min_possible)
    zeros = i
    key = key_of(ordered[i]) if i < n else 0
    while i < n:
        upper = _power(gamma, key)
        j = bisect_right(ordered, upper * _SURELY_BELOW, i)
        while j < n and ordered[j] <= upper * _SURELY_ABOVE and key_of(ordered[j]) == key:
            j += 1
        keyed[key] = keyed.get(key, 0) + j - i
        if j < n:  # the next value's bin: the next one when it is surely below that one's edge
            key = key + 1 if ordered[j] < upper * gamma * _SURELY_BELOW else key_of(ordered[j])
        i = j
    return n, negative, float(ordered[0]), float(ordered[-1]), sum_nano, zeros


_digest = digest
COMPILED = False
"""Whether the compiled twins of the per-event path and :func:`digest` run (``streambus_stats._compiled``).

They do when the plugin was built with its extension, unless ``STREAMBUS_STATS_PURE=1`` is set
when the plugin is imported; the pure-Python code is the reference either way, with the same figures."""
if os.environ.get("STREAMBUS_STATS_PURE", "") in ("", "0"):
    try:
        from ._compiled import digest as _digest

        COMPILED = True
    except ImportError:  # built without a C compiler: the pure-Python path runs
        pass


class Distribution:
    """The distribution of one figure (seconds, tokens, tokens/s), mergeable exactly.

    Record values with :meth:`add` or, a batch at a time, :meth:`add_many`;
    read :meth:`summary` (count, mean, min, p50/p90/p99, max) or
    :meth:`quantile`. NaN and infinities are ignored; negative values are recorded as 0 and
    counted in :attr:`clamped` (a clock that stepped back).
    """

    __slots__ = (
        "_sketch",
        "bounds",
        "buckets",
        "clamped",
        "count",
        "keyed",
        "mapping",
        "max",
        "min",
        "sum_nano",
        "zeros",
    )

    def __init__(self, relative_accuracy: float = 0.01, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy: must be between 0 and 1 (exclusive), got {relative_accuracy}")
        self.bounds = tuple(float(b) for b in bounds)
        """Upper bounds of the fixed buckets (Prometheus ``le``), ascending; a last bucket is open."""
        self.buckets = [0] * (len(self.bounds) + 1)
        """Values per bucket: bucket ``i`` holds ``bounds[i-1] < v <= bounds[i]``."""
        self.count = 0
        """How many values were recorded."""
        self.sum_nano = 0
        """The exact sum, in nanounits: the sum of ``round(v * 1e9)``."""
        self.min = math.inf
        """The exact smallest value (``inf`` when empty)."""
        self.max = -math.inf
        """The exact largest value (``-inf`` when empty)."""
        self.clamped = 0
        """Negative values recorded as 0."""
        self.mapping = LogarithmicMapping(relative_accuracy)
        """The sketch's mapping of values to bins."""
        self.keyed: dict[int, int] = {}
        """Values above the mapping's ``min_possible``, counted per sketch bin (by the mapping's key)."""
        self.zeros = 0
        """Values the sketch counts as zero (at most the mapping's ``min_possible``, clamped ones included)."""
        self._sketch: BaseDDSketch | None = None

    @property
    def sketch(self) -> BaseDDSketch:
        """The DDSketch of the values, for quantiles (built from :attr:`keyed` when first read after a change)."""
        if self._sketch is None:
            store = DenseStore()
            for key, n in sorted(self.keyed.items()):
                store.add(key, float(n))
            self._sketch = BaseDDSketch(self.mapping, store, DenseStore(), float(self.zeros))
        return self._sketch

    @property
    def relative_accuracy(self) -> float:
        """The sketch's guaranteed relative error on quantiles."""
        return float(self.mapping.relative_accuracy)

    # -- recording -------------------------------------------------------------
    def add(self, value: float, weight: int = 1) -> None:
        """Record *value* (*weight* times)."""
        self.add_many([value] * weight)

    def add_many(self, values: Iterable[float]) -> None:
        """Record every value of *values*: a batch costs one sort, and one sketch update per bin its values fill."""
        batch = _digest(
            values if isinstance(values, list) else list(values), self.bounds, self.mapping, self.buckets, self.keyed
        )
        if batch is None:
            return
        n, clamped, low, high, sum_nano, zeros = batch
        self.count += n
        self.clamped += clamped
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        self.sum_nano += sum_nano
        self.zeros += zeros
        self._sketch = None

    # -- reading -------------------------------------------------------------
    @property
    def mean(self) -> float | None:
        """The exact mean, or ``None`` when empty."""
        return self.sum_nano / _NANO / self.count if self.count else None

    @property
    def total(self) -> float:
        """The exact sum (to 1e-9)."""
        return self.sum_nano / _NANO

    def quantile(self, q: float) -> float | None:
        """Return the *q*-quantile (0..1) within the relative accuracy, or ``None`` when empty.

        ``q=0`` and ``q=1`` return the exact min and max; other answers are
        clamped into ``[min, max]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q}")
        if not self.count:
            return None
        if q == 0.0:
            return self.min
        if q == 1.0:
            return self.max
        value = self.sketch.get_quantile_value(q)
        if value is None:
            return None
        return min(max(float(value), self.min), self.max)

    def summary(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> Quantiles:
        """Return ``{count, mean, min, p50, p90, p99, max}`` (``None`` figures when empty)."""
        out: Quantiles = {"count": self.count, "mean": self.mean, "min": self.min if self.count else None}
        for q in quantiles:
            out[_label(q)] = self.quantile(q)
        out["max"] = self.max if self.count else None
        return out

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """Return ``[(upper_bound, count_le), ..., (inf, count)]`` as a Prometheus histogram wants."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out

    def bins(self) -> list[tuple[float, float, int]]:
        """Return the sketch's non-empty bins as ``(low, high, count)`` (zero as ``(0, 0, n)``), for plotting."""
        out: list[tuple[float, float, int]] = []
        if self.zeros:
            out.append((0.0, 0.0, self.zeros))
        gamma = self.mapping.gamma
        for key, n in sorted(self.keyed.items()):
            high = _power(gamma, key)
            out.append((high / gamma, high, n))
        return out

    # -- merging and state ---------------------------------------------------------
    def merge(self, other: Distribution) -> None:
        """Add everything *other* holds (same accuracy and bounds required)."""
        if other.mapping.gamma != self.mapping.gamma:
            raise ValueError(
                f"cannot merge distributions of different relative accuracy "
                f"({other.relative_accuracy} into {self.relative_accuracy})"
            )
        if other.bounds != self.bounds:
            raise ValueError("cannot merge distributions with different bucket bounds")
        for key, n in other.keyed.items():
            self.keyed[key] = self.keyed.get(key, 0) + n
        self.zeros += other.zeros
        self._sketch = None
        self.count += other.count
        self.sum_nano += other.sum_nano
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.clamped += other.clamped
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    def copy(self) -> Distribution:
        """Return an independent copy."""
        clone = Distribution(self.relative_accuracy, self.bounds)
        clone.merge(self)
        return clone

    def to_state(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_state` turns back into an equal distribution."""
        # Bins from the first non-empty one to the last (the layout of ddsketch's dense store and protobuf).
        offset = min(self.keyed, default=0)
        bins = [self.keyed.get(key, 0) for key in range(offset, max(self.keyed, default=-1) + 1)]
        return {
            "relative_accuracy": self.relative_accuracy,
            "bounds": list(self.bounds),
            "buckets": list(self.buckets),
            "count": self.count,
            "sum_nano": self.sum_nano,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "clamped": self.clamped,
            "zero": self.zeros,
            "offset": offset,
            "bins": bins,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Distribution:
        """Rebuild a distribution saved with :meth:`to_state`; raise ``ValueError`` naming a bad key."""
        try:
            dist = cls(float(state["relative_accuracy"]), [float(b) for b in state["bounds"]])
            buckets = [int(n) for n in state["buckets"]]
            if len(buckets) != len(dist.buckets):
                raise ValueError("buckets: length does not match bounds")
            dist.buckets = buckets
            dist.count = int(state["count"])
            dist.sum_nano = int(state["sum_nano"])
            dist.min = math.inf if state["min"] is None else float(state["min"])
            dist.max = -math.inf if state["max"] is None else float(state["max"])
            dist.clamped = int(state.get("clamped", 0))
            zero = int(state["zero"])
            offset = int(state["offset"])
            bins = [int(n) for n in state["bins"]]
        except KeyError as exc:
            raise ValueError(f"distribution state: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"distribution state: {exc}") from None
        if zero < 0 or any(n < 0 for n in bins):
            raise ValueError("distribution state: negative counts")
        if zero + sum(bins) != dist.count:
            raise ValueError("distribution state: bins do not add up to count")
        dist.keyed = {offset + i: n for i, n in enumerate(bins) if n}
        dist.zeros = zero
        return dist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Distribution):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Distribution(count={self.count}, mean={self.mean}, max={self.max if self.count else None})"


def _label(q: float) -> str:
    """``0.5 -> "p50"``, ``0.999 -> "p99.9"``."""
    text = f"{q * 100:.10g}"
    return f"p{text}"
