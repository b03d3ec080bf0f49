"""Broken pipeline configs, table-driven: ``streambus check`` and ``streambus run`` each print one line naming
the file, the table and the key, and exit 1, never a traceback, a hang or a silent exit 0.

Plugins are reached through their entry points (as a user's config does); rows of a
plugin that is not installed are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from streambus import (
    Bus,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    PipelineFailed,
    StartEvent,
    Subscription,
    is_terminal,
)
from streambus.builtins.synthetic import SyntheticProducer
from streambus.cli import main
from streambus.config import BusConfig, LogConfig, Pipeline, SinkEntry
from streambus.recording import write_recording


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # `streambus run` configures structlog globally; later tests must not inherit it.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    toml: str
    """The config; ``{tmp}`` is the test's temporary directory."""
    where: str
    """The ``table.key`` the error must name."""
    problem: str
    """A piece of the problem the error must state."""
    plugin: str | None = None
    """The entry point (``group:name``) the row needs, when not a built-in."""


SYNTHETIC = '[[producers]]\ntype = "synthetic"\ncount = 1\ntokens = 2\nttft = 0\ntokens_per_second = 0\n'
STDOUT = '[[sinks]]\ntype = "stdout"\n'


def producer(extra: str, kind: str = "synthetic") -> str:
    return f'[[producers]]\ntype = "{kind}"\n{extra}\n'


def sink(extra: str, kind: str) -> str:
    return SYNTHETIC + f'[[sinks]]\ntype = "{kind}"\n{extra}\n'


def bus(extra: str) -> str:
    return f"[bus]\n{extra}\n" + SYNTHETIC + STDOUT


CASES = [
    # --- the 15 of the report -----------------------------------------------------------
    Case("text_file missing", producer('text_file = "{tmp}/none.txt"'), "producers[0].text_file", "No such file"),
    Case("text_file a directory", producer('text_file = "{tmp}"'), "producers[0].text_file", "is a directory"),
    Case("max_bytes -1", bus("max_bytes = -1"), "bus.max_bytes", "must be at least 1, got -1"),
    Case("drain_timeout -5", bus("drain_timeout = -5"), "bus.drain_timeout", "at least 0 and finite, got -5"),
    Case("drain_timeout nan", bus("drain_timeout = nan"), "bus.drain_timeout", "got nan"),
    Case(
        "tokens_per_second nan",
        producer("tokens_per_second = nan"),
        "producers[0].tokens_per_second",
        "must be at least 0 and finite, got nan",
    ),
    Case("ttft inf", producer("ttft = inf"), "producers[0].ttft", "must be at least 0 and finite, got inf"),
    Case(
        "fsync_interval nan",
        sink('path = "{tmp}/r.jsonl"\nfsync = "interval"\nfsync_interval = nan', "recorder"),
        "sinks[0].fsync_interval",
        "must be more than 0 and finite, got nan",
    ),
    Case(
        "recorder path under a file",
        sink('path = "{tmp}/file.txt/rec/{{date}}.jsonl"', "recorder"),
        "sinks[0].path",
        "file.txt is not a directory",
    ),
    Case(
        "recorder path is a directory",
        sink('path = "{tmp}/adir"', "recorder"),
        "sinks[0].path",
        "adir is a directory",
    ),
    Case(
        "history_ttl nan",
        sink("port = 0\nhistory_ttl = nan", "websocket"),
        "sinks[0].history_ttl",
        "got nan",
        "streambus.sinks:websocket",
    ),
    Case(
        "max_message_rate inf",
        sink("port = 0\nmax_message_rate = inf", "websocket"),
        "sinks[0].max_message_rate",
        "must be more than 0 and finite, got inf",
        "streambus.sinks:websocket",
    ),
    Case(
        "tokens_file missing",
        sink('port = 0\ntokens_file = "{tmp}/tokens.txt"', "websocket"),
        "sinks[0].tokens_file",
        "no such file",
        "streambus.sinks:websocket",
    ),
    Case(
        "tokens_file empty",
        sink('port = 0\ntokens_file = "{tmp}/empty.txt"', "websocket"),
        "sinks[0].tokens_file",
        "holds no token",
        "streambus.sinks:websocket",
    ),
    Case(
        "tokens_file a directory",
        sink('port = 0\ntokens_file = "{tmp}/adir"', "websocket"),
        "sinks[0].tokens_file",
        "not a regular file",
        "streambus.sinks:websocket",
    ),
    # --- more: the core and built-ins ------------------------------------------------------
    Case("buffer 0", bus("buffer = 0"), "bus.buffer", "must be at least 1, got 0"),
    Case("drain_timeout inf", bus("drain_timeout = inf"), "bus.drain_timeout", "got inf"),
    Case("max_bytes nan", bus("max_bytes = nan"), "bus.max_bytes", "expected integer, got nan"),
    Case("sink buffer -3", SYNTHETIC + STDOUT + "buffer = -3\n", "sinks[0].buffer", "must be at least 1, got -3"),
    Case("text_file not UTF-8", producer('text_file = "{tmp}/latin1.txt"'), "producers[0].text_file", "not UTF-8"),
    Case("ttft -1", producer("ttft = -1.0"), "producers[0].ttft", "got -1.0"),
    Case("jitter nan", producer("jitter = nan"), "producers[0].jitter", "at least 0 and at most 1, got nan"),
    Case("jitter 1.5", producer("jitter = 1.5"), "producers[0].jitter", "at most 1, got 1.5"),
    Case("count -1", producer("count = -1"), "producers[0].count", "must be at least 0, got -1"),
    Case("concurrency 0", producer("concurrency = 0"), "producers[0].concurrency", "must be at least 1, got 0"),
    Case("tokens_per_second -inf", producer("tokens_per_second = -inf"), "producers[0].tokens_per_second", "-inf"),
    Case(
        "fsync_interval inf",
        sink('path = "{tmp}/r.jsonl"\nfsync_interval = inf', "recorder"),
        "sinks[0].fsync_interval",
        "got inf",
    ),
    Case(
        "rotate_bytes 0",
        sink('path = "{tmp}/r.jsonl"\nrotate_bytes = 0', "recorder"),
        "sinks[0].rotate_bytes",
        "must be at least 1, got 0",
    ),
    Case("replay speed nan", producer('path = "{tmp}/r.jsonl"\nspeed = nan', "replay"), "producers[0].speed", "nan"),
    Case("replay speed 0", producer('path = "{tmp}/r.jsonl"\nspeed = 0', "replay"), "producers[0].speed", "got 0"),
    Case(
        "replay idle_limit inf",
        producer('path = "{tmp}/r.jsonl"\nidle_limit = inf', "replay"),
        "producers[0].idle_limit",
        "got inf",
    ),
    Case("replay loop -1", producer('path = "{tmp}/r.jsonl"\nloop = -1', "replay"), "producers[0].loop", "got -1"),
    Case(
        "replay path missing",
        producer('path = "{tmp}/none.jsonl"', "replay"),
        "producers[0].path",
        "cannot open recording",
    ),
    # --- more: plugins ---------------------------------------------------------------------
    Case(
        "websocket close_timeout -1",
        sink("port = 0\nclose_timeout = -1.0", "websocket"),
        "sinks[0].close_timeout",
        "got -1.0",
        "streambus.sinks:websocket",
    ),
    Case(
        "websocket ping_interval nan",
        sink("port = 0\nping_interval = nan", "websocket"),
        "sinks[0].ping_interval",
        "got nan",
        "streambus.sinks:websocket",
    ),
    Case(
        "stats interval nan",
        sink("interval = nan", "stats"),
        "sinks[0].interval",
        "got nan",
        "streambus.sinks:stats",
    ),
    Case(
        "stats read_pause inf",
        sink("read_pause = inf", "stats"),
        "sinks[0].read_pause",
        "at most 1, got inf",
        "streambus.sinks:stats",
    ),
    Case(
        "stats quantiles nan",
        sink("quantiles = [0.5, nan]", "stats"),
        "sinks[0].quantiles[1]",
        "more than 0 and less than 1, got nan",
        "streambus.sinks:stats",
    ),
    Case(
        "stats state_file under a file",
        sink('state_file = "{tmp}/file.txt/state.json"', "stats"),
        "sinks[0].state_file",
        "is not a directory",
        "streambus.sinks:stats",
    ),
    Case(
        "http keepalive inf",
        sink("port = 0\nkeepalive = inf", "http"),
        "sinks[0].keepalive",
        "got inf",
        "streambus.sinks:http",
    ),
    Case(
        "http write_interval nan",
        sink("port = 0\nwrite_interval = nan", "http"),
        "sinks[0].write_interval",
        "got nan",
        "streambus.sinks:http",
    ),
    Case(
        "redis batch_max_ms nan",
        sink("batch_max_ms = nan", "redis"),
        "sinks[0].batch_max_ms",
        "at least 0 and at most 10000, got nan",
        "streambus.sinks:redis",
    ),
    Case(
        "redis position_file under a file",
        producer('position = "file"\nposition_file = "{tmp}/file.txt/pos.json"', "redis") + STDOUT,
        "producers[0].position_file",
        "is not a directory",
        "streambus.producers:redis",
    ),
    Case(
        "nats batch_max_ms nan",
        sink("batch_max_ms = nan", "nats"),
        "sinks[0].batch_max_ms",
        "at least 0 and at most 10000, got nan",
        "streambus.sinks:nats",
    ),
    Case(
        "nats prefix with a wildcard",
        sink('prefix = "llm.>"', "nats"),
        "sinks[0].prefix",
        "must be subject tokens",
        "streambus.sinks:nats",
    ),
    Case(
        "nats position_file under a file",
        producer('position = "file"\nposition_file = "{tmp}/file.txt/pos.json"', "nats") + STDOUT,
        "producers[0].position_file",
        "is not a directory",
        "streambus.producers:nats",
    ),
    Case(
        "ollama timeout inf",
        producer('model = "m"\nprompt = "p"\ntimeout = inf', "ollama"),
        "producers[0].timeout",
        "more than 0 and finite, got inf",
        "streambus.producers:ollama",
    ),
    Case(
        "ollama retry_backoff nan",
        producer('model = "m"\nprompt = "p"\nretry_backoff = nan', "ollama"),
        "producers[0].retry_backoff",
        "got nan",
        "streambus.producers:ollama",
    ),
    Case(
        "openai request temperature nan",
        producer('model = "m"\n[[producers.requests]]\nprompt = "p"\ntemperature = nan', "openai"),
        "producers[0].requests[0].temperature",
        "at least 0 and finite, got nan",
        "streambus.producers:openai",
    ),
    Case(
        "moderation timeout_ms nan",
        sink('timeout_ms = nan\nmoderator = {{type = "keywords", words = {{x = ["bad"]}}}}', "moderation"),
        "sinks[0].timeout_ms",
        "got nan",
        "streambus.sinks:moderation",
    ),
    Case(
        "transformers top_p nan",
        producer('model = "{tmp}"\nprompt = "p"\ntop_p = nan', "transformers"),
        "producers[0].top_p",
        "more than 0 and at most 1, got nan",
        "streambus.producers:transformers",
    ),
]


def _installed(plugin: str | None) -> bool:
    if plugin is None:
        return True
    group, name = plugin.split(":")
    return any(ep.name == name for ep in entry_points(group=group))


def _write(tmp_path: Path, case: Case) -> Path:
    (tmp_path / "file.txt").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.txt").write_text("# no token here\n\n")
    (tmp_path / "latin1.txt").write_bytes("café olé\n".encode("latin-1"))
    (tmp_path / "r.jsonl").write_bytes(
        b'{"streambus_recording": 1, "created": 1.0, "meta": {}}\n'
        b'{"type":"start","stream":"s","seq":0,"ts":1.0,"model":"m","provider":"p","meta":{}}\n'
        b'{"type":"end","stream":"s","seq":1,"ts":1.5,"reason":"stop"}\n'
    )
    config = tmp_path / "pipeline.toml"
    config.write_text(case.toml.format(tmp=tmp_path))
    return config


def test_the_table_covers_the_report() -> None:
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check_and_run_name_the_table_and_key(tmp_path: Path, case: Case) -> None:
    if not _installed(case.plugin):
        pytest.skip(f"{case.plugin} is not installed")
    config = _write(tmp_path, case)
    expected = f"{config}: {case.where}: "

    checked = CliRunner().invoke(main, ["check", str(config)])
    assert checked.exit_code == 1, checked.output
    assert checked.stdout == ""
    assert checked.stderr.startswith(f"error: {expected}"), checked.stderr
    assert case.problem in checked.stderr
    assert checked.stderr.count("\n") == 1 and "Traceback" not in checked.output

    ran = CliRunner().invoke(main, ["run", str(config)])
    assert ran.exit_code == 1, ran.output
    assert isinstance(ran.exception, SystemExit)  # a handled error, not a crash
    assert ran.stderr == checked.stderr.replace("error: ", "Error: ", 1)


# --- what only running can tell: `run` fails fast and exits non-zero ------------------------


class _CannotStart:
    """A sink whose resource is taken (as a port in use would be)."""

    def __init__(self) -> None:
        self.ran = False

    async def setup(self, bus: Bus) -> None:
        raise OSError(98, "Address already in use")

    async def run(self, events: Subscription) -> None:
        self.ran = True


class _Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def run(self, events: Subscription) -> None:
        while batch := await events.receive_batch():
            self.events.extend(batch)


class _Boom:
    async def run(self, bus: Bus) -> None:
        async with bus.stream(model="m") as w:
            await w.delta("half")
            raise RuntimeError("upstream went away")


def _pipeline(producers: list[object], sinks: list[object]) -> Pipeline:
    plugins = [(f"producers[{i}]", p) for i, p in enumerate(producers)]
    plugins += [(f"sinks[{i}]", s) for i, s in enumerate(sinks)]
    return Pipeline(
        path="p.toml",
        bus=BusConfig(drain_timeout=5),
        log=LogConfig(),
        producers=producers,  # type: ignore[arg-type]
        sinks=[SinkEntry(sink=s, name=f"sink{i}") for i, s in enumerate(sinks)],  # type: ignore[arg-type]
        plugins=plugins,
    )


@pytest.mark.anyio
async def test_a_sink_that_cannot_start_stops_the_run() -> None:
    # Endless without the stop: 10,000 streams at one token per second.
    endless = SyntheticProducer(SyntheticProducer.Options(count=10_000, tokens_per_second=1.0, ttft=0))
    failing, collected = _CannotStart(), _Collect()
    with pytest.raises(PipelineFailed, match=r"^p\.toml: sinks\[0\]: could not start: .*Address already in use$"):
        await _pipeline([endless], [failing, collected]).run()
    assert not failing.ran
    assert len(endless.stream_ids) < 10_000
    # Every stream that started was closed, so the other sinks saw complete streams.
    assert sum(isinstance(e, StartEvent) for e in collected.events) == sum(is_terminal(e) for e in collected.events)


@pytest.mark.anyio
async def test_a_failed_producer_makes_the_run_fail_after_the_others_finish() -> None:
    fine = SyntheticProducer(SyntheticProducer.Options(count=2, tokens=3, tokens_per_second=0, ttft=0))
    collected = _Collect()
    with pytest.raises(PipelineFailed, match=r"^p\.toml: producers\[1\]: failed: upstream went away$"):
        await _pipeline([fine, _Boom()], [collected]).run()
    ended = [e for e in collected.events if isinstance(e, EndEvent)]
    assert len(ended) == 2  # the healthy producer finished its streams
    assert "half" in [e.text for e in collected.events if isinstance(e, DeltaEvent)]


def test_cli_run_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    if not _installed("streambus.sinks:websocket"):
        pytest.skip("streambus-websocket is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "p.toml"
        config.write_text(
            '[[producers]]\ntype = "synthetic"\ncount = 100\ntokens_per_second = 1\n'
            f'[[sinks]]\ntype = "websocket"\nport = {port}\n'
        )
        assert CliRunner().invoke(main, ["check", str(config)]).exit_code == 0  # only running can tell
        ran = CliRunner().invoke(main, ["run", str(config)])
    assert ran.exit_code == 1, ran.output
    assert isinstance(ran.exception, SystemExit)
    assert ran.stderr.startswith(f"Error: {config}: sinks[0]: could not start: ")
    assert ran.stderr.endswith("\n") and ran.stderr.count("\n") == 1


def test_replay_into_a_pipeline_runs_its_preflight(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a directory\n")
    config = tmp_path / "p.toml"
    config.write_text(f'[[sinks]]\ntype = "recorder"\npath = "{tmp_path}/file.txt/rec.jsonl"\n')
    recording = Path(__file__).parent / "data" / "chat.jsonl"
    ran = CliRunner().invoke(main, ["replay", "--burst", "--config", str(config), str(recording)])
    assert ran.exit_code == 1
    assert ran.stderr == f"Error: {config}: sinks[0].path: {tmp_path}/file.txt is not a directory\n"


@pytest.mark.skipif(
    not Path("/proc/self").is_dir() or os.geteuid() != 0,
    reason="needs Linux /proc as root: permissions allow writing, only creating the directory fails",
)
def test_run_recorder_directory_that_cannot_be_created_is_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text(SYNTHETIC + '[[sinks]]\ntype = "recorder"\npath = "/proc/streambus-rec/{date}.jsonl"\n')
    checked = CliRunner().invoke(main, ["check", str(config)])
    assert checked.exit_code == 0  # writable as far as permissions go: only creating it tells
    ran = CliRunner().invoke(main, ["run", str(config)])
    assert ran.exit_code == 1, ran.output
    assert isinstance(ran.exception, SystemExit)
    assert "Traceback" not in ran.output
    assert ran.stderr.splitlines()[-1] == (
        f"Error: {config}: sinks[0]: could not start: "
        "/proc/streambus-rec: cannot create the recording directory: No such file or directory (ENOENT)"
    )


def _failing_recording(path: Path) -> Path:
    """One stream that ends well and one that ends in an upstream error."""
    write_recording(
        path,
        [
            StartEvent(stream="good", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="good", seq=1, ts=1.0, text="fine"),
            EndEvent(stream="good", seq=2, ts=1.0),
            StartEvent(stream="bad", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="bad", seq=1, ts=1.0, text="par"),
            ErrorEvent(stream="bad", seq=2, ts=1.0, kind="upstream_error", message="model crashed"),
        ],
    )
    return path


def test_run_exits_1_when_a_stream_ended_in_error(tmp_path: Path) -> None:
    recording = _failing_recording(tmp_path / "rec.jsonl")
    config = tmp_path / "p.toml"
    config.write_text(f'[[producers]]\ntype = "replay"\npath = "{recording}"\nburst = true\n')
    ran = CliRunner().invoke(main, ["run", str(config)])
    assert ran.exit_code == 1, ran.output
    assert ran.stderr.count("\n") == 1
    assert "1 stream(s) ended in error (first: stream " in ran.stderr
    assert "upstream_error: model crashed); set [run] fail_on_stream_error = false" in ran.stderr


def test_run_keeps_going_when_told_to(tmp_path: Path) -> None:
    """Long-running pipelines keep today's behaviour: streams that fail are the producers' business."""
    recording = _failing_recording(tmp_path / "rec.jsonl")
    config = tmp_path / "p.toml"
    config.write_text(
        f'[run]\nfail_on_stream_error = false\n[[producers]]\ntype = "replay"\npath = "{recording}"\nburst = true\n'
    )
    ran = CliRunner().invoke(main, ["run", str(config)])
    assert ran.exit_code == 0, ran.output


def test_run_table_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text('[run]\nfail_on_stream_error = "yes"\n')
    checked = CliRunner().invoke(main, ["check", str(config)])
    assert checked.exit_code == 1
    assert "run.fail_on_stream_error" in checked.stderr
