"""streambus-stats: how fast models stream and what they cost, per stream, model and provider.

- :class:`StatsSink` (sink ``stats``): aggregates every stream on the bus,
  serves Prometheus ``/metrics`` and a JSON ``/stats`` over aiohttp, and logs
  summaries.
- :class:`StatsAggregator`: the computation itself, fed events from any
  source; aggregators merge exactly and save their state as JSON.
- ``streambus stats RECORDING...`` (:data:`stats_command`): the same figures
  for recordings, as tables, ``--json`` or ``--plot FILE.png``.

Every figure is defined in ``docs/stats.md``.
"""

from __future__ import annotations

from ._aggregator import FIGURES, STATE_VERSION, TOKEN_KINDS, Aggregate, StatsAggregator, StreamRecord
from ._cli import render_tables, stats_command, summarise
from ._distribution import COMPILED, Distribution
from ._plot import plot
from ._prometheus import StatsCollector, render_metrics
from ._sink import StatsSink
from ._tokens import TokenCounter, approximate_tokens

__all__ = [
    "COMPILED",
    "FIGURES",
    "STATE_VERSION",
    "TOKEN_KINDS",
    "Aggregate",
    "Distribution",
    "StatsAggregator",
    "StatsCollector",
    "StatsSink",
    "StreamRecord",
    "TokenCounter",
    "approximate_tokens",
    "plot",
    "render_metrics",
    "render_tables",
    "stats_command",
    "summarise",
]
