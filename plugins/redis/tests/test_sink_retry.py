"""The redis sink retries a Redis that is down with jittered backoff (streambus.producing.RetryPolicy)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis
from streambus_redis import RedisSink
from structlog.testing import capture_logs

from streambus import Bus

pytestmark = pytest.mark.anyio


async def test_a_refused_connection_is_retried_with_jittered_backoff_until_redis_answers(private_redis: Any) -> None:
    server = private_redis()
    server.stop()
    with anyio.fail_after(30):  # no hang
        async with Bus() as bus:
            sinks = [RedisSink(url=server.url, stream="k", batch_max_ms=0) for _ in range(2)]
            for i, sink in enumerate(sinks):
                bus.add_sink(sink, name=f"redis{i}")
            with capture_logs() as logs:
                while min(len(sink.retry.waits) for sink in sinks) < 5:  # noqa: ASYNC110 - bounded by fail_after
                    await anyio.sleep(0.02)
                server.start()
                for sink in sinks:
                    await sink.wait_ready()
                async with bus.stream(model="m") as w:
                    await w.delta("after the outage")
    first, second = (list(sink.retry.waits)[:5] for sink in sinks)
    for n, (a, b) in enumerate(zip(first, second, strict=True)):
        # 50 ms doubling (at most 2 s), plus up to 50 ms of jitter.
        low = min(0.05 * 2**n, 2.0)
        assert low <= a <= min(low + 0.05, 2.0) and low <= b <= min(low + 0.05, 2.0)
    assert first != second  # two sinks that failed together do not come back together
    assert any(entry["event"] == "redis.sink_retry" and "retry_in" in entry for entry in logs)
    assert [sink.sent_events for sink in sinks] == [3, 3]  # start, delta, end: each sink wrote all once Redis answered
    assert redis.Redis.from_url(server.url).xlen("k") >= 2
