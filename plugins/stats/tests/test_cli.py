"""`streambus stats RECORDING...`: tables, --json, --plot, --state, damaged files."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from streambus_stats import summarise

from streambus.cli import main
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, StartEvent, Usage, encode
from streambus.recording import header_line, write_recording


def recording_events(prefix: str = "") -> list:
    """Two llama3 streams (one ending, one erroring) and one qwen stream aborted, with known ts."""
    e: list = []
    e.append(StartEvent(stream=f"{prefix}a", seq=0, ts=100.0, model="llama3", provider="ollama"))
    e.append(StartEvent(stream=f"{prefix}b", seq=0, ts=100.5, model="qwen", provider="ollama"))
    e.append(DeltaEvent(stream=f"{prefix}a", seq=1, ts=100.25, text="Hi"))
    e.append(DeltaEvent(stream=f"{prefix}b", seq=1, ts=101.0, text="hm", channel="reasoning"))
    e.append(DeltaEvent(stream=f"{prefix}a", seq=2, ts=100.75, text=" you"))
    e.append(
        EndEvent(
            stream=f"{prefix}a",
            seq=3,
            ts=101.25,
            usage=Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6),
            timings={"eval_duration": 0.75},
        )
    )
    e.append(AbortEvent(stream=f"{prefix}b", seq=2, ts=102.5, by="moderation"))
    e.append(StartEvent(stream=f"{prefix}c", seq=0, ts=103.0, model="llama3", provider="ollama"))
    e.append(ErrorEvent(stream=f"{prefix}c", seq=1, ts=104.0, kind="timeout"))
    return e


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["stats", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "run.jsonl"
    write_recording(path, recording_events())
    return path


def test_table_per_model_and_overall(recording: Path) -> None:
    code, out, _ = invoke(str(recording), "--tokenizer", "approx", "--streams")
    assert code == 0, out
    for needle in (
        "Latency per model",
        "llama3",
        "qwen",
        "overall",
        "timeout=1",
        "moderation=1",
        "stop=1",
        "250.0ms",
        "Streams",
    ):
        assert needle in out, needle


def test_json_has_exact_figures(recording: Path) -> None:
    code, out, _ = invoke(str(recording), "--json", "--tokenizer", "approx", "--streams")
    assert code == 0
    data = orjson.loads(out)
    llama = data["models"]["llama3"]
    assert llama["streams"]["outcomes"] == {"end": 1, "error": 1}
    assert llama["time_to_first_chunk_seconds"]["count"] == 1
    assert llama["time_to_first_chunk_seconds"]["min"] == 0.25
    assert llama["inter_chunk_latency_seconds"]["max"] == 0.5
    assert llama["e2e_seconds"]["max"] == 1.25
    assert llama["e2e_seconds"]["min"] == 1.0
    assert llama["provider_tokens_per_second"]["max"] == 4.0  # 3 / 0.75
    assert llama["time_per_output_token_seconds"]["max"] == 0.5  # (1.25 - 0.25) / 2
    qwen = data["models"]["qwen"]
    assert qwen["time_to_first_chunk_seconds"]["max"] == 0.5
    assert qwen["aborts"] == {"moderation": 1}
    assert qwen["tokens"]["completion"] == {"provider": 0, "counted": 1, "all": 1}
    assert data["overall"]["streams"]["started"] == 3
    by_id = {s["stream"]: s for s in data["streams"]}
    assert by_id["c"]["completion_tokens"] == 0 and by_id["c"]["usage_source"] == "counted"


def test_plot_writes_a_valid_png(recording: Path, tmp_path: Path) -> None:
    png = tmp_path / "stats.png"
    code, _, err = invoke(str(recording), "--plot", str(png), "--tokenizer", "approx")
    assert code == 0
    assert "plot written" in err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] == 1100 and pixels.shape[1] == 1000
    assert pixels.std() > 0.01  # something is drawn


def test_plot_without_matplotlib_says_what_to_install(
    recording: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is the `plot` extra's: without it, --plot names the install line, and the tables still print."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "stats.png"
    code, out, err = invoke(str(recording), "--plot", str(png), "--tokenizer", "approx")
    assert code == 1
    assert "llama3" in out  # the tables came first
    assert "pip install 'streambus-stats[plot]'" in err
    assert "Traceback" not in err
    assert not png.exists()


def test_several_recordings_and_saved_states_merge(recording: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.jsonl.gz"
    write_recording(second, recording_events(prefix="x"))
    state = tmp_path / "state.json"
    code, _, _ = invoke(str(recording), "--state", str(state), "--json", "--tokenizer", "approx")
    assert code == 0
    code, merged_out, _ = invoke(str(state), str(second), "--json", "--tokenizer", "approx")
    assert code == 0
    code, direct_out, _ = invoke(str(recording), str(second), "--json", "--tokenizer", "approx")
    assert orjson.loads(merged_out) == orjson.loads(direct_out)
    assert orjson.loads(direct_out)["overall"]["streams"]["started"] == 6


def test_truncated_recording_counts_cut_streams_as_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    events = recording_events()[:5]
    path.write_bytes(header_line() + b"".join(encode(e) + b"\n" for e in events) + b'{"type": "del')
    code, out, err = invoke(str(path), "--json", "--tokenizer", "approx")
    assert code == 0
    assert "truncated" in err and ":7:" in err
    data = orjson.loads(out)
    assert data["overall"]["streams"]["outcomes"] == {"incomplete": 2}
    assert data["overall"]["chunks"] == 3


def test_damaged_recording_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [encode(e) + b"\n" for e in recording_events()]
    lines.insert(2, b"not json\n")
    path.write_bytes(header_line() + b"".join(lines))
    result = CliRunner().invoke(main, ["stats", str(path)])
    assert result.exit_code == 1
    assert f"{path}:4:" in result.stderr
    lenient = CliRunner().invoke(main, ["stats", str(path), "--lenient", "--json", "--tokenizer", "approx"])
    assert lenient.exit_code == 0
    assert orjson.loads(lenient.stdout)["overall"]["streams"]["started"] == 3
    assert "invalid" in lenient.stderr


def test_not_a_recording_and_bad_state(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    result = CliRunner().invoke(main, ["stats", str(text)])
    assert result.exit_code == 1 and "not a streambus recording" in result.stderr
    state = tmp_path / "state.json"
    state.write_bytes(b'{"streambus_stats": 99}')
    result = CliRunner().invoke(main, ["stats", str(state)])
    assert result.exit_code == 1 and "streambus_stats=99" in result.stderr
    result = CliRunner().invoke(main, ["stats", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_summarise_api_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(header_line())
        for event in recording_events():
            f.write(encode(event) + b"\n")
    agg = summarise([path], tokenizer="approx")
    assert agg.aggregate().started == 3
    assert agg.models == ["llama3", "qwen"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"type":"delta","stream":"orphan","seq":3,"ts":1.0,"text":"hi"}\n',
        b'{"type":"end","stream":"orphan","seq":4,"ts":2.0,"reason":"stop"}\n',
    ],
    ids=["header-only", "delta-without-start", "end-without-start"],
)
def test_recording_without_a_start_prints_empty_tables(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "nostart.jsonl"
    path.write_bytes(header_line() + body)
    result = CliRunner().invoke(main, ["stats", str(path), "--tokenizer", "approx", "--streams"])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "overall" in result.stdout and "Traceback" not in result.output


@pytest.mark.parametrize(
    "values",
    [
        # A start at -1e308 and later events at +1e308: every gap and the e2e time are infinite.
        (-1e308, 1e308, 1e308, 1e308),
        (0.0, 1e308, 1e308, 1e308),
        (1e308, -1e308, 1e308, -1e308),
        (0.0, 5e-324, 1e-323, 1.5e-323),  # tokens per second overflow to infinity
    ],
)
def test_extreme_timestamps_never_crash(tmp_path: Path, values: tuple[float, ...]) -> None:
    path = tmp_path / "huge.jsonl"
    t0, t1, t2, t3 = values
    events = [
        StartEvent(stream="s", seq=0, ts=t0, model="m", provider="p"),
        DeltaEvent(stream="s", seq=1, ts=t1, text="a b"),
        DeltaEvent(stream="s", seq=2, ts=t2, text="c d"),
        EndEvent(stream="s", seq=3, ts=t3, usage=Usage(completion_tokens=5), timings={"eval_duration": 5e-324}),
    ]
    path.write_bytes(header_line() + b"".join(encode(e) + b"\n" for e in events))
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(main, ["stats", str(path), "--tokenizer", "approx", "--streams", *extra])
        assert result.exit_code == 0, result.output
        assert result.exception is None
    assert orjson.loads(result.stdout)["overall"]["streams"]["started"] == 1


HOSTILE_LINES = {
    "deep-meta": b'{"type":"start","stream":"s","seq":0,"ts":1.0,"meta":' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
    "huge-n": b'{"type":"delta","stream":"s","seq":1,"ts":1.0,"text":"x","n":18446744073709551615}',
    "ts-overflow": b'{"type":"delta","stream":"s","seq":1,"ts":1e400,"text":"x"}',
    "nan": b'{"type":"delta","stream":"s","seq":1,"ts":NaN,"text":"x"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_hostile_line_is_one_line_error_or_counted_skip(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.jsonl"
    good = [encode(e) + b"\n" for e in recording_events()]
    path.write_bytes(header_line() + good[0] + HOSTILE_LINES[name] + b"\n" + b"".join(good[1:]))
    strict = CliRunner().invoke(main, ["stats", str(path), "--tokenizer", "approx"])
    assert strict.exit_code == 1
    assert isinstance(strict.exception, SystemExit)  # a handled error, not a crash
    assert strict.stderr.startswith(f"Error: {path}:3: invalid event")
    assert strict.stderr.count("\n") == 1 and "Traceback" not in strict.output
    lenient = CliRunner().invoke(main, ["stats", str(path), "--lenient", "--json", "--tokenizer", "approx"])
    assert lenient.exit_code == 0, lenient.output
    assert lenient.stderr == f"warning: {path}:3: invalid: " + strict.stderr.split(":3: ", 1)[1]
    assert orjson.loads(lenient.stdout)["overall"]["streams"]["started"] == 3


def test_real_process_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "deep.jsonl"
    path.write_bytes(header_line() + HOSTILE_LINES["deep-meta"] + b"\n")
    done = subprocess.run(
        [sys.executable, "-m", "streambus", "stats", str(path)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr == f"Error: {path}:2: invalid event JSON: nested too deeply\n".encode()
