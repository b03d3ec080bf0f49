"""The CLI through real processes: check, run (and --serve with a signal), plugins, demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streambus import PluginError, PluginNotFound
from streambus.plugins import install_hint, load
from streambus.recording import read_recording

CLI = [sys.executable, "-m", "streambus"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FAST = """
[log]
level = "warning"
[[producers]]
type = "synthetic"
count = 2
tokens = 12
tokens_per_second = 0
ttft = 0
text = "japanese"
[[sinks]]
type = "stdout"
"""


def test_check_reports_ok_and_errors(tmp_path: Path) -> None:
    good = write(tmp_path, "good.toml", FAST)
    bad = write(tmp_path, "bad.toml", '[[sinks]]\ntype = "stdout"\nbuffer = "x"\n')
    ok = run_cli("check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok: " in ok.stdout
    assert "(1 producers, 1 sinks)" in ok.stdout
    failed = run_cli("check", str(good), str(bad))
    assert failed.returncode == 1
    assert f'error: {bad}: sinks[0].buffer: expected integer, got "x"' in failed.stderr
    assert "ok: " in failed.stdout  # the good file is still reported


def test_run_prints_every_stream_and_exits_zero(tmp_path: Path) -> None:
    result = run_cli("run", str(write(tmp_path, "p.toml", FAST)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("── ") == 2  # one header per stream
    assert "ストリーミング" in result.stdout or "トークン" in result.stdout or len(result.stdout) > 20


def test_run_reports_config_error_without_traceback(tmp_path: Path) -> None:
    result = run_cli("run", str(write(tmp_path, "p.toml", '[[producers]]\ntype = "missing"\n')))
    assert result.returncode == 1
    assert "producers[0].type: unknown producer type 'missing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    slow = FAST.replace("tokens = 12", "tokens = 100000").replace("tokens_per_second = 0", "tokens_per_second = 20")
    slow += '\n[[sinks]]\ntype = "stdout"\nformat = "jsonl"\nname = "events"\n'
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [*CLI, "run", "--serve", str(write(tmp_path, "p.toml", slow))], stdout=f, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while out.stat().st_size < 200 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    text = out.read_text()
    assert text.count('"type":"abort"') == 2
    assert '"by":"shutdown"' in text


def test_plugins_lists_builtins() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "synthetic" in result.stdout
    assert "stdout" in result.stdout
    assert "producers:" in result.stdout
    assert "sinks:" in result.stdout
    assert "``" not in result.stdout  # docstring markup is not for a terminal
    assert "Generate count realistic token streams" in result.stdout


def test_plugin_import_failure_is_reported_with_install_hint(tmp_path: Path) -> None:
    dist = tmp_path / "site"
    info = dist / "streambus_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streambus-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[streambus.sinks]\nfake = streambus_fake_missing:FakeSink\n")
    env = {**os.environ, "PYTHONPATH": str(dist)}
    listed = run_cli("plugins", env=env)
    assert "fake" in listed.stdout
    assert "NOT LOADED: No module named 'streambus_fake_missing'. Install it with: pip install streambus-fake" in (
        listed.stdout
    )
    assert "Traceback" not in listed.stdout + listed.stderr
    config = write(tmp_path, "p.toml", '[[sinks]]\ntype = "fake"\n')
    checked = run_cli("check", str(config), env=env)
    assert checked.returncode == 1
    assert "sinks[0].type: sink plugin 'fake' could not be imported" in checked.stderr
    assert "pip install streambus-fake" in checked.stderr


def test_demo_command_comes_from_its_plugin() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "No such command 'frobnicate'" in result.stderr


def test_a_command_plugin_that_fails_to_import_is_reported_whatever_its_message(tmp_path: Path) -> None:
    """The CLI decides on the error type: an import failure whose text says "unknown command" is still one."""
    dist = tmp_path / "site"
    info = dist / "streambus_broken-1.0.dist-info"
    info.mkdir(parents=True)
    (dist / "streambus_broken_cmd.py").write_text('raise ImportError("unknown command set: libfoo is too old")\n')
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streambus-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[streambus.commands]\nbroken = streambus_broken_cmd:main\n")
    result = run_cli("broken", env={**os.environ, "PYTHONPATH": str(dist)})
    assert result.returncode == 1, result.stderr
    assert "command plugin 'broken' could not be imported: unknown command set: libfoo is too old" in result.stderr
    assert "No such command" not in result.stderr


def test_an_unknown_plugin_is_its_own_error_type() -> None:
    with pytest.raises(PluginNotFound) as info:
        load("commands", "frobnicate")
    assert isinstance(info.value, PluginError)
    assert (info.value.kind, info.value.name) == ("commands", "frobnicate")
    assert "unknown command type 'frobnicate' (installed: " in str(info.value)


@pytest.mark.parametrize("fmt", ["jsonl"])
def test_stdout_jsonl_is_a_valid_recording_body(tmp_path: Path, fmt: str) -> None:
    config = FAST.replace('type = "stdout"', f'type = "stdout"\nformat = "{fmt}"')
    result = run_cli("run", str(write(tmp_path, "p.toml", config)))
    assert result.returncode == 0, result.stderr
    recording = tmp_path / "r.jsonl"
    recording.write_text('{"streambus_recording": 1, "created": 0, "meta": {}}\n' + result.stdout)
    events = read_recording(recording).events
    assert len({e.stream for e in events}) == 2
    assert [type(e).__name__ for e in events].count("EndEvent") == 2


@pytest.mark.parametrize("command", ["replay", "serve-mock"])
def test_a_missing_recording_is_named_without_a_line(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = run_cli(command, str(missing))
    assert result.returncode != 0
    assert f"{missing}: cannot open recording: No such file or directory" in result.stderr
    assert f"{missing}:0" not in result.stderr
    assert "Traceback" not in result.stderr


def test_install_hints_say_how_to_install_from_a_clone() -> None:
    """Our plugin distributions are not on PyPI: every install hint also gives the clone's line."""
    assert install_hint("streambus-redis") == (
        "pip install streambus-redis (from a streambus clone: pip install -e plugins/redis)"
    )
    assert install_hint("streambus-stats", "plot") == (
        "pip install 'streambus-stats[plot]' (from a streambus clone: pip install -e 'plugins/stats[plot]')"
    )
    assert install_hint("somebody-elses-plugin") == "pip install somebody-elses-plugin"
