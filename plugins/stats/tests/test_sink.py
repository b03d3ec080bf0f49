"""The stats sink on a real bus; /metrics and /stats over real HTTP on loopback."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from streambus_stats import StatsAggregator, StatsSink, stats_command
from streambus_stats._sink import next_pause
from structlog.testing import capture_logs

from streambus import Bus, ConfigError, Usage
from streambus.plugins import build, load

pytestmark = pytest.mark.anyio


async def produce(bus: Bus) -> None:
    """Three streams: two llama3 on ollama (one ends, one errors), one gpt-4o on openai aborted by the client."""
    async with bus.stream(model="llama3", provider="ollama") as w:
        await w.delta("Hello")
        await w.delta(" there", channel="content")
        await w.end(usage=Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6), timings={"eval_duration": 0.5})
    async with bus.stream(model="llama3", provider="ollama") as w:
        await w.delta("thinking", channel="reasoning")
        await w.error("http_500", "upstream failed")
    async with bus.stream(model="gpt-4o", provider="openai") as w:
        await w.delta("Sure")
        await w.abort("user left", by="client")


async def test_sink_aggregates_a_bus_and_logs_a_final_summary(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    sink = StatsSink(StatsSink.Options(interval=0, tokenizer="approx", state_file=str(state_file)))
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(sink)
            await produce(bus)
    snap = sink.snapshot()
    overall = snap["overall"]
    assert overall["streams"] == {
        "started": 3,
        "finished": 3,
        "live": 0,
        "outcomes": {"abort": 1, "end": 1, "error": 1},
    }
    assert overall["errors"] == {"http_500": 1}
    assert overall["aborts"] == {"client": 1}
    assert overall["end_reasons"] == {"stop": 1}
    assert overall["chunks"] == 4
    assert overall["tokens"]["completion"] == {"provider": 2, "counted": 2 + 1, "all": 5}
    assert snap["models"]["llama3"]["streams"]["started"] == 2
    assert snap["providers"]["openai"]["aborts"] == {"client": 1}
    assert snap["models"]["llama3"]["provider_tokens_per_second"]["max"] == 4.0  # 2 tokens / 0.5 s
    finals = [e for e in logs if e["event"] == "stats.final"]
    assert [(e["scope"], e.get("model")) for e in finals] == [
        ("overall", None),
        ("model", "gpt-4o"),
        ("model", "llama3"),
    ]
    assert finals[0]["streams"] == 3 and finals[0]["errors"] == 1 and finals[0]["aborts"] == 1
    saved = StatsAggregator.from_state(orjson.loads(state_file.read_bytes()))
    assert saved.snapshot(streams=False)["overall"] == overall


class WatchedSink(StatsSink):
    """Signals each summary line, so the test waits on an event instead of polling."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.logged = anyio.Event()

    def log_summary(self, *, final: bool = False) -> None:
        super().log_summary(final=final)
        if self.aggregator.aggregate().finished == 3:
            self.logged.set()


async def test_periodic_summary_lines() -> None:
    sink = WatchedSink(interval=0.01, tokenizer="approx")
    with capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(sink)
            await produce(bus)
            with anyio.fail_after(10):
                await sink.logged.wait()
    line = next(e for e in logs if e["event"] == "stats.summary" and e["finished"] == 3)
    assert line["streams"] == 3 and line["live"] == 0
    assert line["ttfc_p50"] is not None


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_metrics_and_stats_over_http(anyio_backend: str) -> None:
    sink = StatsSink(port=0, interval=0, tokenizer="approx")
    async with Bus() as bus:
        bus.add_sink(sink)
        await produce(bus)
        with anyio.fail_after(10):
            while sink.aggregator.aggregate().finished < 3:
                await anyio.wait_all_tasks_blocked()
        assert sink.url is not None and sink.url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sink.url}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await resp.text()
            async with http.get(f"{sink.url}/stats?streams=0") as resp:
                stats = await resp.json()
            async with http.get(f"{sink.url}/stats") as resp:
                with_streams = await resp.json()
            async with http.get(f"{sink.url}/stats/state") as resp:
                state = await resp.json()
    parsed = families(text)
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "ollama", "gen_ai_request_model": "llama3"}

    duration = parsed["gen_ai_client_operation_duration_seconds"]
    assert duration.type == "histogram"
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in duration.samples
        if {**s.labels, "le": ""}.items() >= {**labels, "le": ""}.items()
    }
    assert samples[("gen_ai_client_operation_duration_seconds_count", None)] == 2
    assert samples[("gen_ai_client_operation_duration_seconds_bucket", "+Inf")] == 2
    e2e_sum = sink.aggregator.aggregate(model="llama3").dists["e2e_seconds"].total
    assert math.isclose(samples[("gen_ai_client_operation_duration_seconds_sum", None)], e2e_sum)

    ttfc = parsed["gen_ai_client_operation_time_to_first_chunk_seconds"]
    counts = [s.value for s in ttfc.samples if s.name.endswith("_count")]
    assert sorted(counts) == [1, 2]  # gpt-4o: 1 stream; llama3: 2 (reasoning counts)
    chunk = parsed["gen_ai_client_operation_time_per_output_chunk_seconds"]
    assert sum(s.value for s in chunk.samples if s.name.endswith("_count")) == 1  # one gap: "Hello" -> " there"

    usage = parsed["gen_ai_client_token_usage"]
    out = [
        s
        for s in usage.samples
        if s.name == "gen_ai_client_token_usage_sum" and s.labels["gen_ai_token_type"] == "output"
    ]
    assert sorted(s.value for s in out) == [1.0, 4.0]  # gpt-4o counted 1; llama3 2 provider + 2 counted

    finished = {
        (s.labels["gen_ai_request_model"], s.labels["outcome"], s.labels["reason"]): s.value
        for s in parsed["streambus_streams_finished"].samples
    }
    assert finished == {
        ("llama3", "end", "stop"): 1,
        ("llama3", "error", "http_500"): 1,
        ("gpt-4o", "abort", "client"): 1,
    }
    tokens = {
        (s.labels["gen_ai_request_model"], s.labels["gen_ai_token_type"], s.labels["source"]): s.value
        for s in parsed["streambus_tokens"].samples
    }
    assert tokens[("llama3", "output", "provider")] == 2
    assert tokens[("llama3", "output", "counted")] == 2
    assert tokens[("llama3", "input", "provider")] == 4
    quantiles = {
        (s.labels["gen_ai_request_model"], s.labels["figure"], s.labels["quantile"]): s.value
        for s in parsed["streambus_latency_quantile_seconds"].samples
    }
    assert quantiles[("llama3", "e2e", "1")] == sink.aggregator.aggregate(model="llama3").dists["e2e_seconds"].max
    assert parsed["streambus_streams_live"].samples[0].value == 0

    assert stats["overall"]["streams"]["started"] == 3
    assert "streams" not in stats
    assert len(with_streams["streams"]) == 3
    assert StatsAggregator.from_state(state).snapshot(streams=False)["overall"] == stats["overall"]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_http_endpoint_under_trio_fails_clearly(anyio_backend: str) -> None:
    sink = StatsSink(port=0)
    async with Bus() as bus:
        with pytest.raises(RuntimeError, match="needs asyncio.*trio.*leave `port` unset"):
            await sink.setup(bus)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_port_in_use_is_reported(anyio_backend: str) -> None:
    first = StatsSink(port=0)
    async with Bus() as bus:
        await first.setup(bus)
        try:
            assert first.url is not None
            taken = int(first.url.rsplit(":", 1)[1])
            with pytest.raises(OSError, match="(?i)address already in use"):
                await StatsSink(port=taken).setup(bus)
        finally:
            await first.teardown()


def test_options_are_validated_with_the_key_named() -> None:
    for kwargs, key in (
        ({"port": 70000}, "port"),
        ({"interval": -1}, "interval"),
        ({"relative_accuracy": 0}, "relative_accuracy"),
        ({"quantiles": [0.5, 2]}, "quantiles"),
        ({"quantiles": []}, "quantiles"),
        ({"keep_streams": -2}, "keep_streams"),
        ({"read_pause": 5}, "read_pause"),
        ({"read_pause": -0.5}, "read_pause"),
        ({"read_batch": 0}, "read_batch"),
    ):
        with pytest.raises(ValueError, match=f"^{key}: "):
            StatsSink(**kwargs)
    with pytest.raises(TypeError):
        StatsSink(prot=9000)
    with pytest.raises(ConfigError, match=r"sinks\[0\].port: expected .*int.*got \"abc\""):
        build("sinks", "stats", {"port": "abc"}, location="sinks[0]")
    with pytest.raises(ConfigError, match=r"unknown key"):
        build("sinks", "stats", {"prot": 1}, location="sinks[0]")
    with pytest.raises(ConfigError, match=r"interval: must be"):
        build("sinks", "stats", {"interval": -5}, location="sinks[0]")
    sink = build("sinks", "stats", {"port": 9464, "tokenizer": "approx"})
    assert isinstance(sink, StatsSink) and sink.options.port == 9464


def test_the_pause_between_reads_follows_the_rate_and_is_capped() -> None:
    # 512 events came in over 1 ms (0.8 ms pause + 0.2 ms read): 2048 take 4 ms at that rate.
    assert next_pause(0.0008, 0.0002, 512, 2048, 0.01) == pytest.approx(0.004)
    # A slow bus: 100 events over 5 ms would mean a 102 ms pause; read_pause caps it.
    assert next_pause(0.004, 0.001, 100, 2048, 0.01) == 0.01
    # A batch bigger than read_batch: a shorter pause, so the reads come back to about 2048 events.
    assert next_pause(0.004, 0.001, 2560, 2048, 0.01) == pytest.approx(0.004)
    # Four times read_batch or more: the sink is falling behind, so it reads again at once; after that
    # (no pause to measure a rate over) a full batch is read at once again, a small one after a short pause.
    assert next_pause(0.004, 0.001, 4 * 2048, 2048, 0.01) == 0.0
    assert next_pause(0.0, 0.001, 2048, 2048, 0.01) == 0.0
    assert next_pause(0.0, 0.0, 10, 2048, 0.01) == 0.001
    # read_pause=0 never pauses; read_batch=1 never pauses either (every read is a full batch, from pause 0).
    assert next_pause(0.004, 0.001, 100, 2048, 0.0) == 0.0
    assert next_pause(0.0, 0.001, 1, 1, 0.01) == 0.0


async def test_without_a_read_pause_the_sink_reads_each_event_as_it_comes() -> None:
    sink = StatsSink(interval=0, tokenizer="approx", read_pause=0)
    async with Bus() as bus:
        bus.add_sink(sink)
        await anyio.wait_all_tasks_blocked()
        async with bus.stream(model="m", provider="p") as w:
            for k in range(5):
                await w.delta(f"chunk {k}")
                await anyio.wait_all_tasks_blocked()
                assert sink.aggregator.events == 2 + k  # the start and every delta so far, no pause between
            await w.end()
    assert sink.snapshot()["overall"]["chunks"] == 5


def test_entry_points() -> None:
    assert load("sinks", "stats") is StatsSink
    assert load("commands", "stats") is stats_command


def test_the_sink_and_the_command_run_without_numpy(tmp_path: Path) -> None:
    # numpy is no dependency (only --plot's matplotlib brings it): aggregating, /metrics, tables and states
    # must not import it. A fresh interpreter, so that other tests' imports do not count.
    script = """
import sys
from click.testing import CliRunner
from streambus.events import DeltaEvent, EndEvent, StartEvent
from streambus_stats import StatsAggregator, render_metrics, stats_command
agg = StatsAggregator(tokenizer="approx")
agg.feed_many([StartEvent(stream="s", seq=0, ts=0.0, model="m"), DeltaEvent(stream="s", seq=1, ts=0.5, text="hi"),
               DeltaEvent(stream="s", seq=2, ts=0.75, text="!"), EndEvent(stream="s", seq=3, ts=1.0)])
assert agg.aggregate().dists["inter_chunk_latency_seconds"].quantile(0.5) is not None
render_metrics(agg)
state = sys.argv[1] + "/s.json"
open(state, "wb").write(__import__("orjson").dumps(agg.to_state()))
result = CliRunner().invoke(stats_command, [state, "--json"])
assert result.exit_code == 0, result.output
print("numpy" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


async def test_live_figures_equal_offline_figures_of_the_recording(tmp_path: Path) -> None:
    # The same run measured live by the sink and later from the recorder's file: timing comes
    # from `ts` in both, so every figure must be identical.
    from streambus_stats import summarise

    from streambus.builtins.recorder import RecorderSink

    path = tmp_path / "run.jsonl"
    sink = StatsSink(interval=0, tokenizer="approx")
    async with Bus() as bus:
        bus.add_sink(sink)
        bus.add_sink(RecorderSink(RecorderSink.Options(path=str(path))))
        await produce(bus)
    offline = summarise([path], tokenizer="approx").snapshot()
    live = sink.snapshot()
    assert offline["overall"] == live["overall"]
    assert offline["models"] == live["models"]
    assert sorted(offline["streams"], key=lambda r: r["stream"]) == sorted(live["streams"], key=lambda r: r["stream"])
