"""The recording format v1 reader and writer: damage is reported by line, never silently."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog
from click.testing import CliRunner

from streambus import DeltaEvent, EndEvent, RecordingError, StartEvent, Usage, encode
from streambus.cli import main
from streambus.recording import (
    FORMAT_VERSION,
    header_line,
    iter_recording,
    open_recording,
    read_recording,
    write_recording,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The CLI configures structlog globally; later tests must not inherit its level.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


DATA = Path(__file__).parent / "data"


def sample(stream: str = "s1", text: str = "Hello, 世界") -> list[StartEvent | DeltaEvent | EndEvent]:
    return [
        StartEvent(stream=stream, seq=0, ts=10.0, model="m", provider="p", meta={"user": "u"}),
        DeltaEvent(stream=stream, seq=1, ts=10.1, text=text[:5]),
        DeltaEvent(stream=stream, seq=2, ts=10.2, text=text[5:]),
        EndEvent(stream=stream, seq=3, ts=10.3, usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
    ]


def test_round_trip_keeps_header_and_events(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_recording(path, sample(), meta={"app": "demo"}, created=123.5)
    rec = read_recording(path)
    assert rec.version == FORMAT_VERSION
    assert rec.created == 123.5
    assert rec.meta == {"app": "demo"}
    assert rec.events == sample()
    assert rec.problems == [] and not rec.truncated
    assert rec.streams == ["s1"]


def test_gzip_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl.gz"
    write_recording(path, sample())
    with open(path, "rb") as raw:
        assert raw.read(2) == b"\x1f\x8b"
    assert read_recording(path).events == sample()


def test_truncated_last_line_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_recording(path, sample())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 15])  # cut into the middle of the end event
    rec = read_recording(path)
    assert rec.events == sample()[:3]
    assert rec.truncated
    (problem,) = rec.problems
    assert problem.line == 5 and problem.kind == "truncated"
    assert "incomplete" in problem.message


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_recording(path, sample())
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    rec = read_recording(path)
    assert rec.events == sample() and rec.problems == []


def test_truncated_gzip_keeps_what_was_flushed(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl.gz"
    write_recording(path, sample())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])  # lose the gzip trailer, as a killed writer does
    assert read_recording(path).events == sample()


def test_garbage_in_the_middle_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    lines = [header_line(), *(encode(e) + b"\n" for e in sample())]
    lines.insert(3, b"this is not json\n")
    path.write_bytes(b"".join(lines))
    with pytest.raises(RecordingError) as info:
        read_recording(path)
    assert info.value.line == 4
    assert str(info.value).startswith(f"{path}:4: ")
    rec = read_recording(path, lenient=True)
    assert rec.events == sample()
    (problem,) = rec.problems
    assert (problem.line, problem.kind) == (4, "invalid")


def test_invalid_event_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    bad = orjson.dumps({"type": "delta", "stream": "s1", "seq": 1, "ts": 1.0})  # no text
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n" + bad + b"\n" + encode(sample()[3]) + b"\n")
    with pytest.raises(RecordingError, match=r":3: .*text"):
        read_recording(path)


def test_blank_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n\n" + encode(sample()[3]) + b"\n")
    with pytest.raises(RecordingError, match=r":3: blank line"):
        read_recording(path)


def test_wrong_version_header(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(orjson.dumps({"streambus_recording": 2, "created": 1.0, "meta": {}}) + b"\n")
    with pytest.raises(RecordingError, match=r":1: unsupported recording version 2 \(this streambus reads version 1\)"):
        read_recording(path)


def test_wrong_version_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    second = orjson.dumps({"streambus_recording": 7, "created": 1.0, "meta": {}}) + b"\n"
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n" + second + encode(sample()[3]) + b"\n")
    with pytest.raises(RecordingError, match=r":3: a recording header of unsupported version 7"):
        read_recording(path)
    same = header_line()
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n" + same + encode(sample()[3]) + b"\n")
    with pytest.raises(RecordingError, match=r":3: a second recording header"):
        read_recording(path)
    assert len(read_recording(path, lenient=True).problems) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"not json\n", "line 1 is not a JSON header"),
        (b'{"type": "start"}\n', 'lacks the "streambus_recording" header'),
        (b'{"streambus_recording": 1, "meta": []}\n', '"meta" must be a JSON object'),
        (b'{"streambus_recording": 1, "created": "yesterday"}\n', '"created" must be a number'),
    ],
)
def test_bad_headers(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message) as info:
        read_recording(path)
    assert info.value.line == 1


def test_header_cut_by_a_crash_is_an_empty_truncated_recording(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(header_line()[:12])
    rec = read_recording(path)
    assert rec.events == [] and rec.truncated and rec.problems[0].line == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot open recording"):
        read_recording(tmp_path / "nope.jsonl")


def test_unknown_future_fields_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    header = orjson.dumps({"streambus_recording": 1, "created": 5.0, "meta": {}, "writer": "streambus 9"})
    delta = orjson.loads(encode(sample()[1]))
    delta["confidence"] = 0.9
    lines = [header, encode(sample()[0]), orjson.dumps(delta), encode(sample()[2]), encode(sample()[3])]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rec = read_recording(path)
    assert rec.events == sample()
    assert rec.header["writer"] == "streambus 9"


def test_iter_recording_streams_lazily(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_recording(path, sample("a") + sample("b"))
    header: dict[str, object] = {}
    it = iter_recording(path, header=header)
    first = next(it)
    assert isinstance(first, StartEvent) and header["streambus_recording"] == 1
    assert len([first, *it]) == 8


def test_open_recording_appends_gzip_members(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl.gz"
    write_recording(path, sample()[:2])
    with open_recording(path, "ab") as f:
        f.write(b"".join(encode(e) + b"\n" for e in sample()[2:]))
    assert read_recording(path).events == sample()
    with gzip.open(path, "rb") as f:
        assert f.read().count(b"\n") == 5


def test_sample_recording_is_valid() -> None:
    rec = read_recording(DATA / "chat.jsonl")
    assert rec.problems == []
    assert rec.streams == ["rec-ollama-en", "rec-ollama-ja", "rec-openai-en"]


# -- the damaged-file errors as `streambus replay` shows them ---------------------------


def test_replay_cli_reports_truncated_file_and_plays_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_recording(path, sample())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 15])
    result = CliRunner().invoke(main, ["replay", "--burst", str(path)])
    assert result.exit_code == 0, result.output
    assert "Hello, 世界" in result.stdout
    assert f"{path}:5: last line is incomplete" in result.stderr
    assert "[error truncated" in result.stdout  # the cut stream ends in error(kind="truncated")


def test_replay_cli_rejects_garbage_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    lines = [header_line(), *(encode(e) + b"\n" for e in sample())]
    lines.insert(2, b"\x00\x01garbage\n")
    path.write_bytes(b"".join(lines))
    result = CliRunner().invoke(main, ["replay", "--burst", str(path)])
    assert result.exit_code == 1
    assert f"{path}:3: invalid event JSON" in result.stderr
    lenient = CliRunner().invoke(main, ["replay", "--burst", "--lenient", str(path)])
    assert lenient.exit_code == 0
    assert "Hello, 世界" in lenient.stdout and f"{path}:3: skipped" in lenient.stderr


def test_replay_cli_rejects_wrong_version(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"streambus_recording": 3}\n' + encode(sample()[0]) + b"\n")
    result = CliRunner().invoke(main, ["replay", str(path)])
    assert result.exit_code == 1
    assert "1: unsupported recording version 3" in result.stderr


def _deep(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"start","stream":"s","seq":0,"ts":1.0,"meta":{"x":' + _deep(5000) + b"}}",
        b'{"type":"start","stream":"s","seq":0,"ts":1.0,"meta":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
        b'{"type":"delta","unknown":' + _deep(100_000) + b"}",
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=["deep-list-in-meta", "deep-objects-in-meta", "deep-unknown-field", "deep-objects-line"],
)
def test_deeply_nested_line_is_an_error_naming_its_line(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "deep.jsonl"
    events = sample()
    path.write_bytes(header_line() + encode(events[0]) + b"\n" + line + b"\n" + encode(events[1]) + b"\n")
    with pytest.raises(RecordingError, match="nested too deeply") as info:
        read_recording(path)
    assert info.value.line == 3
    lenient = read_recording(path, lenient=True)
    assert lenient.events == events[:2]  # the lines around it are kept
    assert [(p.line, p.kind) for p in lenient.problems] == [(3, "invalid")]


def test_deeply_nested_last_line_without_newline_is_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n" + _deep(5000))
    recording = read_recording(path)
    assert recording.events == sample()[:1]
    assert [(p.line, p.kind) for p in recording.problems] == [(3, "truncated")]


def test_replay_cli_deep_nesting_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    meta = b'{"a":' * 5000 + b"1" + b"}" * 5000
    path.write_bytes(header_line() + b'{"type":"start","stream":"s","seq":0,"ts":1,"meta":' + meta + b"}\n")
    result = CliRunner().invoke(main, ["replay", "--burst", str(path)])
    assert result.exit_code == 1
    assert not isinstance(result.exception, RecursionError)
    assert result.stderr == f"Error: {path}:2: invalid event JSON: nested too deeply\n"
    lenient = CliRunner().invoke(main, ["replay", "--burst", "--lenient", str(path)])
    assert lenient.exit_code == 0, lenient.output
    assert f"{path}:2: skipped: invalid event JSON: nested too deeply" in lenient.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", 2**53),
        ("seq", -1),
        ("n", 0),
        ("n", 2**31),
        ("n", 18446744073709551615),
        ("first_seq", -5),
    ],
)
def test_out_of_range_integers_name_their_field_and_line(tmp_path: Path, field: str, value: int) -> None:
    path = tmp_path / "big.jsonl"
    delta = {"type": "delta", "stream": "s1", "seq": 1, "ts": 10.1, "text": "x", field: value}
    path.write_bytes(header_line() + encode(sample()[0]) + b"\n" + orjson.dumps(delta) + b"\n")
    with pytest.raises(RecordingError, match=rf"big.jsonl:3: invalid event: .* - at `\$\.{field}`"):
        read_recording(path)
    assert [p.line for p in read_recording(path, lenient=True).problems] == [3]


def test_replay_real_process_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "deep.jsonl"
    meta = b'{"a":' * 5000 + b"1" + b"}" * 5000
    path.write_bytes(header_line() + b'{"type":"start","stream":"s","seq":0,"ts":1,"meta":' + meta + b"}\n")
    done = subprocess.run(
        [sys.executable, "-m", "streambus", "replay", "--burst", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == f"Error: {path}:2: invalid event JSON: nested too deeply\n".encode()


def test_usage_detail_counts_are_optional_on_the_wire() -> None:
    """Old recordings (no cached/reasoning counts) decode; the counts appear on the wire only when known."""
    from streambus import decode

    old = b'{"type":"end","stream":"s","seq":2,"ts":1.0,"reason":"stop","usage":{"prompt_tokens":9},"timings":{}}'
    end = decode(old)
    assert isinstance(end, EndEvent) and end.usage is not None
    assert (end.usage.cached_input_tokens, end.usage.cache_creation_input_tokens, end.usage.reasoning_tokens) == (
        None,
        None,
        None,
    )
    assert encode(end) == old
    usage = Usage(prompt_tokens=9, cached_input_tokens=0, cache_creation_input_tokens=4, reasoning_tokens=7)
    new = encode(EndEvent(stream="s", seq=2, ts=1.0, usage=usage))
    assert b'"cached_input_tokens":0,"cache_creation_input_tokens":4,"reasoning_tokens":7' in new
    assert decode(new) == EndEvent(stream="s", seq=2, ts=1.0, usage=usage)
