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
    for option in ("--upstream", "--config", "--host", "--port", "--moderated", "--read-timeout"):
        assert option in result.output


def test_bad_upstream_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["proxy", "--upstream", "localhost:11434", "--port", "0"])
    assert result.exit_code != 0
    assert "upstream: expected an http:// or https:// URL" in result.output


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
