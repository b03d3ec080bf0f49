"""Prometheus exposition of a :class:`StatsAggregator`, named after the OpenTelemetry GenAI conventions.

The OpenTelemetry GenAI client metrics, in the Prometheus form the OTel
Prometheus exporter gives them (dots to underscores, unit ``s`` as the
``_seconds`` suffix, the annotation unit ``{token}`` dropped):

=============================================  ================================================================
OpenTelemetry metric                           Prometheus histogram
=============================================  ================================================================
``gen_ai.client.operation.duration``           ``gen_ai_client_operation_duration_seconds``
``gen_ai.client.token.usage``                  ``gen_ai_client_token_usage`` (label ``gen_ai_token_type``)
``gen_ai.client.operation.time_to_first_chunk`` ``gen_ai_client_operation_time_to_first_chunk_seconds``
``gen_ai.client.operation.time_per_output_chunk`` ``gen_ai_client_operation_time_per_output_chunk_seconds``
=============================================  ================================================================

Every series carries ``gen_ai_request_model`` and ``gen_ai_provider_name``
(the OTel attributes ``gen_ai.request.model`` and ``gen_ai.provider.name``)
and ``gen_ai_operation_name="chat"``. Figures the conventions do not define
are ``streambus_*`` metrics (counters, and sketch quantiles as gauges).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from ._aggregator import StatsAggregator
from ._distribution import Distribution

__all__ = ["StatsCollector", "render_metrics"]

_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]

_HISTOGRAMS = (
    (
        "gen_ai_client_operation_duration_seconds",
        "GenAI operation duration: stream start to terminal event (gen_ai.client.operation.duration).",
        "e2e_seconds",
    ),
    (
        "gen_ai_client_operation_time_to_first_chunk_seconds",
        "Time to first non-empty content or reasoning chunk (gen_ai.client.operation.time_to_first_chunk).",
        "time_to_first_chunk_seconds",
    ),
    (
        "gen_ai_client_operation_time_per_output_chunk_seconds",
        "Gap between consecutive output chunks (gen_ai.client.operation.time_per_output_chunk).",
        "inter_chunk_latency_seconds",
    ),
)

_QUANTILE_FIGURES = (
    ("streambus_latency_quantile_seconds", "time_to_first_chunk_seconds", "time_to_first_chunk"),
    ("streambus_latency_quantile_seconds", "time_to_first_content_seconds", "time_to_first_content"),
    ("streambus_latency_quantile_seconds", "inter_chunk_latency_seconds", "inter_chunk_latency"),
    ("streambus_latency_quantile_seconds", "time_per_output_token_seconds", "time_per_output_token"),
    ("streambus_latency_quantile_seconds", "e2e_seconds", "e2e"),
    ("streambus_output_tokens_per_second_quantile", "output_tokens_per_second", "bus"),
    ("streambus_output_tokens_per_second_quantile", "provider_tokens_per_second", "provider"),
)


def _buckets(dist: Distribution) -> list[tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else repr(bound), float(n)) for bound, n in dist.cumulative_buckets()]


class StatsCollector(Collector):
    """A ``prometheus_client`` collector reading an aggregator at scrape time.

    Register it on your own registry (``registry.register(StatsCollector(agg))``)
    to add streambus figures to an existing ``/metrics`` endpoint.
    """

    def __init__(self, aggregator: StatsAggregator) -> None:
        self.aggregator = aggregator

    def describe(self) -> list[object]:
        """Nothing up front: the label sets depend on the models seen."""
        return []

    def collect(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily | GaugeMetricFamily]:
        """Yield every metric family (see the module docstring for names)."""
        groups = sorted(self.aggregator.groups.items())
        for name, doc, figure in _HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=_LABELS, unit="seconds")
            for (model, provider), agg in groups:
                dist = agg.dists[figure]
                family.add_metric(["chat", provider, model], _buckets(dist), dist.total)
            yield family
        usage = HistogramMetricFamily(
            "gen_ai_client_token_usage",
            "Tokens used per stream, input (prompt) and output (completion) (gen_ai.client.token.usage).",
            labels=[*_LABELS, "gen_ai_token_type"],
        )
        for (model, provider), agg in groups:
            for token_type, figure in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                dist = agg.dists[figure]
                usage.add_metric(["chat", provider, model, token_type], _buckets(dist), dist.total)
        yield usage

        started = CounterMetricFamily("streambus_streams_started", "Streams started.", labels=_LABELS)
        live = GaugeMetricFamily("streambus_streams_live", "Streams started and not yet finished.", labels=_LABELS)
        finished = CounterMetricFamily(
            "streambus_streams_finished",
            "Streams finished, by outcome (end, error, abort, incomplete) and reason "
            "(end reason, error kind, or who aborted).",
            labels=[*_LABELS, "outcome", "reason"],
        )
        moderation = CounterMetricFamily(
            "streambus_moderation_actions", "Moderation events, by action.", labels=[*_LABELS, "action"]
        )
        chunks = CounterMetricFamily("streambus_chunks", "Non-empty output chunks (deltas, by n).", labels=_LABELS)
        tokens = CounterMetricFamily(
            "streambus_tokens",
            "Tokens of finished streams, by type and by source (provider-reported or counted); "
            "cached_input and cache_creation_input are part of input, reasoning part of output.",
            labels=[*_LABELS, "gen_ai_token_type", "source"],
        )
        for (model, provider), agg in groups:
            base = ["chat", provider, model]
            started.add_metric(base, agg.started)
            live.add_metric(base, max(agg.started - agg.finished, 0))
            for reason, n in sorted(agg.end_reasons.items()):
                finished.add_metric([*base, "end", reason], n)
            for kind, n in sorted(agg.errors.items()):
                finished.add_metric([*base, "error", kind], n)
            for by, n in sorted(agg.aborts.items()):
                finished.add_metric([*base, "abort", by], n)
            if agg.outcomes["incomplete"]:
                finished.add_metric([*base, "incomplete", ""], agg.outcomes["incomplete"])
            for action, n in sorted(agg.moderation.items()):
                moderation.add_metric([*base, action], n)
            chunks.add_metric(base, agg.chunks)
            for token_type, kind in (("input", "prompt"), ("output", "completion")):
                for source in ("provider", "counted"):
                    tokens.add_metric([*base, token_type, source], agg.tokens[f"{kind}:{source}"])
            # Only providers report these: no "counted" series that would always be 0.
            for kind in ("cached_input", "cache_creation_input", "reasoning"):
                tokens.add_metric([*base, kind, "provider"], agg.tokens[f"{kind}:provider"])
        yield from (started, live, finished, moderation, chunks, tokens)

        quantile_families = {
            "streambus_latency_quantile_seconds": GaugeMetricFamily(
                "streambus_latency_quantile_seconds",
                f"Quantiles of latency figures from a DDSketch (relative error "
                f"{self.aggregator.relative_accuracy:g}); quantile 1 is the exact max.",
                labels=[*_LABELS, "figure", "quantile"],
            ),
            "streambus_output_tokens_per_second_quantile": GaugeMetricFamily(
                "streambus_output_tokens_per_second_quantile",
                "Quantiles of per-stream output tokens/s, measured at the bus or reported by the provider.",
                labels=[*_LABELS, "source", "quantile"],
            ),
        }
        qs = (*self.aggregator.quantiles, 1.0)
        for (model, provider), agg in groups:
            for family_name, figure, label in _QUANTILE_FIGURES:
                dist = agg.dists[figure]
                if not dist.count:
                    continue
                for q in qs:
                    value = dist.quantile(q)
                    if value is not None:
                        quantile_families[family_name].add_metric(["chat", provider, model, label, f"{q:g}"], value)
        yield from quantile_families.values()


def render_metrics(aggregator: StatsAggregator) -> bytes:
    """Return the Prometheus text exposition of *aggregator*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(aggregator))
    return generate_latest(registry)
