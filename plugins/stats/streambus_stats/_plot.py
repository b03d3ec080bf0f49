"""Pictures of an aggregator: TTFC and inter-chunk latency distributions, tokens/s over time.

Uses matplotlib's non-interactive Agg backend (no display needed). The
distributions are drawn from the sketches' bins (regrouped on a log axis), so
a plot of merged processes or recordings needs no raw samples.
"""

from __future__ import annotations

import math
from pathlib import Path

from streambus.errors import StreamBusError

from ._aggregator import StatsAggregator
from ._distribution import Distribution

__all__ = ["plot"]


def _regroup(dist: Distribution, edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for low, high, n in dist.bins():
        mid = math.sqrt(low * high) if low > 0 else edges[0]
        for i in range(len(edges) - 1):
            if mid < edges[i + 1] or i == len(edges) - 2:
                counts[i] += n
                break
    return counts


def _edges(dists: list[Distribution], per_decade: int = 12) -> list[float]:
    lows = [d.min for d in dists if d.count and d.min > 0]
    highs = [d.max for d in dists if d.count and d.max > 0]
    if not lows or not highs:
        return [1e-3, 1.0]
    lo = math.floor(math.log10(min(lows)) * per_decade) / per_decade
    hi = math.ceil(math.log10(max(highs)) * per_decade) / per_decade
    if hi <= lo:
        hi = lo + 1 / per_decade
    steps = round((hi - lo) * per_decade)
    return [10 ** (lo + i / per_decade) for i in range(steps + 1)]


def plot(aggregator: StatsAggregator, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the figures of *aggregator* to the PNG at *path*; return the path.

    Three panels: time to first chunk, inter-chunk latency (both per model,
    from the sketches), and output tokens/s per stream over time (bus-measured
    and provider-reported, needs the aggregator's stream records).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise StreamBusError(
            "drawing figures needs matplotlib: pip install 'streambus-stats[plot]' "
            "(from a clone: pip install -e 'plugins/stats[plot]')"
        ) from exc

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = aggregator.models
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (
        ("time_to_first_chunk_seconds", "Time to first chunk", "seconds (log scale)"),
        ("inter_chunk_latency_seconds", "Inter-chunk latency (gap between chunks, not tokens)", "seconds (log scale)"),
    )
    for ax, (figure, heading, xlabel) in zip(axes[:2], panels, strict=True):
        dists = {m: aggregator.aggregate(model=m).dists[figure] for m in models}
        edges = _edges(list(dists.values()))
        drawn = False
        for i, (model, dist) in enumerate(dists.items()):
            if not dist.count:
                continue
            counts = _regroup(dist, edges)
            p50, p99 = dist.quantile(0.5), dist.quantile(0.99)
            color = colors[i % len(colors)]
            ax.stairs(
                counts,
                edges,
                label=f"{model or '(no model)'}  n={dist.count}  p50={p50:.3g}s  p99={p99:.3g}s",
                color=color,
                linewidth=1.6,
            )
            ax.axvline(p50 or edges[0], color=color, linestyle="--", linewidth=0.8)
            drawn = True
        ax.set_xscale("log")
        ax.set_title(heading)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")

    ax = axes[2]
    records = list(aggregator.streams)
    t0 = min((r.start_ts for r in records), default=0.0)
    drawn = False
    for i, model in enumerate(models):
        color = colors[i % len(colors)]
        bus = [
            (r.end_ts - t0, r.output_tokens_per_second)
            for r in records
            if r.model == model and r.end_ts is not None and r.output_tokens_per_second is not None
        ]
        provider = [
            (r.end_ts - t0, r.provider_tokens_per_second)
            for r in records
            if r.model == model and r.end_ts is not None and r.provider_tokens_per_second is not None
        ]
        if bus:
            ax.scatter(*zip(*bus, strict=True), s=14, color=color, label=f"{model or '(no model)'} at the bus")
            drawn = True
        if provider:
            ax.scatter(
                *zip(*provider, strict=True),
                s=22,
                color=color,
                marker="x",
                label=f"{model or '(no model)'} provider-reported",
            )
            drawn = True
    ax.set_title("Output tokens/s per stream, over time")
    ax.set_xlabel("seconds since the first stream started (at each stream's end)")
    ax.set_ylabel("tokens/s")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no stream with known token counts", transform=ax.transAxes, ha="center")
    if title:
        fig.suptitle(title)
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out
