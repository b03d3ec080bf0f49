"""A stop asked at an edge reaches the producer's host over NATS (the ``nats-control`` sink)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from streambus_nats import NatsControl, NatsSource

from streambus import AbortEvent, Bus, DeltaEvent, StopFailed, StopOutcome, is_terminal

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

pytestmark = pytest.mark.anyio

PROC = str(Path(__file__).with_name("proc.py"))


async def test_stop_at_an_edge_stops_the_producer_on_its_host(
    nats_server: Callable[..., NatsServer], make_collector: Callable[[], Collector], exactly_once: Callable[..., Any]
) -> None:
    """The producer host is another process: its stream is cancelled there and one abort reaches the edge."""
    server = nats_server()
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none")
    control = NatsControl(url=server.url, reply_timeout=5.0)
    worker = subprocess.Popen([sys.executable, PROC, "worker", server.url], stdout=subprocess.PIPE)  # noqa: ASYNC220
    try:
        async with Bus() as edge:
            edge.add_sink(got)
            edge.add_sink(control)
            edge.start_producer(source)
            await source.wait_ready()
            await control.wait_ready()
            assert worker.stdout is not None
            line = await anyio.to_thread.run_sync(worker.stdout.readline)
            stream = line.decode().split()[1]
            await got.wait_for(lambda evs: sum(isinstance(e, DeltaEvent) and e.stream == stream for e in evs) >= 3)
            assert await edge.stop("no-such-stream", reason="x") is StopOutcome.UNKNOWN
            outcome = await edge.stop(stream, reason="user pressed stop", by="client")
            assert outcome is StopOutcome.FORWARDED
            await got.wait_terminals(1)
            # The edge's bus saw the abort: a second stop is a clean no-op, answered here.
            assert await edge.stop(stream) is StopOutcome.ENDED
            source.stop()
        out, _ = await anyio.to_thread.run_sync(lambda: worker.communicate(timeout=20))
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0
    assert out.decode().split()[-2:] == ["handled", "2"]  # the unknown stream and the real one
    exactly_once(got.events)
    events = [e for e in got.events if e.stream == stream]
    terminal = events[-1]
    assert isinstance(terminal, AbortEvent) and (terminal.reason, terminal.by) == ("user pressed stop", "client")
    assert sum(map(is_terminal, events)) == 1


async def test_stop_without_nats_fails_clearly(nats_server: Callable[..., NatsServer]) -> None:
    """The engine unreachable: StopFailed (an edge answers 503), not a silent unknown."""
    server = nats_server()
    control = NatsControl(url=server.url, reply_timeout=1.0)
    async with Bus() as edge:
        edge.add_sink(control)
        await control.wait_ready()
        server.stop()
        failure: StopFailed | None = None
        with anyio.fail_after(10):
            while failure is None:
                try:
                    await edge.stop("s1")
                except StopFailed as exc:
                    failure = exc
                else:
                    await anyio.sleep(0.05)  # until the client noticed the server is gone
        assert "nats-control" in str(failure)


def test_control_options_are_checked() -> None:
    with pytest.raises(ValueError, match="prefix: must be subject tokens"):
        NatsControl(prefix="a b")
    with pytest.raises(ValueError, match="reply_timeout"):
        NatsControl(reply_timeout=0)
