"""The GenAI client metrics, under the current semantic-convention names, the stats sink's names, or both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

from opentelemetry.metrics import Meter
from opentelemetry.util.types import AttributeValue

__all__ = ["NEW_NAMES", "OLD_NAMES", "GenAIMetrics", "MetricNames"]

MetricNames: TypeAlias = Literal["old", "new", "both"]
Attributes: TypeAlias = Mapping[str, AttributeValue]

NEW_NAMES: Final = (
    "gen_ai.client.operation.duration",
    "gen_ai.client.token.usage",
    "gen_ai.client.operation.time_to_first_chunk",
    "gen_ai.client.operation.time_per_output_chunk",
)
"""The GenAI semantic conventions' client metrics (unit ``s`` and ``{token}``)."""

OLD_NAMES: Final = (
    "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_token_usage",
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "gen_ai_client_operation_time_per_output_chunk_seconds",
)
"""The series names the stats sink serves on ``/metrics``, so existing dashboards keep working."""

# The conventions' advised bucket boundaries.
_SECONDS: Final = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_CHUNK_GAP: Final = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
_TOKENS: Final = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864
]  # fmt: skip


class _Set:
    """The four histograms under one naming scheme; *old* also renames attribute keys as the stats sink does."""

    __slots__ = ("chunk_gap", "duration", "old", "tokens", "ttfc")

    def __init__(self, meter: Meter, names: tuple[str, str, str, str], *, old: bool) -> None:
        self.old = old
        seconds = "" if old else "s"  # the old names carry their unit in the name
        self.duration = meter.create_histogram(
            names[0], unit=seconds, description="GenAI operation duration: stream start to its terminal event.",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )  # fmt: skip
        self.tokens = meter.create_histogram(
            names[1], unit="{token}", description="Tokens used per stream, by gen_ai.token.type (input, output).",
            explicit_bucket_boundaries_advisory=_TOKENS,
        )  # fmt: skip
        self.ttfc = meter.create_histogram(
            names[2], unit=seconds, description="Time from the stream's start to its first output chunk.",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )  # fmt: skip
        self.chunk_gap = meter.create_histogram(
            names[3], unit=seconds, description="Time between consecutive output chunks (after the first).",
            explicit_bucket_boundaries_advisory=_CHUNK_GAP,
        )  # fmt: skip

    def attributes(self, attributes: Attributes) -> Attributes:
        if not self.old:
            return attributes
        return {key.replace(".", "_"): value for key, value in attributes.items()}


class GenAIMetrics:
    """Records one stream's figures on every chosen naming scheme.

    *attributes* are the conventions' metric attributes (``gen_ai.operation.name``,
    ``gen_ai.provider.name``, ``gen_ai.request.model``, ...); under the old
    names their dots become underscores, as the stats sink's labels are.
    """

    __slots__ = ("_sets",)

    def __init__(self, meter: Meter, names: MetricNames) -> None:
        self._sets: list[_Set] = []
        if names in ("new", "both"):
            self._sets.append(_Set(meter, NEW_NAMES, old=False))
        if names in ("old", "both"):
            self._sets.append(_Set(meter, OLD_NAMES, old=True))

    def chunk_gaps(self, gaps: list[float], attributes: Attributes) -> None:
        """Record the gaps between a stream's consecutive output chunks."""
        for s in self._sets:
            attrs = s.attributes(attributes)
            record = s.chunk_gap.record
            for gap in gaps:
                record(gap, attrs)

    def finished(
        self,
        attributes: Attributes,
        *,
        duration: float,
        ttfc: float | None,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        """Record a finished stream's duration, time to first chunk and token usage."""
        for s in self._sets:
            attrs = s.attributes(attributes)
            s.duration.record(duration, attrs)
            if ttfc is not None:
                s.ttfc.record(ttfc, attrs)
            for kind, count in (("input", input_tokens), ("output", output_tokens)):
                if count is not None:
                    s.tokens.record(count, s.attributes({**attributes, "gen_ai.token.type": kind}))
