"""``streambus.serving``: the aiohttp start-up the http sink, the proxy and the mock server share."""

from __future__ import annotations

import logging
import socket

import anyio
import pytest
from aiohttp import ClientSession, web

from streambus.serving import AppServer, OncePerClient, server_logger

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is bound to asyncio


def _app(text: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def test_the_port_is_known_before_the_app_is_built_and_served() -> None:
    server = AppServer("127.0.0.1", 0)
    assert server.port > 0
    url = await server.start(_app(f"served on {server.port}"))
    assert url == server.url == f"http://127.0.0.1:{server.port}"
    async with ClientSession() as session, session.get(url + "/") as response:
        assert await response.text() == f"served on {server.port}"
    await server.close()
    await server.close()  # twice is fine
    with pytest.raises(RuntimeError, match="already started or closed"):
        await server.start(_app("again"))
    # The port was released: it can be bound again at once.
    async with AppServer("127.0.0.1", server.port) as again:
        await again.start(_app("again"))


async def test_a_taken_port_fails_at_bind_and_leaks_no_socket() -> None:
    async with AppServer("127.0.0.1", 0) as first:
        await first.start(_app("first"))
        with pytest.raises(OSError, match="in use"):
            AppServer("127.0.0.1", first.port)


async def test_ipv6_hosts_are_bracketed_in_the_url() -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    try:
        server = AppServer("::1", 0)
    except OSError as exc:
        pytest.skip(f"::1 cannot be bound here: {exc}")
    async with server:
        assert server.url == f"http://[::1]:{server.port}"


async def test_malformed_requests_make_one_line_per_client(caplog: pytest.LogCaptureFixture) -> None:
    async with AppServer("127.0.0.1", 0) as server:
        await server.start(_app("ok"), logger=server_logger("tests.serving"))
        with caplog.at_level(logging.DEBUG, logger="tests.serving"):
            for _ in range(3):
                async with await anyio.connect_tcp("127.0.0.1", server.port) as client:
                    await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
                    assert b" 400 Bad Request" in await client.receive()
    lines = [r for r in caplog.records if r.name == "tests.serving"]
    assert len(lines) == 1, caplog.text
    assert lines[0].levelname == "WARNING" and lines[0].getMessage().startswith("refused a malformed request from")
    assert "Traceback" not in caplog.text


def test_once_per_client_is_bounded() -> None:
    first = OncePerClient(limit=2)
    assert first("a") and not first("a") and first("b")
    assert first("c")  # past the limit it starts over rather than grow
    assert len(first.seen) == 1
