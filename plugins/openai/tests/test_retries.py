"""Retries against a loopback upstream that answers 429/503 with Retry-After, then streams."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from aiohttp import web
from streambus_openai import OpenAIProducer

from streambus import ConfigError
from streambus.events import EndEvent, ErrorEvent, StartEvent
from streambus.plugins import build

from .conftest import Upstream
from .test_producer import CHAT, producer, run, text

pytestmark = pytest.mark.anyio

RATE_LIMITED = {
    "error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
}


def refuse_then_stream(upstream: Upstream, status: int, retry_after: str, refusals: int = 1) -> list[int]:
    """Answer *refusals* requests with *status* and ``Retry-After``, then stream CHAT; returns the statuses sent."""
    sent: list[int] = []

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        if len(sent) < refusals:
            sent.append(status)
            return web.json_response(RATE_LIMITED, status=status, headers={"Retry-After": retry_after})
        sent.append(200)
        return web.Response(body=CHAT, content_type="text/event-stream")

    upstream.by_path["/v1/chat/completions"] = answer
    return sent


def no_waiting(p: OpenAIProducer) -> list[float]:
    """Record the producer's retry waits instead of sleeping them."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    p.retry.sleep = record
    return waits


async def test_429_with_retry_after_seconds_waits_that_long_then_streams(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 429, "1")
    p = producer(upstream, retries=2, retry_backoff=0)
    waits = no_waiting(p)
    sink = await run(p)
    assert sent == [429, 200] and waits == [1.0]
    assert text(sink.events)
    assert sum(isinstance(e, StartEvent) for e in sink.events) == 1
    assert isinstance(sink.events[-1], EndEvent)


async def test_503_with_an_http_date_retry_after(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 503, email.utils.formatdate(time.time() + 20, usegmt=True))
    p = producer(upstream, retries=1)
    waits = no_waiting(p)
    sink = await run(p)
    assert sent == [503, 200]
    assert len(waits) == 1 and 17 < waits[0] <= 20
    assert isinstance(sink.events[-1], EndEvent)


async def test_retries_exhausted_end_with_the_documented_error(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 429, "2", refusals=10)
    p = producer(upstream, retries=1)
    waits = no_waiting(p)
    end = (await run(p)).events[-1]
    assert sent == [429, 429] and waits == [2.0]
    assert isinstance(end, ErrorEvent)
    assert (end.kind, end.retryable, end.message) == (
        "http_status",
        True,
        "HTTP 429 (rate_limit_exceeded): Rate limit reached",
    )


def test_retry_keys_build_the_policy() -> None:
    p = build(
        "producers", "openai", {"model": "m", "prompt": "hi", "retries": 4, "retry_backoff": 0.25, "retry_max_wait": 9}
    )
    assert isinstance(p, OpenAIProducer)
    assert (p.retry.retries, p.retry.backoff, p.retry.max_wait) == (4, 0.25, 9.0)


@pytest.mark.parametrize("key", ["retry_backoff", "retry_max_wait"])
def test_bad_retry_keys_are_named(key: str) -> None:
    with pytest.raises(ConfigError, match=f"producers\\[0\\].{key}: must be at least 0 and finite, got -1"):
        build("producers", "openai", {"model": "m", "prompt": "hi", key: -1}, path="pipe.toml", location="producers[0]")
