"""The ``streambus proxy`` command, the shipped config, and the asyncio-only guard."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from streambus_proxy import ProxyError, create_app, parse_tags

from streambus import Bus
from streambus.cli import main
from streambus.mockserver import MockServer
from streambus.recording import read_recording

from .conftest import OLLAMA_TEXT

ROOT = Path(__file__).resolve().parents[3]


def test_help_names_every_option() -> None:
    result = CliRunner().invoke(main, ["proxy", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--upstream", "--config", "--host", "--port", "--moderated", "--read-timeout", "--token-env"):
        assert option in result.output


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("localhost:11434", "expected an http:// or https:// URL, got 'localhost:11434'"),
        ("bob:pw@host", "expected an http:// or https:// URL, got 'bob:***@host'"),
        ("http://h:notaport", "'http://h:notaport' is not a valid URL (port can't be converted to integer)"),
        ("http://[::1", "'http://[::1' is not a valid URL (Invalid IPv6 URL)"),
        ("http://bob:pw@[::1", "'http://bob:***@[::1' is not a valid URL"),
        ("http://", "'http://' names no host"),
        ("http://h:0", "'http://h:0' has port 0, outside 1-65535"),
        ("http://h/?q=1", "'http://h/?q=1' must be a base URL, without a query or fragment"),
    ],
)
def test_bad_upstream_is_a_one_line_usage_error(upstream: str, problem: str) -> None:
    result = CliRunner().invoke(main, ["proxy", "--upstream", upstream, "--port", "0"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # click's usage error, not a traceback
    assert f"Error: Invalid value for '--upstream': {problem}" in result.output
    assert ":pw@" not in result.output


def test_bad_upstream_prints_no_traceback() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "streambus", "proxy", "--upstream", "http://h:notaport"],
        capture_output=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert process.returncode == 2
    errors = [line for line in process.stderr.decode().splitlines() if line.startswith("Error")]
    assert errors == [
        "Error: Invalid value for '--upstream': 'http://h:notaport' is not a valid URL "
        "(port can't be converted to integer)"
    ]
    assert b"Traceback" not in process.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_public_bind_without_token_is_refused(host: str) -> None:
    result = CliRunner().invoke(main, ["proxy", "--upstream", "http://127.0.0.1:1", "--host", host, "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "without a client token" in result.output
    assert "--token-env" in result.output and "--allow-public" in result.output


def test_token_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMBUS_TEST_UNSET_TOKEN", raising=False)
    args = ["proxy", "--upstream", "http://127.0.0.1:1", "--token-env", "STREAMBUS_TEST_UNSET_TOKEN"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "environment variable STREAMBUS_TEST_UNSET_TOKEN is not set or empty" in result.output


def test_bad_allowed_origin_is_a_usage_error() -> None:
    args = ["proxy", "--upstream", "http://127.0.0.1:1", "--allowed-origin", "app.example.com"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Invalid value for '--allowed-origin': 'app.example.com' must be '*' or start with http://" in result.output


def test_shipped_config_checks() -> None:
    result = CliRunner().invoke(main, ["check", str(ROOT / "configs" / "proxy-ollama.toml")])
    assert result.exit_code == 0, result.output


def test_tags_header_forms() -> None:
    assert parse_tags("user=alice, session = s1,") == {"user": "alice", "session": "s1"}
    assert parse_tags('{"n": 1}') == {"n": 1}
    assert parse_tags("") == {}
    for bad in ("novalue", "=x", "[1]", "{bad"):
        with pytest.raises(ProxyError, match="X-Streambus-Tags"):
            parse_tags(bad)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_under_trio_the_proxy_says_it_needs_asyncio(anyio_backend: str) -> None:
    async with Bus() as bus:
        with pytest.raises(RuntimeError, match="asyncio"):
            create_app(bus, "http://127.0.0.1:1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_command_serves_and_records(recording: Path, tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    out = tmp_path / "rec.jsonl"
    config.write_text(f'[log]\nlevel = "warning"\n\n[[sinks]]\ntype = "recorder"\npath = "{out}"\n')
    port = _free_port()
    with MockServer(recording, burst=True).running() as upstream:
        command = [sys.executable, "-m", "streambus", "proxy", "--upstream", upstream, "--config", str(config)]
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
        )
        try:
            deadline = time.monotonic() + 30
            body: Any = None
            while time.monotonic() < deadline:
                try:
                    body = httpx.post(
                        f"http://127.0.0.1:{port}/api/generate",
                        json={"model": "llama3.2", "prompt": "x", "stream": False},
                        timeout=5,
                    ).json()
                    break
                except httpx.ConnectError:
                    assert process.poll() is None, process.communicate()
                    time.sleep(0.1)
            assert body is not None and body["response"] == "".join(OLLAMA_TEXT)
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()
    events = read_recording(out).events
    assert "".join(getattr(e, "text", "") for e in events) == "".join(OLLAMA_TEXT)
