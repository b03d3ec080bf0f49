"""Attacks on the ``http`` sink (issue 18): DNS rebinding, foreign pages, duplicate headers."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from streambus.config import parse_config
from streambus.errors import ConfigError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-bound


async def _raw_request(url: str, head: str) -> tuple[int, bytes]:
    """Send a hand-written GET (HTTP/1.0: an unchunked body; headers as given, duplicates included)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port.split("/")[0]))
    async with stream:
        await stream.send((head.rstrip("\n").replace("\n", "\r\n") + "\r\nConnection: close\r\n\r\n").encode())
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _port(served: Any) -> str:
    return str(served.url).rsplit(":", 1)[1]


async def test_dns_rebinding_host_is_refused(served: Any, writer: Any) -> None:
    """attacker.example resolves to 127.0.0.1: its page sends Host and Origin that agree, but are not ours."""
    await writer(served.bus, "s1", ["private ", "text"])
    port = _port(served)
    for path in ("/streams", "/streams/s1/text"):
        status, body = await _raw_request(
            served.url, f"GET {path} HTTP/1.0\nHost: attacker.example:{port}\nOrigin: http://attacker.example:{port}"
        )
        assert status == 403
        assert body == f"Host 'attacker.example:{port}' is not a name of this server (see allowed_hosts)\n".encode()
    status, body = await _raw_request(served.url, f"GET /streams/s1/text HTTP/1.0\nHost: localhost:{port}")
    assert (status, body) == (200, b"private text")


@pytest.mark.sink_options(allowed_hosts=["streams.example.com"])
async def test_allowed_hosts_name_the_sink(served: Any, writer: Any) -> None:
    await writer(served.bus, "s1", ["ok"])
    status, body = await _raw_request(served.url, "GET /streams/s1/text HTTP/1.0\nHost: streams.example.com")
    assert (status, body) == (200, b"ok")
    assert (await _raw_request(served.url, "GET /streams/s1/text HTTP/1.0\nHost: other.example.com"))[0] == 403


async def test_a_foreign_page_is_refused_before_anything_runs(served: Any, writer: Any) -> None:
    await writer(served.bus, "s1", ["ok"])
    async with httpx.AsyncClient(base_url=served.url) as client:
        r = await client.get("/streams/s1/text", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert r.text == "origin 'http://evil.example' is not allowed (see allowed_origins)\n"
        assert "access-control-allow-origin" not in r.headers
        # A text/plain POST needs no preflight: the guard must refuse it itself.
        body = '{"model": "*", "stream": true}'
        headers = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        r = await client.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 403
        assert served.sink.hub.waiting == 0  # no reader was opened
        # The sink's own origin is same-origin.
        r = await client.get("/streams/s1/text", headers={"Origin": served.url})
        assert (r.status_code, r.text) == (200, "ok")


@pytest.mark.parametrize("header", ["Host", "Origin", "Authorization"])
async def test_duplicate_headers_are_a_400_logged_once(
    served: Any, writer: Any, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    await writer(served.bus, "s1", ["ok"])
    host = f"127.0.0.1:{_port(served)}"
    value = {"Host": host, "Origin": served.url, "Authorization": "Bearer sk-not-a-secret"}[header]
    head = f"GET /streams/s1/text HTTP/1.0\nHost: {host}\n{header}: {value}"
    if header != "Host":
        head += f"\n{header}: {value}"
    with capture_logs() as logs:
        for _ in range(3):
            status, body = await _raw_request(served.url, head)
            assert status == 400
            # aiohttp's parser refuses a duplicate Host itself; the guard refuses the others.
            assert f"uplicate {header}".encode() in body.replace(b"'", b"")
    refused = [entry for entry in logs if entry["event"] == "http.refused"]
    refused_by_aiohttp = [r for r in caplog.records if r.name == "streambus.http.server"]
    if header == "Host":  # aiohttp's parser refused it; its line is kept once per client address per process
        assert not refused and len(refused_by_aiohttp) <= 1, caplog.text
    else:
        assert len(refused) == 1 and not refused_by_aiohttp, (logs, caplog.text)
    assert "Traceback" not in caplog.text
    assert await _raw_request(served.url, f"GET /streams/s1/text HTTP/1.0\nHost: {host}") == (200, b"ok")


def test_bad_access_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="cors_origins: 'app.example' must be"):
        parse_config({"sinks": [{"type": "http", "cors_origins": ["app.example"]}]})
    with pytest.raises(ConfigError, match="allowed_hosts: a name must not be empty"):
        parse_config({"sinks": [{"type": "http", "allowed_hosts": [" "]}]})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10"])
def test_a_public_bind_needs_a_token(host: str) -> None:
    """Anything but loopback without a token would let anyone who can connect read every stream."""
    with pytest.raises(ConfigError, match="without a token would expose every stream"):
        parse_config({"sinks": [{"type": "http", "host": host}]})
    parse_config({"sinks": [{"type": "http", "host": host, "token": "s3cret"}]})
    parse_config({"sinks": [{"type": "http", "host": host, "allow_public_without_token": True}]})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_binds_need_no_token(host: str) -> None:
    parse_config({"sinks": [{"type": "http", "host": host}]})
