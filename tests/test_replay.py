"""The replay producer and `streambus replay`: timing, filters, loops, ids, aborts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest
import structlog
from click.testing import CliRunner
from trio.testing import MockClock

from streambus import (
    AbortEvent,
    Bus,
    ConfigError,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
    Subscription,
    Usage,
)
from streambus.cli import main
from streambus.config import parse_config
from streambus.recording import read_recording, write_recording
from streambus.replay import ReplayProducer, plan_streams
from streambus.testing import EventCapture

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The CLI configures structlog globally; later tests must not inherit its level.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


DATA = Path(__file__).parent / "data"
CHAT = DATA / "chat.jsonl"
VIRTUAL = [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-virtual-clock")]


class Clocked:
    """A sink noting the (virtual) time each event arrives."""

    overflow = "block"

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, Event]] = []

    async def run(self, events: Subscription) -> None:
        async for event in events:
            self.arrivals.append((anyio.current_time(), event))


def stream_events(stream: str, model: str, t0: float, gaps: list[float], provider: str = "p") -> list[Event]:
    out: list[Event] = [StartEvent(stream=stream, seq=0, ts=t0, model=model, provider=provider)]
    t = t0
    for i, gap in enumerate(gaps[:-1], 1):
        t += gap
        out.append(DeltaEvent(stream=stream, seq=i, ts=t, text=f"{stream}{i} "))
    out.append(EndEvent(stream=stream, seq=len(gaps), ts=t + gaps[-1]))
    return out


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
@pytest.mark.parametrize("speed", [1.0, 2.5])
async def test_recorded_gaps_are_reproduced_scaled_by_speed(speed: float) -> None:
    events = stream_events("a", "m", 100.0, [0.5, 0.02, 3.0, 0.25, 0.1])
    clocked = Clocked()
    async with Bus() as bus:
        bus.add_sink(clocked)
        await ReplayProducer(events=events, speed=speed).run(bus)
    times = [t - clocked.arrivals[0][0] for t, _ in clocked.arrivals]
    expected = [(e.ts - 100.0) / speed for e in events]
    assert times == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
async def test_idle_limit_caps_long_pauses_and_burst_has_none() -> None:
    events = stream_events("a", "m", 0.0, [0.5, 30.0, 0.25, 100.0])
    for producer, expected in [
        (ReplayProducer(events=events, idle_limit=1.0), [0.0, 0.5, 1.5, 1.75, 2.75]),
        (ReplayProducer(events=events, burst=True), [0.0] * 5),
    ]:
        clocked = Clocked()
        async with Bus() as bus:
            bus.add_sink(clocked)
            await producer.run(bus)
        assert [t - clocked.arrivals[0][0] for t, _ in clocked.arrivals] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
async def test_interleaved_streams_keep_their_relative_timing() -> None:
    a = stream_events("a", "m", 0.0, [1.0, 1.0, 1.0])
    b = stream_events("b", "m", 0.5, [1.0, 1.0, 1.0])
    merged = sorted(a + b, key=lambda e: e.ts)
    clocked = Clocked()
    async with Bus() as bus:
        bus.add_sink(clocked)
        producer = ReplayProducer(events=merged)
        await producer.run(bus)
    t0 = clocked.arrivals[0][0]
    seen = [(round(t - t0, 6), producer.stream_ids.index(e.stream), e.seq) for t, e in clocked.arrivals]
    assert seen == [(round(e.ts, 6), "ab".index(e.stream), e.seq) for e in merged]


async def test_replay_reproduces_every_kind_of_event() -> None:
    s = "rec-1"
    events: list[Event] = [
        StartEvent(stream=s, seq=0, ts=1.0, model="m", provider="p", meta={"user": "u", "n": 3}),
        DeltaEvent(stream=s, seq=1, ts=1.1, text="thinking", channel="reasoning"),
        DeltaEvent(stream=s, seq=2, ts=1.2, text="Hello 世界"),
        ModerationEvent(
            stream=s, seq=3, ts=1.3, verdict="flagged", categories=["pii"], action="redact", start=0, end=5
        ),
        DeltaEvent(stream=s, seq=4, ts=1.4, text='{"a":', channel="tool"),
        EndEvent(
            stream=s,
            seq=5,
            ts=1.5,
            reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
            timings={"total_duration": 0.123456789},
        ),
        StartEvent(stream="rec-2", seq=0, ts=2.0, model="m"),
        ErrorEvent(stream="rec-2", seq=1, ts=2.1, kind="http_500", message="boom", retryable=True),
        StartEvent(stream="rec-3", seq=0, ts=3.0, model="m"),
        AbortEvent(stream="rec-3", seq=1, ts=3.1, reason="user left", by="client"),
    ]
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        producer = ReplayProducer(events=events, burst=True)
        await producer.run(bus)
    assert producer.id_map.keys() == {"rec-1", "rec-2", "rec-3"}
    assert not set(producer.id_map.values()) & {"rec-1", "rec-2", "rec-3"}  # new ids by default
    for recorded in ("rec-1", "rec-2", "rec-3"):
        want = [msgspec.structs.replace(e, stream="x", ts=0.0) for e in events if e.stream == recorded]
        got = [msgspec.structs.replace(e, stream="x", ts=0.0) for e in capture.of(producer.id_map[recorded])]
        assert got == want
        capture.assert_complete(producer.id_map[recorded])


async def test_keep_ids_publishes_the_recorded_ids() -> None:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        await ReplayProducer(path=str(CHAT), burst=True, keep_ids=True).run(bus)
    assert capture.streams == ["rec-ollama-en", "rec-ollama-ja", "rec-openai-en"]
    recorded = read_recording(CHAT).events
    assert [(e.stream, e.seq, type(e)) for e in capture.events] == [(e.stream, e.seq, type(e)) for e in recorded]


async def test_filters_by_model_provider_and_stream() -> None:
    cases = [
        ({"models": ["llama3.2"]}, ["rec-ollama-en", "rec-ollama-ja"]),
        ({"providers": ["openai"]}, ["rec-openai-en"]),
        ({"streams": ["rec-ollama-ja", "rec-openai-en"]}, ["rec-ollama-ja", "rec-openai-en"]),
        ({"models": ["llama3.2"], "streams": ["rec-openai-en"]}, []),
    ]
    for options, expected in cases:
        capture = EventCapture()
        async with Bus() as bus:
            capture.attach(bus)
            producer = ReplayProducer(path=str(CHAT), burst=True, **options)
            await producer.run(bus)
        assert producer.recorded_streams == expected
        assert [capture.start(producer.id_map[s]).model for s in expected] == [
            "gpt-4o-mini" if "openai" in s else "llama3.2" for s in expected
        ]
        assert len(capture.streams) == len(expected)


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
async def test_loop_plays_the_recording_again_after_its_end() -> None:
    events = stream_events("a", "m", 0.0, [1.0, 1.0])
    clocked = Clocked()
    async with Bus() as bus:
        bus.add_sink(clocked)
        producer = ReplayProducer(events=events, loop=3)
        await producer.run(bus)
    assert len(producer.stream_ids) == len(set(producer.stream_ids)) == 3
    starts = [round(t - clocked.arrivals[0][0], 6) for t, e in clocked.arrivals if isinstance(e, StartEvent)]
    assert starts == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
async def test_loop_forever_stops_with_the_bus() -> None:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(ReplayProducer(events=stream_events("a", "m", 0.0, [1.0, 1.0]), loop=0))
        await capture.wait_streams(5)
        await bus.shutdown()
    assert len(capture.streams) >= 5
    for stream in capture.streams:
        capture.assert_complete(stream)  # the stream live at shutdown ended with abort


@pytest.mark.parametrize("anyio_backend", VIRTUAL)
async def test_abort_stops_a_replayed_stream() -> None:
    events = stream_events("a", "m", 0.0, [1.0] * 10)
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        producer = ReplayProducer(events=events)
        bus.start_producer(producer)
        await capture.wait_for(lambda c: len(c.events) >= 3)
        assert bus.abort(producer.stream_ids[0], reason="moderation says no", by="moderation")
    terminal = capture.terminal()
    assert isinstance(terminal, AbortEvent) and terminal.by == "moderation"
    assert capture.text() == "a1 a2 "
    capture.assert_complete()


async def test_stream_cut_off_by_the_recording_ends_in_error() -> None:
    events = stream_events("a", "m", 0.0, [0.1, 0.1, 0.1])[:-1]
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        await ReplayProducer(events=events, burst=True).run(bus)
    terminal = capture.terminal()
    assert isinstance(terminal, ErrorEvent) and terminal.kind == "truncated"
    assert capture.text() == "a1 a2 "


async def test_events_without_a_recorded_start_are_skipped() -> None:
    orphans = stream_events("joined-late", "m", 0.0, [0.1, 0.1])[1:]
    producer = ReplayProducer(events=orphans + stream_events("a", "m", 1.0, [0.1, 0.1]), burst=True)
    assert producer.skipped == 2 and producer.recorded_streams == ["a"]


def test_plan_streams_never_goes_back_in_time() -> None:
    events = stream_events("a", "m", 10.0, [1.0, 1.0])
    shuffled = [events[0], msgspec.structs.replace(events[1], ts=5.0), events[2]]
    plans, total, _ = plan_streams(shuffled)
    assert plans[0].offsets == (0.0, 0.0, 2.0) and total == 2.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"speed": 0}, r"producers\[0\][.:] ?speed: must be more than 0 and finite, got 0"),
        ({"idle_limit": -1}, r"producers\[0\][.:] ?idle_limit: must be at least 0"),
        ({"loop": -2}, r"producers\[0\][.:] ?loop: must be at least 0"),
        ({"keep_ids": True, "loop": 2}, r"keep_ids: cannot be combined with loop"),
        ({"speeed": 2}, r"producers\[0\]\.speeed: unknown key"),
        ({"path": ""}, r"producers\[0\][.:] ?path: a recording file is required"),
        ({"path": "missing.jsonl"}, r"producers\[0\][.:] ?path: missing.jsonl: cannot open recording"),
    ],
)
def test_config_errors_name_the_key(options: dict[str, object], message: str) -> None:
    table = {"type": "replay", "path": str(CHAT), **options}
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({"producers": [table]}, path="p.toml")
    assert str(info.value).startswith("p.toml: producers[0]")


def test_config_damaged_recording_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(CHAT.read_bytes().replace(b'"seq":2,', b'"seq":"two",', 1))
    with pytest.raises(ConfigError, match=r"producers\[0\][.:] ?path: .*bad.jsonl:4: invalid event"):
        parse_config({"producers": [{"type": "replay", "path": str(path)}]}, path="p.toml")


# -- the command line ---------------------------------------------------------------------


def test_cli_prints_the_text_of_each_stream() -> None:
    result = CliRunner().invoke(main, ["replay", "--speed", "50", "--model", "llama3.2", str(CHAT)])
    assert result.exit_code == 0, result.stderr
    assert "The sky is blue because air scatters short blue light more than red." in result.stdout
    assert "空が青いのは、空気が青い光をより強く散乱するからです。" in result.stdout
    assert "Hello!" not in result.stdout


def test_cli_puts_failure_notes_on_their_own_line(tmp_path: Path) -> None:
    path = tmp_path / "failed.jsonl"
    write_recording(
        path,
        [
            StartEvent(stream="a", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="a", seq=1, ts=1.1, text="half an answ"),
            ErrorEvent(stream="a", seq=2, ts=1.2, kind="upstream", message="model crashed"),
            StartEvent(stream="b", seq=0, ts=2.0, model="m"),
            DeltaEvent(stream="b", seq=1, ts=2.1, text="cut"),
            AbortEvent(stream="b", seq=2, ts=2.2, reason="flagged", by="moderation"),
        ],
    )
    result = CliRunner().invoke(main, ["replay", "--burst", "--keep-ids", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "── a ──\nhalf an answ\n[error upstream: model crashed]\n── b ──\ncut\n[aborted by moderation: flagged]\n"
    )


def test_cli_jsonl_with_keep_ids() -> None:
    result = CliRunner().invoke(main, ["replay", "--burst", "--keep-ids", "--format", "jsonl", str(CHAT)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    recorded = read_recording(CHAT).events
    assert len(lines) == len(recorded)
    assert '"stream":"rec-openai-en"' in lines[-1]


def test_cli_feeds_the_sinks_of_a_config(tmp_path: Path) -> None:
    out = tmp_path / "copy.jsonl"
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[[sinks]]\ntype = "recorder"\npath = "{out}"\n')
    result = CliRunner().invoke(main, ["replay", "--burst", "--repeat", "2", "--config", str(config), str(CHAT)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    copy = read_recording(out)
    original = read_recording(CHAT)
    assert len(copy.streams) == 6
    texts = ["".join(e.text for e in copy.events if isinstance(e, DeltaEvent) and e.stream == s) for s in copy.streams]
    recorded = [
        "".join(e.text for e in original.events if isinstance(e, DeltaEvent) and e.stream == s)
        for s in original.streams
    ]
    assert texts == recorded * 2


def test_cli_bad_options_and_files(tmp_path: Path) -> None:
    bad_speed = CliRunner().invoke(main, ["replay", "--speed", "0", str(CHAT)])
    assert bad_speed.exit_code == 2 and "speed: must be more than 0 and finite, got 0" in bad_speed.stderr
    missing = CliRunner().invoke(main, ["replay", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "cannot open recording" in missing.stderr
    config = tmp_path / "bad.toml"
    config.write_text('[[sinks]]\ntype = "recorder"\nfsync = "never"\n')
    bad_config = CliRunner().invoke(main, ["replay", "--config", str(config), str(CHAT)])
    assert bad_config.exit_code == 1 and "sinks[0].fsync: invalid value" in bad_config.stderr
    nothing = CliRunner().invoke(main, ["replay", "--model", "nope", str(CHAT)])
    assert nothing.exit_code == 0 and "no recorded stream matches" in nothing.stderr


async def test_cli_loop_runs_until_interrupted(tmp_path: Path) -> None:
    # --loop sets loop=0: check the producer it builds rather than waiting forever.
    events = stream_events("a", "m", 0.0, [0.1])
    path = tmp_path / "r.jsonl"
    write_recording(path, events)
    producer = ReplayProducer(path=str(path), loop=0, burst=True)
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(producer)
        await capture.wait_streams(50)
        await bus.shutdown()
    assert len(capture.ended) >= 50
    result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["replay", "--help"]))
    assert "--loop" in result.stdout and "--idle-limit" in result.stdout


@pytest.mark.parametrize("name", ["record.toml", "replay.toml"])
def test_shipped_configs_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    result = CliRunner().invoke(main, ["check", f"configs/{name}"])
    assert result.exit_code == 0, result.output
