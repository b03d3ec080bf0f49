"""``streambus abort URL STREAM`` against the http sink (and the WebSocket broadcaster) over loopback."""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import pytest
from streambus_websocket import WebSocketSink

from streambus import AbortEvent, Bus

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def live(bus: Bus, stream: str) -> anyio.Event:
    written = anyio.Event()

    async def produce() -> None:
        async with bus.stream(stream=stream) as w:
            await w.delta("x")
            written.set()
            await anyio.sleep_forever()

    bus.start_soon(produce)
    await written.wait()
    return written


class Ran:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.exit_code = code
        self.output = (stdout + stderr).decode()


async def abort(*args: str, env: dict[str, str] | None = None) -> Ran:
    """The command as a user runs it: its own process."""
    environment = {k: v for k, v in os.environ.items() if k != "STREAMBUS_TOKEN"}
    environment.update(env or {})
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "streambus", "abort", *args], env=environment, check=False
        )
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.mark.sink_options(token="cli-secret")
async def test_abort_through_the_http_sink(served: Any) -> None:
    bus: Bus = served.bus
    sub = bus.subscribe()
    await live(bus, "c1")
    refused = await abort(served.url, "c1", env={"STREAMBUS_TOKEN": "wrong"})
    assert refused.exit_code == 1 and "HTTP 401" in refused.output and "wrong" not in refused.output
    result = await abort(served.url, "c1", "--reason", "from the shell", env={"STREAMBUS_TOKEN": "cli-secret"})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "c1: stopped"
    async for event in sub:
        if isinstance(event, AbortEvent):
            assert (event.stream, event.reason, event.by) == ("c1", "from the shell", "client")
            break
    again = await abort(served.url, "c1", env={"STREAMBUS_TOKEN": "cli-secret"})
    assert (again.exit_code, again.output.strip()) == (0, "c1: ended")
    unknown = await abort(served.url, "nope", env={"STREAMBUS_TOKEN": "cli-secret"})
    assert unknown.exit_code == 1 and "unknown" in unknown.output


async def test_abort_through_the_websocket_broadcaster() -> None:
    async with Bus() as bus:
        sink = WebSocketSink(port=0, token="ws-secret")
        bus.add_sink(sink)
        url = await sink.wait_ready()
        await live(bus, "w1")
        refused = await abort(url, "w1")
        assert refused.exit_code == 1 and "unauthorized" in refused.output
        result = await abort(url, "w1", "--token-env", "MY_TOKEN", env={"MY_TOKEN": "ws-secret"})
        assert (result.exit_code, result.output.strip()) == (0, "w1: stopped"), result.output
        unknown = await abort(url, "nope", "--token-env", "MY_TOKEN", env={"MY_TOKEN": "ws-secret"})
        assert unknown.exit_code == 1 and "unknown" in unknown.output
        await bus.shutdown()


async def test_bad_urls_are_refused_clearly() -> None:
    bad = await abort("ftp://x", "s")
    assert bad.exit_code == 2 and "http://" in bad.output
    unreachable = await abort("http://127.0.0.1:9", "s", "--timeout", "2")
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.output
