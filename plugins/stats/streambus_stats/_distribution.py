"""One distribution of a figure: exact count/sum/min/max, fixed buckets and a DDSketch.

Values are buffered and ingested in vectorised batches: the per-value cost
on the bus's hot path is one ``list.append``. The sketch is the ``ddsketch``
library's (a :class:`~ddsketch.mapping.LogarithmicMapping` over a
:class:`~ddsketch.store.DenseStore`); only the bin index is computed here,
with numpy, from the mapping's own ``gamma`` and offset, so every value lands
in the bin ``ceil(log_gamma(v)) + offset`` and any quantile read from the
sketch is within ``relative_accuracy`` of the exact quantile (for values
above zero; zero is counted exactly).

Everything merges exactly: two distributions fed disjoint values and merged
hold the same bins, counts, bucket counts, min and max as one distribution
fed all of them; the sum is kept in integer nanounits (1e-9) so it does not
depend on the order of additions either.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

__all__ = ["DURATION_BUCKETS", "TOKEN_BUCKETS", "Distribution", "Quantiles"]

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

_FLUSH_AT = 16384
_NANO = 1_000_000_000
_LARGEST = sys.float_info.max / _NANO  # the largest value whose nanounits are still a finite float

Quantiles = dict[str, float | int | None]


class Distribution:
    """The distribution of one figure (seconds, tokens, tokens/s), mergeable exactly.

    Call :meth:`add` for each value; read :meth:`summary` (count, mean, min,
    p50/p90/p99, max) or :meth:`quantile`. Negative values are clamped to 0
    and counted in :attr:`clamped` (a clock that stepped back).
    """

    __slots__ = (
        "_bounds_array",
        "_count",
        "_max",
        "_min",
        "_pending",
        "bounds",
        "buckets",
        "clamped",
        "sketch",
        "sum_nano",
    )

    def __init__(self, relative_accuracy: float = 0.01, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy: must be between 0 and 1 (exclusive), got {relative_accuracy}")
        self.sketch = BaseDDSketch(
            mapping=LogarithmicMapping(relative_accuracy),
            store=DenseStore(),
            negative_store=DenseStore(),
            zero_count=0.0,
        )
        self.bounds = tuple(float(b) for b in bounds)
        self._bounds_array = np.asarray(self.bounds, dtype=np.float64)
        self.buckets = [0] * (len(self.bounds) + 1)
        self._count = 0
        self.sum_nano = 0
        self._min = math.inf
        self._max = -math.inf
        self.clamped = 0
        self._pending: list[float] = []

    @property
    def relative_accuracy(self) -> float:
        """The sketch's guaranteed relative error on quantiles."""
        return float(self.sketch._relative_accuracy)

    @property
    def count(self) -> int:
        """How many values were recorded."""
        self.flush()
        return self._count

    @property
    def min(self) -> float:
        """The exact smallest value (``inf`` when empty)."""
        self.flush()
        return self._min

    @property
    def max(self) -> float:
        """The exact largest value (``-inf`` when empty)."""
        self.flush()
        return self._max

    @property
    def pending(self) -> list[float]:
        """The buffer :meth:`add` appends to (hot paths may append to it directly, then call :meth:`maybe_flush`)."""
        return self._pending

    def add(self, value: float, weight: int = 1) -> None:
        """Record *value* (*weight* times)."""
        if weight == 1:
            self._pending.append(value)
        else:
            self._pending.extend([value] * weight)
        if len(self._pending) >= _FLUSH_AT:
            self.flush()

    def maybe_flush(self) -> None:
        """Ingest the buffer if it is full (after appending to :attr:`pending` directly)."""
        if len(self._pending) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Ingest buffered values into the sketch, buckets and exact totals."""
        pending = self._pending
        if not pending:
            return
        values = np.fromiter(pending, dtype=np.float64, count=len(pending))
        pending.clear()
        usable = np.abs(values) <= _LARGEST  # False for NaN too
        if not usable.all():
            # NaN, infinities and values whose nanounits overflow a float (a recording with
            # ts = 1e308 gives such gaps) have no place in a sketch or an integer sum: they
            # are left out, as a missing figure would be.
            values = values[usable]
            if values.size == 0:
                return
        low = float(values.min())
        clamped = 0
        if low < 0.0:
            negative = values < 0.0
            clamped = int(negative.sum())
            values = np.where(negative, 0.0, values)
            low = 0.0
        high = float(values.max())
        nano = np.rint(values * _NANO)
        if high * _NANO * values.size < 2**62:
            sum_nano = int(nano.astype(np.int64).sum())
        else:  # huge values: exact Python integers, slower but never overflowing
            sum_nano = sum(int(v) for v in nano.tolist())
        # Bucket i holds bounds[i-1] < v <= bounds[i]: the index a left-sided search of the bounds gives v.
        buckets = np.bincount(np.searchsorted(self._bounds_array, values, side="left"), minlength=len(self.buckets))
        mapping = self.sketch._mapping
        positive = values[values > mapping.min_possible] if low <= mapping.min_possible else values
        kmin = 0
        key_counts = None
        if positive.size:
            keys = np.ceil(np.log2(positive) * mapping._multiplier).astype(np.int64) + int(mapping._offset)
            kmin = int(keys.min())
            key_counts = np.bincount(keys - kmin)
        self.add_digest(
            count=int(values.size),
            clamped=clamped,
            low=low,
            high=high,
            sum_nano=sum_nano,
            buckets=buckets.tolist(),
            zeros=int(values.size - positive.size),
            kmin=kmin,
            key_counts=key_counts,
        )

    def add_digest(
        self,
        *,
        count: int,
        clamped: int,
        low: float,
        high: float,
        sum_nano: int,
        buckets: Sequence[int],
        zeros: int,
        kmin: int,
        key_counts: np.ndarray[Any, np.dtype[np.int64]] | None,
    ) -> None:
        """Add values digested elsewhere (the compiled hot path does it as they come), as :meth:`flush` does.

        *count* values (none of them NaN; negatives already clamped to 0, *clamped* of them), with
        *low*/*high* their min/max, *sum_nano* the sum of ``rint(v * 1e9)``, *buckets* the count per
        bucket of :attr:`bounds`, *zeros* how many are at most the sketch mapping's ``min_possible``, and
        ``key_counts[i]`` how many of the others have the sketch key ``kmin + i``
        (``ceil(log2(v) * multiplier) + offset`` of this distribution's mapping).
        """
        if len(buckets) != len(self.buckets):
            raise ValueError(f"buckets: expected {len(self.buckets)} counts, got {len(buckets)}")
        self._count += count
        self.clamped += clamped
        self._min = min(self._min, low)
        self._max = max(self._max, high)
        self.sum_nano += sum_nano
        for i, n in enumerate(buckets):
            self.buckets[i] += n
        sketch = self.sketch
        if zeros:
            sketch._zero_count += zeros
            sketch._count += zeros
        if key_counts is not None and key_counts.size:
            kmax = kmin + int(key_counts.size) - 1
            store = sketch._store
            # Let the library grow its dense store to cover [kmin, kmax], then add all counts at once.
            store.add(kmin, 0.0)
            store.add(kmax, 0.0)
            lo = kmin - store.offset
            bins = store.bins
            bins[lo : lo + key_counts.size] = (np.asarray(bins[lo : lo + key_counts.size]) + key_counts).tolist()
            positive = float(count - zeros)
            store.count += positive
            sketch._count += positive

    # -- reading -------------------------------------------------------------
    @property
    def mean(self) -> float | None:
        """The exact mean, or ``None`` when empty."""
        self.flush()
        return self.sum_nano / _NANO / self._count if self._count else None

    @property
    def total(self) -> float:
        """The exact sum (to 1e-9)."""
        self.flush()
        return self.sum_nano / _NANO

    def quantile(self, q: float) -> float | None:
        """Return the *q*-quantile (0..1) within the relative accuracy, or ``None`` when empty.

        ``q=0`` and ``q=1`` return the exact min and max; other answers are
        clamped into ``[min, max]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q}")
        self.flush()
        if not self._count:
            return None
        if q == 0.0:
            return self._min
        if q == 1.0:
            return self._max
        value = self.sketch.get_quantile_value(q)
        if value is None:
            return None
        return min(max(float(value), self._min), self._max)

    def summary(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> Quantiles:
        """Return ``{count, mean, min, p50, p90, p99, max}`` (``None`` figures when empty)."""
        self.flush()
        out: Quantiles = {"count": self._count, "mean": self.mean, "min": self._min if self._count else None}
        for q in quantiles:
            out[_label(q)] = self.quantile(q)
        out["max"] = self._max if self._count else None
        return out

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """Return ``[(upper_bound, count_le), ..., (inf, count)]`` as a Prometheus histogram wants."""
        self.flush()
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out

    def bins(self) -> list[tuple[float, float, int]]:
        """Return the sketch's non-empty bins as ``(low, high, count)`` (zero as ``(0, 0, n)``), for plotting."""
        self.flush()
        out: list[tuple[float, float, int]] = []
        if self.sketch._zero_count:
            out.append((0.0, 0.0, int(self.sketch._zero_count)))
        store = self.sketch._store
        mapping = self.sketch._mapping
        for i, n in enumerate(store.bins):
            if n:
                key = store.offset + i
                out.append(
                    (mapping._pow_gamma(key - 1 - mapping._offset), mapping._pow_gamma(key - mapping._offset), int(n))
                )
        return out

    # -- merging and state ---------------------------------------------------------
    def merge(self, other: Distribution) -> None:
        """Add everything *other* holds (same accuracy and bounds required)."""
        self.flush()
        other.flush()
        if other.sketch._mapping.gamma != self.sketch._mapping.gamma:
            raise ValueError(
                f"cannot merge distributions of different relative accuracy "
                f"({other.relative_accuracy} into {self.relative_accuracy})"
            )
        if other.bounds != self.bounds:
            raise ValueError("cannot merge distributions with different bucket bounds")
        if other._count:
            self.sketch.merge(other.sketch)
        self._count += other._count
        self.sum_nano += other.sum_nano
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        self.clamped += other.clamped
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    def copy(self) -> Distribution:
        """Return an independent copy."""
        clone = Distribution(self.relative_accuracy, self.bounds)
        clone.merge(self)
        return clone

    def to_state(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_state` turns back into an equal distribution."""
        self.flush()
        store = self.sketch._store
        # The store pads its bin list; keep only first..last non-empty bin so equal sketches give equal states.
        counts = [int(n) for n in store.bins]
        nonzero = [i for i, n in enumerate(counts) if n]
        bins = counts[nonzero[0] : nonzero[-1] + 1] if nonzero else []
        offset = int(store.offset) + nonzero[0] if nonzero else 0
        return {
            "relative_accuracy": self.relative_accuracy,
            "bounds": list(self.bounds),
            "buckets": list(self.buckets),
            "count": self._count,
            "sum_nano": self.sum_nano,
            "min": self._min if self._count else None,
            "max": self._max if self._count else None,
            "clamped": self.clamped,
            "zero": int(self.sketch._zero_count),
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
            dist._count = int(state["count"])
            dist.sum_nano = int(state["sum_nano"])
            dist._min = math.inf if state["min"] is None else float(state["min"])
            dist._max = -math.inf if state["max"] is None else float(state["max"])
            dist.clamped = int(state.get("clamped", 0))
            zero = int(state["zero"])
            offset = int(state["offset"])
            bins = [int(n) for n in state["bins"]]
        except KeyError as exc:
            raise ValueError(f"distribution state: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"distribution state: {exc}") from None
        if zero + sum(bins) != dist._count:
            raise ValueError("distribution state: bins do not add up to count")
        sketch = dist.sketch
        sketch._zero_count = float(zero)
        for i, n in enumerate(bins):
            if n:
                sketch._store.add(offset + i, float(n))
        sketch._count = float(dist._count)
        return dist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Distribution):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Distribution(count={self._count}, mean={self.mean}, max={self._max if self._count else None})"


def _label(q: float) -> str:
    """``0.5 -> "p50"``, ``0.999 -> "p99.9"``."""
    text = f"{q * 100:.10g}"
    return f"p{text}"
