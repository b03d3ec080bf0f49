"""Retries against a loopback upstream that answers 429/503 with Retry-After, then streams."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from aiohttp import web
from streambus_ollama import OllamaProducer

from streambus import ConfigError
from streambus.events import EndEvent, ErrorEvent, StartEvent
from streambus.plugins import build

from .conftest import Upstream
from .test_producer import CHAT, CHAT_TEXT, producer, run, terminal, text

pytestmark = pytest.mark.anyio


def refuse_then_stream(upstream: Upstream, status: int, retry_after: str, refusals: int = 1) -> list[int]:
    """Answer *refusals* requests with *status* and ``Retry-After``, then stream CHAT; returns the statuses sent."""
    sent: list[int] = []

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        if len(sent) < refusals:
            sent.append(status)
            return web.json_response({"error": "slow down"}, status=status, headers={"Retry-After": retry_after})
        sent.append(200)
        return web.Response(body=CHAT, content_type="application/x-ndjson")

    upstream.by_path["/api/chat"] = answer
    return sent


def no_waiting(p: OllamaProducer) -> list[float]:
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
    assert sent == [429, 200]
    assert waits == [1.0]  # what the server asked for, although the backoff is 0
    assert text(sink.events) == CHAT_TEXT
    assert sum(isinstance(e, StartEvent) for e in sink.events) == 1
    assert isinstance(terminal(sink.events), EndEvent)


async def test_503_with_an_http_date_retry_after(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 503, email.utils.formatdate(time.time() + 20, usegmt=True))
    p = producer(upstream, retries=1)
    waits = no_waiting(p)
    sink = await run(p)
    assert sent == [503, 200]
    assert len(waits) == 1 and 17 < waits[0] <= 20
    assert isinstance(terminal(sink.events), EndEvent)


async def test_retries_exhausted_end_with_the_documented_error(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 429, "1", refusals=10)
    p = producer(upstream, retries=2)
    waits = no_waiting(p)
    end = terminal((await run(p)).events)
    assert sent == [429, 429, 429] and waits == [1.0, 1.0]
    assert isinstance(end, ErrorEvent)
    assert (end.kind, end.retryable, end.message) == ("http_status", True, "HTTP 429: slow down")


async def test_retry_after_beyond_retry_max_wait_is_not_waited_for(upstream: Upstream) -> None:
    sent = refuse_then_stream(upstream, 503, "600")
    p = producer(upstream, retries=3, retry_max_wait=30)
    waits = no_waiting(p)
    end = terminal((await run(p)).events)
    assert sent == [503] and waits == []
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("http_status", True)
    assert "the server asked to wait 600 s, more than the 30 s allowed" in end.message


async def test_backoff_without_retry_after_has_jitter(upstream: Upstream) -> None:
    refuse_then_stream(upstream, 503, "soon", refusals=10)  # not a Retry-After value: back off as usual
    first, second = producer(upstream, retries=3, retry_backoff=0.5), producer(upstream, retries=3, retry_backoff=0.5)
    a, b = no_waiting(first), no_waiting(second)
    await run(first)
    await run(second)
    assert len(a) == len(b) == 3 and a != b
    for n, (x, y) in enumerate(zip(a, b, strict=True)):
        assert 0.5 * 2**n <= min(x, y) and max(x, y) <= 0.5 * 2**n + 0.5


def test_retry_keys_build_the_policy() -> None:
    p = build("producers", "ollama", {"model": "m", "prompt": "hi", "retries": 4, "retry_backoff": 0.25})
    assert isinstance(p, OllamaProducer)
    assert (p.retry.retries, p.retry.backoff, p.retry.max_wait) == (4, 0.25, 30.0)
    p = OllamaProducer(model="m", prompt="hi", retry_max_wait=5)
    assert p.retry.max_wait == 5


@pytest.mark.parametrize("key", ["retry_backoff", "retry_max_wait"])
def test_bad_retry_keys_are_named(key: str) -> None:
    with pytest.raises(ConfigError, match=f"producers\\[0\\].{key}: must be at least 0 and finite, got -1"):
        build("producers", "ollama", {"model": "m", "prompt": "hi", key: -1}, path="pipe.toml", location="producers[0]")
