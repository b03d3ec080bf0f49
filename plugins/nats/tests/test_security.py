"""Secrets come from the environment, a wrong one fails at once, and none is ever logged."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from streambus_nats import NatsAuthFailed, NatsSink, NatsSource
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, SinkFailed

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token-1234"


async def test_token_from_the_environment_works_and_is_never_logged(
    nats_server: Callable[..., NatsServer], make_collector: Callable[[], Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = nats_server("--auth", TOKEN)
    monkeypatch.setenv("STREAMBUS_NATS_TOKEN", TOKEN)
    got = make_collector()
    with capture_logs() as logs:
        source = NatsSource(url=server.url, start="$", position="none")
        async with Bus() as edge:
            edge.add_sink(got)
            edge.start_producer(source)
            await source.wait_ready()
            async with Bus() as worker:
                worker.add_sink(NatsSink(url=server.url))
                async with worker.stream(model="m") as w:
                    await w.delta("hi")
            await got.wait_terminals(1)
            source.stop()
    assert [e.text for e in got.events if isinstance(e, DeltaEvent)] == ["hi"]
    assert TOKEN not in repr(logs)


async def test_wrong_token_fails_at_once_without_echoing_it(
    nats_server: Callable[..., NatsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = nats_server("--auth", TOKEN)
    monkeypatch.setenv("STREAMBUS_NATS_TOKEN", "wrong-token-5678")
    sink = NatsSink(url=server.url)
    with capture_logs() as logs, pytest.raises(SinkFailed) as info:
        with anyio.fail_after(20):
            async with Bus() as worker:
                worker.add_sink(sink, critical=True)
                async with worker.stream(model="m") as w:
                    await w.delta("never sent")
    cause = info.value.__cause__
    assert isinstance(cause, NatsAuthFailed) and "refused the credentials" in str(cause)
    assert "wrong-token-5678" not in repr(logs) + str(cause)
    assert TOKEN not in repr(logs)
    assert any(entry["event"] == "nats.sink_auth_failed" for entry in logs)
    assert not any(entry["event"] == "nats.sink_retry" for entry in logs)  # not retried in a loop


async def test_password_in_the_url_is_not_logged(nats_server: Callable[..., NatsServer]) -> None:
    server = nats_server("--user", "alice", "--pass", "pw-9876")
    url = f"nats://alice:pw-9876@127.0.0.1:{server.port}"
    with capture_logs() as logs:
        sink = NatsSink(url=url)
        async with Bus() as worker:
            worker.add_sink(sink)
            async with worker.stream(model="m") as w:
                await w.delta("x")
        assert sink.sent_events == 3
    started: list[dict[str, Any]] = [e for e in logs if e["event"] == "nats.sink_started"]
    assert started and started[0]["url"] == f"nats://***@127.0.0.1:{server.port}"
    assert "pw-9876" not in repr(logs)
