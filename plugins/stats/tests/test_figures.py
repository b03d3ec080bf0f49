"""Exact figures on hand-built event sequences with known timestamps."""

from __future__ import annotations

import pytest
from streambus_stats import StatsAggregator, approximate_tokens

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, ModerationEvent, StartEvent, Usage


class Script:
    """Builds one stream's events with explicit timestamps and gap-free seqs."""

    def __init__(self, stream: str = "s1", model: str = "m", provider: str = "p", t0: float = 1000.0, **meta: object):
        self.stream = stream
        self.seq = 0
        self.events: list = [StartEvent(stream=stream, seq=0, ts=t0, model=model, provider=provider, meta=dict(meta))]

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def delta(self, ts: float, text: str, channel: str = "content", n: int = 1) -> Script:
        self.events.append(DeltaEvent(stream=self.stream, seq=self._next(), ts=ts, text=text, channel=channel, n=n))
        return self

    def end(self, ts: float, usage: Usage | None = None, reason: str = "stop", **timings: float) -> list:
        self.events.append(
            EndEvent(stream=self.stream, seq=self._next(), ts=ts, reason=reason, usage=usage, timings=timings)
        )
        return self.events

    def error(self, ts: float, kind: str) -> list:
        self.events.append(ErrorEvent(stream=self.stream, seq=self._next(), ts=ts, kind=kind, message="boom"))
        return self.events

    def abort(self, ts: float, by: str, reason: str = "") -> list:
        self.events.append(AbortEvent(stream=self.stream, seq=self._next(), ts=ts, by=by, reason=reason))
        return self.events

    def moderation(self, ts: float, action: str) -> Script:
        self.events.append(ModerationEvent(stream=self.stream, seq=self._next(), ts=ts, action=action, start=0, end=3))
        return self


def run(events: list, **kwargs: object) -> tuple[StatsAggregator, dict]:
    agg = StatsAggregator(tokenizer="approx", **kwargs)  # type: ignore[arg-type]
    agg.feed_many(events)
    (record,) = agg.snapshot()["streams"]
    return agg, record


def test_empty_first_delta_is_not_the_first_chunk() -> None:
    events = (
        Script(t0=10.0)
        .delta(10.5, "")  # OpenAI's role-only first chunk
        .delta(11.0, "Hi")
        .delta(11.5, " there")
        .delta(11.75, "")  # Ollama's empty done chunk
        .end(12.0, Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9))
    )
    agg, r = run(events)
    assert r["time_to_first_chunk"] == 1.0
    assert r["time_to_first_content"] == 1.0
    assert r["chunks"] == 2
    assert r["empty_deltas"] == 2
    assert r["inter_chunk_mean"] == 0.5
    assert r["inter_chunk_max"] == 0.5
    assert r["e2e"] == 2.0
    assert r["time_per_output_token"] == 1.0  # (2.0 - 1.0) / (2 - 1)
    assert r["output_tokens_per_second"] == 1.0
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (7, 2, 9)
    assert r["usage_source"] == "provider"
    overall = agg.snapshot()["overall"]
    assert overall["inter_chunk_latency_seconds"]["count"] == 1
    assert overall["chunks"] == 2
    assert overall["empty_deltas"] == 2


def test_reasoning_before_content() -> None:
    events = (
        Script(t0=0.0)
        .delta(0.25, "Let me think", channel="reasoning")
        .delta(0.5, "...", channel="reasoning")
        .delta(1.0, "The answer")
        .delta(1.25, " is 4.")
        .end(2.0, Usage(completion_tokens=5))
    )
    agg, r = run(events)
    assert r["time_to_first_chunk"] == 0.25  # reasoning counts as a chunk
    assert r["time_to_first_content"] == 1.0
    assert r["chunks"] == 4
    assert r["inter_chunk_mean"] == pytest.approx(1.0 / 3)  # gaps 0.25, 0.5, 0.25
    assert r["inter_chunk_max"] == 0.5
    assert r["time_per_output_token"] == (2.0 - 0.25) / 4
    assert r["output_tokens_per_second"] == 4 / 1.75
    assert r["prompt_tokens"] is None and r["total_tokens"] is None
    gaps = agg.aggregate().dists["inter_chunk_latency_seconds"]
    assert (gaps.count, gaps.min, gaps.max, gaps.total) == (3, 0.25, 0.5, 1.0)
    assert gaps.quantile(0.5) == pytest.approx(0.25, rel=0.01)


def test_zero_completion_tokens() -> None:
    events = Script(t0=5.0).delta(5.5, "").end(6.0, Usage(prompt_tokens=3, completion_tokens=0, total_tokens=3))
    agg, r = run(events)
    assert r["time_to_first_chunk"] is None
    assert r["chunks"] == 0
    assert r["e2e"] == 1.0
    assert r["completion_tokens"] == 0
    assert r["time_per_output_token"] is None
    assert r["output_tokens_per_second"] is None
    assert r["inter_chunk_mean"] is None
    overall = agg.snapshot()["overall"]
    assert overall["time_to_first_chunk_seconds"]["count"] == 0
    assert overall["time_to_first_chunk_seconds"]["p50"] is None
    assert overall["e2e_seconds"]["count"] == 1


def test_one_completion_token_has_no_time_per_output_token() -> None:
    events = Script(t0=0.0).delta(0.5, "Yes").end(0.75, Usage(prompt_tokens=4, completion_tokens=1, total_tokens=5))
    agg, r = run(events)
    assert r["time_to_first_chunk"] == 0.5
    assert r["completion_tokens"] == 1
    assert r["time_per_output_token"] is None  # (e2e - ttfc) / 0 is undefined
    assert r["output_tokens_per_second"] is None
    assert agg.aggregate().dists["time_per_output_token_seconds"].count == 0


def test_error_mid_stream_counts_tokens_seen() -> None:
    events = Script(t0=0.0).delta(1.0, "Hello").delta(1.5, " wonderful").error(4.0, "timeout")
    agg, r = run(events)
    assert (r["outcome"], r["reason"]) == ("error", "timeout")
    assert r["e2e"] == 4.0
    assert r["time_to_first_chunk"] == 1.0
    assert r["completion_tokens"] == approximate_tokens("Hello wonderful") == 5  # ceil(5/4) + ceil(9/4)
    assert r["usage_source"] == "counted"
    assert r["token_method"] == "approx"
    assert r["time_per_output_token"] == (4.0 - 1.0) / 4
    overall = agg.snapshot()["overall"]
    assert overall["errors"] == {"timeout": 1}
    assert overall["streams"]["outcomes"] == {"error": 1}
    assert overall["tokens"]["completion"] == {"provider": 0, "counted": 5, "all": 5}
    assert overall["provider_tokens_per_second"]["count"] == 0


def test_abort_mid_stream_and_moderation() -> None:
    events = (
        Script(t0=0.0)
        .delta(0.1, "bad")
        .moderation(0.15, "flag")
        .moderation(0.2, "abort")
        .abort(0.25, "moderation", reason="policy")
    )
    agg, r = run(events)
    assert (r["outcome"], r["reason"]) == ("abort", "moderation")
    assert r["moderation"] == {"flag": 1, "abort": 1}
    assert r["e2e"] == 0.25
    assert r["completion_tokens"] == 1
    overall = agg.snapshot()["overall"]
    assert overall["aborts"] == {"moderation": 1}
    assert overall["moderation"] == {"abort": 1, "flag": 1}
    assert overall["streams"] == {"started": 1, "finished": 1, "live": 0, "outcomes": {"abort": 1}}


def test_provider_rate_beside_bus_rate() -> None:
    events = (
        Script(t0=0.0, model="llama3", provider="ollama")
        .delta(1.0, "a")
        .delta(1.5, "b")
        .delta(2.0, "c")
        .end(3.0, Usage(prompt_tokens=10, completion_tokens=9, total_tokens=19), eval_duration=1.5, total_duration=3.0)
    )
    _, r = run(events)
    assert r["provider_tokens_per_second"] == 6.0  # eval_count / eval_duration = 9 / 1.5
    assert r["output_tokens_per_second"] == 8 / 2.0  # (9 - 1) / (3.0 - 1.0)
    assert r["time_per_output_token"] == 2.0 / 8


def test_coalesced_delta_spreads_its_chunks_over_the_gap() -> None:
    events = Script(t0=0.0).delta(1.0, "a").delta(2.0, "bcd", n=4).end(2.0, Usage(completion_tokens=5))
    agg, r = run(events)
    assert r["chunks"] == 5
    assert r["inter_chunk_mean"] == 0.25
    gaps = agg.aggregate().dists["inter_chunk_latency_seconds"]
    assert (gaps.count, gaps.min, gaps.max) == (4, 0.25, 0.25)


def test_tool_chunks_are_chunks_but_not_first_chunk() -> None:
    events = Script(t0=0.0).delta(0.5, '{"x":', channel="tool").delta(1.0, "ok").end(1.5, Usage(completion_tokens=3))
    _, r = run(events)
    assert r["time_to_first_chunk"] == 1.0
    assert r["chunks"] == 2
    assert r["inter_chunk_mean"] == 0.5


def test_negative_gap_is_clamped_and_counted() -> None:
    events = Script(t0=0.0).delta(1.0, "a").delta(0.75, "b").end(2.0)
    agg, _ = run(events)
    gaps = agg.aggregate().dists["inter_chunk_latency_seconds"]
    assert (gaps.count, gaps.min, gaps.clamped) == (1, 0.0, 1)


def test_incomplete_and_orphan_events() -> None:
    s = Script(stream="cut", t0=0.0).delta(1.0, "partial text")
    agg = StatsAggregator(tokenizer="approx")
    agg.feed(DeltaEvent(stream="nobody", seq=3, ts=0.5, text="x"))
    agg.feed_many(s.events)
    assert agg.snapshot()["live_streams"] == 1
    assert agg.snapshot()["overall"]["streams"]["live"] == 1
    agg.close_incomplete()
    (r,) = agg.snapshot()["streams"]
    assert (r["outcome"], r["reason"], r["e2e"], r["end_ts"]) == ("incomplete", "", None, None)
    assert r["completion_tokens"] == approximate_tokens("partial text")
    assert agg.orphans == 1
    agg.feed(EndEvent(stream="cut", seq=9, ts=3.0))  # after the stream was closed
    assert agg.orphans == 2


def test_aggregates_per_model_provider_and_overall() -> None:
    events = []
    for i, (model, provider, ttfc) in enumerate(
        [("a", "ollama", 0.5), ("a", "ollama", 1.0), ("b", "ollama", 2.0), ("b", "openai", 4.0)]
    ):
        t0 = 100.0 * i
        events += (
            Script(stream=f"s{i}", model=model, provider=provider, t0=t0)
            .delta(t0 + ttfc, "x")
            .end(t0 + ttfc + 1, Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))
        )
    agg = StatsAggregator()
    agg.feed_many(events)
    snap = agg.snapshot()
    assert sorted(snap["models"]) == ["a", "b"]
    assert sorted(snap["providers"]) == ["ollama", "openai"]
    assert snap["models"]["a"]["time_to_first_chunk_seconds"]["count"] == 2
    assert snap["models"]["a"]["time_to_first_chunk_seconds"]["mean"] == 0.75
    assert snap["providers"]["ollama"]["time_to_first_chunk_seconds"]["max"] == 2.0
    assert snap["overall"]["time_to_first_chunk_seconds"]["max"] == 4.0
    assert snap["overall"]["time_to_first_chunk_seconds"]["min"] == 0.5
    assert snap["overall"]["time_to_first_chunk_seconds"]["p50"] == pytest.approx(1.0, rel=0.01)
    assert snap["overall"]["tokens"]["total"]["provider"] == 8
    assert [(g["model"], g["provider"], g["streams"]["started"]) for g in snap["groups"]] == [
        ("a", "ollama", 2),
        ("b", "ollama", 1),
        ("b", "openai", 1),
    ]
    # Throughput: 4 completion tokens over the wall span from 0.0 to 305.0.
    assert snap["overall"]["throughput_tokens_per_second"] == 4 / 305.0


def test_bad_aggregator_arguments() -> None:
    with pytest.raises(ValueError, match="relative_accuracy"):
        StatsAggregator(relative_accuracy=1.5)
    with pytest.raises(ValueError, match="keep_streams"):
        StatsAggregator(keep_streams=-1)
    with pytest.raises(ValueError, match="quantiles"):
        StatsAggregator(quantiles=(0.5, 1.0))


def test_coalesced_first_delta_has_no_gap_before_it() -> None:
    events = Script(t0=0.0).delta(1.0, "abc", n=3).delta(2.0, "d").end(2.5, Usage(completion_tokens=4))
    agg, r = run(events)
    assert r["chunks"] == 4
    assert r["time_to_first_chunk"] == 1.0
    gaps = agg.aggregate().dists["inter_chunk_latency_seconds"]
    assert (gaps.count, gaps.min, gaps.max) == (1, 1.0, 1.0)


def test_live_stream_figures_are_visible_before_it_ends() -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from streambus_stats import render_metrics

    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(Script(t0=0.0, model="m", provider="p").delta(0.5, "a").delta(0.75, "b").events)
    snap = agg.snapshot()
    assert snap["live_streams"] == 1
    assert snap["overall"]["time_to_first_chunk_seconds"]["max"] == 0.5
    assert snap["overall"]["inter_chunk_latency_seconds"]["max"] == 0.25
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(agg).decode())}
    (live,) = families["streambus_streams_live"].samples
    assert live.value == 1
    ttfc_count = [
        s for s in families["gen_ai_client_operation_time_to_first_chunk_seconds"].samples if s.name.endswith("_count")
    ]
    assert [s.value for s in ttfc_count] == [1]
    duration_count = [
        s for s in families["gen_ai_client_operation_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert [s.value for s in duration_count] == [0]


def test_cached_cache_creation_and_reasoning_tokens_are_totalled_and_exported() -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from streambus_stats import TOKEN_KINDS, render_metrics

    anthropic = Usage(
        prompt_tokens=1525, completion_tokens=89, total_tokens=1614, cached_input_tokens=1200,
        cache_creation_input_tokens=300,
    )  # fmt: skip
    gemini = Usage(prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920,
                   reasoning_tokens=256)  # fmt: skip
    events = [
        *Script("a", model="claude", provider="anthropic").delta(1.0, "hi").end(1.5, anthropic),
        *Script("g", model="gemini", provider="gemini").delta(1.0, "hi").end(1.5, gemini),
        # No details reported: nothing is made up (the record says null, the totals do not move).
        *Script("o", model="llama", provider="ollama").delta(1.0, "hi").end(1.5, Usage(completion_tokens=1)),
    ]
    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(events)
    records = {r["stream"]: r for r in agg.snapshot()["streams"]}
    assert (records["a"]["cached_input_tokens"], records["a"]["cache_creation_input_tokens"]) == (1200, 300)
    assert records["a"]["reasoning_tokens"] is None
    assert (records["g"]["cached_input_tokens"], records["g"]["reasoning_tokens"]) == (1920, 256)
    assert (records["o"]["cached_input_tokens"], records["o"]["reasoning_tokens"]) == (None, None)
    tokens = agg.snapshot()["overall"]["tokens"]
    assert set(tokens) == set(TOKEN_KINDS)
    assert tokens["cached_input"] == {"provider": 3120, "counted": 0, "all": 3120}
    assert tokens["cache_creation_input"]["all"] == 300 and tokens["reasoning"]["all"] == 256
    assert agg.snapshot()["models"]["gemini"]["tokens"]["reasoning"]["all"] == 256
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(agg).decode())}
    exported = {
        (s.labels["gen_ai_request_model"], s.labels["gen_ai_token_type"], s.labels["source"]): s.value
        for s in families["streambus_tokens"].samples
    }
    assert exported[("claude", "cached_input", "provider")] == 1200
    assert exported[("claude", "cache_creation_input", "provider")] == 300
    assert exported[("gemini", "cached_input", "provider")] == 1920
    assert exported[("gemini", "reasoning", "provider")] == 256
    assert exported[("llama", "reasoning", "provider")] == 0
    assert ("gemini", "reasoning", "counted") not in exported
    # The state carries them across a restart.
    again = StatsAggregator.from_state(agg.to_state())
    assert again.aggregate().token_total("cached_input") == 3120
