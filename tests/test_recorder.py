"""The recorder sink: lossless, crash-safe recordings with templates, rotation, gzip and fsync policies."""

# Blocking file checks in async tests are fine: they run after the bus is done.
# ruff: noqa: ASYNC110, ASYNC230, ASYNC240

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import structlog
from click.testing import CliRunner

from streambus import Bus, ConfigError, DeltaEvent, EndEvent, StartEvent, Usage, encode
from streambus.builtins.recorder import RecorderError, RecorderSink
from streambus.cli import main
from streambus.config import parse_config
from streambus.recording import header_line, read_recording, write_recording
from streambus.testing import EventCapture

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The CLI configures structlog globally; later tests must not inherit its level.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def two_streams(bus: Bus, *, tokens: int = 5) -> list[str]:
    ids = []
    async with (
        bus.stream(model="llama3.2:1b", provider="ollama") as a,
        bus.stream(model="meta/Llama-3", provider="x") as b,
    ):
        ids = [a.stream, b.stream]
        for i in range(tokens):
            await a.delta(f"a{i} ")
            await b.delta(f"b{i} ")
            await anyio.wait_all_tasks_blocked()
        await a.end(usage=Usage(completion_tokens=tokens))
    return ids


async def test_one_file_holds_every_event_in_order(tmp_path: Path) -> None:
    recorder = RecorderSink(path=str(tmp_path / "all.jsonl"), meta={"run": 1})
    capture = EventCapture()
    async with Bus(buffer=4) as bus:
        bus.add_sink(recorder)
        capture.attach(bus)
        await two_streams(bus, tokens=20)
    rec = read_recording(tmp_path / "all.jsonl")
    assert rec.problems == [] and rec.meta == {"run": 1}
    assert rec.events == capture.events
    assert recorder.recorded == len(capture.events) == 2 * 22
    assert recorder.paths == [str(tmp_path / "all.jsonl")]


async def test_per_stream_template_with_model_and_date(tmp_path: Path) -> None:
    recorder = RecorderSink(path=str(tmp_path / "{date}" / "{model}-{stream}.jsonl"))
    async with Bus() as bus:
        bus.add_sink(recorder)
        a, b = await two_streams(bus)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    files = sorted(p.name for p in (tmp_path / today).iterdir())
    # "/" and ":" of model names never reach the file system.
    assert files == sorted([f"llama3.2_1b-{a}.jsonl", f"meta_Llama-3-{b}.jsonl"])
    for path in (tmp_path / today).iterdir():
        events = read_recording(path).events
        assert isinstance(events[0], StartEvent) and isinstance(events[-1], EndEvent)
        assert len({e.stream for e in events}) == 1


async def test_rotation_by_size_gives_standalone_parts(tmp_path: Path) -> None:
    recorder = RecorderSink(path=str(tmp_path / "r.jsonl"), rotate_bytes=600)
    capture = EventCapture()
    async with Bus() as bus:
        bus.add_sink(recorder)
        capture.attach(bus)
        await two_streams(bus, tokens=12)
    assert len(recorder.paths) >= 3
    assert recorder.paths[:3] == [str(tmp_path / n) for n in ("r.jsonl", "r.1.jsonl", "r.2.jsonl")]
    events = []
    for path in recorder.paths:
        rec = read_recording(path)  # each part has its own header
        assert rec.problems == []
        events.extend(rec.events)
    assert events == capture.events
    # Rotated parts replay as one recording.
    result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["replay", "--burst", *recorder.paths]))
    assert result.exit_code == 0, result.stderr
    assert "a0 a1 a2" in result.stdout and "b11" in result.stdout


async def test_gzip(tmp_path: Path) -> None:
    recorder = RecorderSink(path=str(tmp_path / "r.jsonl"), gzip=True)
    capture = EventCapture()
    async with Bus() as bus:
        bus.add_sink(recorder)
        capture.attach(bus)
        await two_streams(bus)
    assert recorder.paths == [str(tmp_path / "r.jsonl.gz")]
    assert (tmp_path / "r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert read_recording(tmp_path / "r.jsonl.gz").events == capture.events


async def test_gzip_never_appends_to_an_existing_member(tmp_path: Path) -> None:
    for _ in range(2):
        async with Bus() as bus:
            recorder = RecorderSink(path=str(tmp_path / "r.jsonl.gz"))
            bus.add_sink(recorder)
            await two_streams(bus, tokens=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.1.jsonl.gz", "r.jsonl.gz"]


async def test_appends_to_an_existing_recording_and_repairs_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first = [StartEvent(stream="old", seq=0, ts=1.0), EndEvent(stream="old", seq=1, ts=2.0)]
    write_recording(path, first)
    with open(path, "ab") as f:
        f.write(b'{"type":"delta","text":"cut by a cra')  # a writer that died mid-line
    logs: list[dict[str, object]]
    with structlog.testing.capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(RecorderSink(path=str(path)))
            await two_streams(bus, tokens=1)
    rec = read_recording(path)
    assert rec.problems == []
    assert rec.events[:2] == first and len(rec.events) == 2 + 6
    assert any(e["event"] == "recorder.repaired_tail" for e in logs)


async def test_refuses_to_append_to_a_file_that_is_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_text("my precious notes\n")
    recorder = RecorderSink(path=str(path))
    with structlog.testing.capture_logs() as logs:
        async with Bus(drain_timeout=2) as bus:
            bus.add_sink(recorder, max_restarts=0)
            await two_streams(bus, tokens=1)
    assert path.read_text() == "my precious notes\n"
    failed = [e for e in logs if e["event"] == "recorder.write_failed"]
    assert failed and "not a streambus recording" in str(failed[0]["error"])


async def test_disk_full_is_a_logged_sink_failure_not_a_bus_crash() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    recorder = RecorderSink(path="/dev/full")
    capture = EventCapture()
    with structlog.testing.capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(recorder)
            capture.attach(bus)
            await two_streams(bus, tokens=3)
    # The bus and its other sinks carried on.
    assert len(capture.ended) == 2 and capture.text(capture.streams[0]) == "a0 a1 a2 "
    failed = [e for e in logs if e["event"] == "recorder.write_failed"]
    assert failed[0]["path"] == "/dev/full" and failed[0]["errno"] == "ENOSPC"
    assert "No space left on device" in str(failed[0]["error"])
    sink_failures = [e for e in logs if e["event"] == "sink.failed"]
    assert sink_failures and "RecorderError" in str(sink_failures[0]["error"])
    assert any(e["event"] == "recorder.gave_up" for e in logs)


async def test_write_error_keeps_unwritten_lines_for_the_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first write after the header fails once (as a full disk would);
    # the supervisor restarts the sink and the retry writes every line once.
    path = tmp_path / "r.jsonl"
    recorder = RecorderSink(path=str(path))
    from streambus.builtins import recorder as module

    real_write = module._File.write
    calls = {"n": 0}

    def flaky(self: module._File, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(module._File, "write", flaky)
    capture = EventCapture()
    with structlog.testing.capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(recorder)
            capture.attach(bus)
            await two_streams(bus, tokens=4)
    assert any(e["event"] == "recorder.write_failed" for e in logs)
    assert read_recording(path).events == capture.events


def test_recorder_error_carries_path_and_errno() -> None:
    error = RecorderError("cannot write", path="/x", errno=28)
    assert str(error) == "/x: cannot write" and error.errno == 28


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


async def fsyncs_per_event(tmp_path: Path, fsyncs: list[int], policy: str, **extra: object) -> list[int]:
    """Write 10 deltas then an end, one at a time; return the fsync count seen after each."""
    recorder = RecorderSink(path=str(tmp_path / f"{policy}.jsonl"), fsync=policy, **extra)  # type: ignore[arg-type]
    seen: list[int] = []
    async with Bus() as bus:
        bus.add_sink(recorder)
        await anyio.wait_all_tasks_blocked()
        before = len(fsyncs)
        async with bus.stream(model="m") as w:
            for i in range(10):
                await w.delta(f"{i}")
                await until(lambda n=i + 2: recorder.recorded >= n)
                if policy == "every_event":
                    # Each event brings a new sync (it follows the write, in a worker
                    # thread): wait for it; with any other policy this times out.
                    last = seen[-1] if seen else 0
                    await until(lambda last=last: len(fsyncs) - before > last)
                seen.append(len(fsyncs) - before)
            await w.end()
        await until(lambda: recorder.recorded == 12)
        await anyio.wait_all_tasks_blocked()
        seen.append(len(fsyncs) - before)
    assert len(read_recording(tmp_path / f"{policy}.jsonl").events) == 12
    return seen


async def test_fsync_every_event(tmp_path: Path, fsyncs: list[int]) -> None:
    seen = await fsyncs_per_event(tmp_path, fsyncs, "every_event")
    assert all(b > a for a, b in itertools.pairwise(seen[:10]))


async def test_fsync_at_stream_end(tmp_path: Path, fsyncs: list[int]) -> None:
    seen = await fsyncs_per_event(tmp_path, fsyncs, "stream_end")
    # Nothing until the end; then the file and (new file) its directory.
    assert seen[:10] == [0] * 10
    assert len(fsyncs) == 2


async def test_fsync_interval_long(tmp_path: Path, fsyncs: list[int]) -> None:
    seen = await fsyncs_per_event(tmp_path, fsyncs, "interval", fsync_interval=3600.0)
    assert seen[:10] == [0] * 10
    assert len(fsyncs) == 2  # once, when the sink finishes


async def test_fsync_interval_syncs_while_idle(tmp_path: Path, fsyncs: list[int]) -> None:
    async with Bus() as bus:
        bus.add_sink(RecorderSink(path=str(tmp_path / "r.jsonl"), fsync="interval", fsync_interval=0.01))
        async with bus.stream(model="m") as w:
            await w.delta("x")
            await until(lambda: len(fsyncs) > 0)  # no further event arrives: the idle timer syncs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "{oops}.jsonl"}, "path: unknown template field {oops}"),
        ({"path": ""}, "path: must not be empty"),
        ({"fsync": "sometimes"}, "sinks[0].fsync: invalid value"),
        ({"fsync_interval": 0}, "fsync_interval: must be more than 0 and finite, got 0"),
        ({"rotate_bytes": 0}, "rotate_bytes: must be at least 1"),
        ({"colour": "red"}, "sinks[0].colour: unknown key"),
    ],
)
def test_config_errors_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sinks": [{"type": "recorder", **options}]}, path="p.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("p.toml: sinks[0]")


def test_config_builds_a_recorder(tmp_path: Path) -> None:
    pipeline = parse_config(
        {"sinks": [{"type": "recorder", "path": str(tmp_path / "x.jsonl"), "fsync": "every_event"}]}
    )
    (entry,) = pipeline.sinks
    assert isinstance(entry.sink, RecorderSink) and entry.sink.options.fsync == "every_event"


# -- failures of the real operating system, in child processes ---------------------------

CHILD = textwrap.dedent(
    """
    import sys, anyio
    from streambus import Bus
    from streambus.builtins.recorder import RecorderSink

    async def main(path, count):
        recorder = RecorderSink(path=path)
        async with Bus() as bus:
            bus.add_sink(recorder)
            async with bus.stream(model="m", provider="p") as w:
                for i in range(count):
                    await w.delta(f"t{i} ")
                    while recorder.recorded < i + 2:  # start + this delta reached the file
                        await anyio.sleep(0.001)
                    print(i, flush=True)
                    await anyio.sleep(0.002)

    anyio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


def test_sigkill_mid_stream_leaves_a_replayable_file(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "killed.jsonl"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), "100000"], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert child.stdout is not None
        acknowledged = -1
        for line in child.stdout:  # bounded: the child writes one line per event
            acknowledged = int(line)
            if acknowledged >= 30:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    rec = read_recording(path)
    deltas = [e for e in rec.events if isinstance(e, DeltaEvent)]
    assert len(deltas) >= acknowledged + 1
    expected = "".join(d.text for d in deltas)
    assert expected.startswith("".join(f"t{i} " for i in range(acknowledged + 1)))

    result = CliRunner().invoke(main, ["replay", "--burst", str(path)])
    assert result.exit_code == 0, result.stderr
    assert expected in result.stdout
    assert "[error truncated" in result.stdout  # the stream never ended

    # A kill that tears the last line in half is reported, and the rest still plays.
    with open(path, "ab") as f:
        f.write(encode(DeltaEvent(stream=deltas[-1].stream, seq=10**6, ts=1.0, text="lost"))[:20])
    torn = CliRunner().invoke(main, ["replay", "--burst", str(path)])
    assert torn.exit_code == 0
    assert expected in torn.stdout and "lost" not in torn.stdout
    assert "last line is incomplete (writer crashed?)" in torn.stderr


PERMISSION_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from streambus import Bus
    from streambus.testing import EventCapture
    from streambus.builtins.recorder import RecorderSink

    async def main(path):
        capture = EventCapture()
        async with Bus() as bus:
            bus.add_sink(RecorderSink(path=path))
            capture.attach(bus)
            async with bus.stream(model="m") as w:
                await w.delta("still flowing")
        print("bus ok:", capture.text(), flush=True)

    anyio.run(main, sys.argv[1])
    """
)


def test_permission_denied_is_a_logged_sink_failure(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    script = tmp_path / "child.py"
    script.write_text(PERMISSION_CHILD)
    command = [sys.executable, str(script), str(locked / "sub" / "r.jsonl")]
    if os.getuid() == 0:
        # Root ignores file permissions; without CAP_DAC_OVERRIDE it obeys them like anyone.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv(1) to drop CAP_DAC_OVERRIDE")
        command = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "bus ok: still flowing" in result.stdout
    logs = result.stdout + result.stderr  # structlog's default output is stdout
    assert "recorder.write_failed" in logs and "Permission denied (EACCES)" in logs
    assert "sink.setup_failed" in logs


async def test_events_of_a_stream_joined_midway_still_get_a_file(tmp_path: Path) -> None:
    recorder = RecorderSink(path=str(tmp_path / "{model}.jsonl"))
    async with Bus() as bus:
        bus.add_sink(recorder)
        await bus.publish(DeltaEvent(stream="late", seq=5, ts=1.0, text="x"))
        await bus.publish(EndEvent(stream="late", seq=6, ts=1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["unknown.jsonl"]
    assert header_line()[:22] == (tmp_path / "unknown.jsonl").read_bytes()[:22]


async def test_a_failed_background_fsync_is_a_logged_sink_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync
    failed = {"n": 0}

    def broken_once(fd: int) -> None:
        if failed["n"] == 0:
            failed["n"] += 1
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", broken_once)
    capture = EventCapture()
    with structlog.testing.capture_logs() as logs:
        async with Bus() as bus:
            bus.add_sink(RecorderSink(path=str(tmp_path / "r.jsonl")))
            capture.attach(bus)
            await two_streams(bus, tokens=3)
            await two_streams(bus, tokens=3)
    failure = next(e for e in logs if e["event"] == "recorder.write_failed")
    assert failure["errno"] == "EIO" and failure["action"] == "cannot sync the recording to disk"
    sink_failure = next(e for e in logs if e["event"] == "sink.failed")
    assert "RecorderError" in str(sink_failure["error"]) and "Input/output error" in str(sink_failure["error"])
    # The lines had reached the file before the sync failed; nothing is lost or doubled.
    assert read_recording(tmp_path / "r.jsonl").events == capture.events


def test_options_follow_the_one_rule(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"RecorderSink: the first argument must be a RecorderSink.Options, got str"):
        RecorderSink("out.jsonl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not both; .*\(got an Options and gzip\)"):
        RecorderSink(RecorderSink.Options(path="a.jsonl"), gzip=True)
    with pytest.raises(TypeError, match=r"unknown field `fsnyc`; did you mean `fsync`\?"):
        RecorderSink(fsnyc="every_event")
    assert RecorderSink(path=tmp_path / "x.jsonl").options.path == str(tmp_path / "x.jsonl")
