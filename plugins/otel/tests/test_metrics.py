"""The GenAI client metrics: the conventions' names, the stats sink's names, or both."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from streambus_otel import NEW_NAMES, OLD_NAMES

from streambus import Bus, DeltaEvent, EndEvent, Event, StartEvent, Usage

if TYPE_CHECKING:
    from conftest import Telemetry

pytestmark = pytest.mark.anyio

# Chunk gaps of 0.5, 0.25 and 0.25 s (mean 1/3 s); a coalesced delta of n=2 spreads its gap.
EVENTS: list[Event] = [
    StartEvent(stream="s1", seq=0, ts=10.0, model="llama3", provider="ollama", meta={"upstream": "http://h:11434"}),
    DeltaEvent(stream="s1", seq=1, ts=10.5, text="a"),
    DeltaEvent(stream="s1", seq=2, ts=11.0, text="b"),
    DeltaEvent(stream="s1", seq=4, ts=11.5, text="cd", n=2, first_seq=3),
    EndEvent(stream="s1", seq=5, ts=12.0, usage=Usage(prompt_tokens=7, completion_tokens=4)),
]
ATTRS = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "ollama",
    "gen_ai.request.model": "llama3",
    "gen_ai.response.model": "llama3",
    "server.address": "h",
    "server.port": 11434,
}


async def run(telemetry: Telemetry, **keys: Any) -> dict[str, Any]:
    async with Bus() as bus:
        bus.add_sink(telemetry.sink(**keys))
        for event in EVENTS:
            await bus.publish(event)
    return telemetry.metrics()


def points(metric: Any) -> list[tuple[dict[str, Any], int, float]]:
    return sorted(
        ((dict(p.attributes), p.count, p.sum) for p in metric.data.data_points), key=lambda x: sorted(x[0].items())
    )


async def test_new_names_follow_the_conventions(telemetry: Telemetry) -> None:
    metrics = await run(telemetry)
    assert set(metrics) == set(NEW_NAMES)
    duration, tokens, ttfc, gap = (metrics[name] for name in NEW_NAMES)
    assert (duration.unit, tokens.unit, ttfc.unit, gap.unit) == ("s", "{token}", "s", "s")
    assert points(duration) == [(ATTRS, 1, 2.0)]
    assert points(ttfc) == [(ATTRS, 1, 0.5)]
    assert points(tokens) == [
        ({**ATTRS, "gen_ai.token.type": "input"}, 1, 7),
        ({**ATTRS, "gen_ai.token.type": "output"}, 1, 4),
    ]
    # mean: one sample per stream, (last chunk - first chunk) / (chunks - 1) = 1.0 / 3
    [(attrs, count, total)] = points(gap)
    assert (attrs, count) == (ATTRS, 1)
    assert total == pytest.approx(1 / 3)
    [point] = duration.data.data_points
    assert point.explicit_bounds[:3] == (0.01, 0.02, 0.04)


async def test_every_chunk_gap_when_asked(telemetry: Telemetry) -> None:
    metrics = await run(telemetry, chunk_gaps="each")
    [(_, count, total)] = points(metrics["gen_ai.client.operation.time_per_output_chunk"])
    assert (count, total) == (3, 1.0)  # 0.5, then 0.25 and 0.25 for the two chunks of the coalesced delta


async def test_no_chunk_gaps_when_off(telemetry: Telemetry) -> None:
    metrics = await run(telemetry, chunk_gaps="off")
    assert "gen_ai.client.operation.time_per_output_chunk" not in metrics


async def test_old_names_are_the_stats_sinks(telemetry: Telemetry) -> None:
    metrics = await run(telemetry, metrics="old")
    assert set(metrics) == set(OLD_NAMES)
    old_attrs = {key.replace(".", "_"): value for key, value in ATTRS.items()}
    assert points(metrics["gen_ai_client_operation_duration_seconds"]) == [(old_attrs, 1, 2.0)]
    assert points(metrics["gen_ai_client_token_usage"])[0][0]["gen_ai_token_type"] == "input"


async def test_both_names(telemetry: Telemetry) -> None:
    metrics = await run(telemetry, metrics="both")
    assert set(metrics) == {*NEW_NAMES, *OLD_NAMES}
