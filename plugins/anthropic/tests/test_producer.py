"""AnthropicProducer against a real aiohttp server on loopback: the stream, and every way it fails."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from streambus_anthropic import AnthropicProducer
from structlog.testing import capture_logs

from streambus import Bus
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from streambus.testing import EventCapture
from streambus.wire import merge_tool_calls, parse_tool_text

from .conftest import Reply, Upstream
from .test_protocol import MESSAGE, STREAM, USAGE, block_delta, sse

pytestmark = pytest.mark.anyio

KEY_ENV = "STREAMBUS_TEST_ANTHROPIC_KEY"


def producer(upstream: Upstream, **keys: Any) -> AnthropicProducer:
    base: dict[str, Any] = {
        "base_url": upstream.url,
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
        "api_key_env": KEY_ENV,
    }
    return AnthropicProducer(**{**base, **keys})


async def run(p: AnthropicProducer) -> list[Event]:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(p)
    return capture.events


def text(events: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent) and e.channel == channel)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


START = sse("message_start", {"type": "message_start", "message": MESSAGE})
PARTIAL = START + block_delta(0, {"type": "text_delta", "text": "部分"})


async def test_stream_becomes_events_and_the_request_is_anthropics(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-ant-secret-123")
    # Cut inside every multi-byte character: each piece is written on its own.
    upstream.replies = [Reply([STREAM[i : i + 7] for i in range(0, len(STREAM), 7)])]
    p = producer(upstream, system="Be brief.", thinking={"type": "enabled", "budget_tokens": 1024}, meta={"u": 1})
    with capture_logs() as logs:
        events = await run(p)
    start, end = events[0], events[-1]
    assert isinstance(start, StartEvent) and (start.provider, start.model, start.meta) == (
        "anthropic",
        "claude-sonnet-4-5",
        {"u": 1},
    )
    assert text(events) == "こんにちは、世界🎌👩‍💻"
    assert text(events, "reasoning") == "考えています"
    (call,) = merge_tool_calls(parse_tool_text(text(events, "tool")))
    assert (call.id, call.name, call.arguments) == ("toolu_01", "get_weather", '{"city": "京都", "unit": "c"}')
    assert isinstance(end, EndEvent) and (end.reason, end.usage) == ("tool_calls", USAGE)
    body, headers = upstream.requests[0], upstream.headers[0]
    assert body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "system": "Be brief.",
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    assert headers["x-api-key"] == "sk-ant-secret-123" and headers["anthropic-version"] == "2023-06-01"
    assert "sk-ant-secret-123" not in repr(logs)


async def test_connect_refused_is_connect_error() -> None:
    p = AnthropicProducer(
        base_url=f"http://127.0.0.1:{closed_port()}", model="m", prompt="hi", retries=1, retry_backoff=0
    )
    end = (await run(p))[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("connect", True)


async def test_http_errors_carry_anthropics_error_body(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(status=529, body=b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    ]
    end = (await run(producer(upstream, retries=1)))[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("http_status", True)
    assert end.message == "HTTP 529 (overloaded_error): Overloaded"
    assert len(upstream.requests) == 2


async def test_bad_key_is_not_retried(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(
            status=401, body=b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
        )
    ]
    end = (await run(producer(upstream, retries=3)))[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("http_status", False)
    assert "authentication_error" in end.message and len(upstream.requests) == 1


async def test_unknown_model_is_model_not_found(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(status=404, body=b'{"type":"error","error":{"type":"not_found_error","message":"model: claude-9"}}')
    ]
    end = (await run(producer(upstream, model="claude-9")))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "model_not_found" and "claude-9" in end.message


async def test_overloaded_error_event_mid_stream_keeps_the_text(upstream: Upstream) -> None:
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    upstream.replies = [Reply([PARTIAL, error])]
    events = await run(producer(upstream, retries=2))
    assert text(events) == "部分"
    end = events[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("upstream_error", True)
    assert "overloaded_error" in end.message and "Overloaded" in end.message
    assert len(upstream.requests) == 1  # text was published: never retried


async def test_error_event_before_any_text_is_retried(upstream: Upstream) -> None:
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    upstream.replies = [Reply([START, error]), Reply([STREAM])]
    events = await run(producer(upstream, retries=1))
    assert isinstance(events[-1], EndEvent) and text(events) == "こんにちは、世界🎌👩‍💻"
    assert len(upstream.requests) == 2


async def test_malformed_event_keeps_the_text_and_names_the_position(upstream: Upstream) -> None:
    upstream.replies = [Reply([PARTIAL, b"event: content_block_delta\ndata: {oops\n\n"])]
    events = await run(producer(upstream, retries=2))
    assert text(events) == "部分"
    end = events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "malformed"
    assert f"at byte {len(PARTIAL) + len(b'event: content_block_delta') + 1}" in end.message


async def test_unknown_event_types_are_skipped(upstream: Upstream) -> None:
    novel = sse("producer_test_novelty", {"type": "producer_test_novelty"})
    upstream.replies = [Reply([novel + STREAM])]
    events = await run(producer(upstream))
    assert isinstance(events[-1], EndEvent) and text(events) == "こんにちは、世界🎌👩‍💻"


async def test_first_chunk_timeout(upstream: Upstream) -> None:
    upstream.replies = [Reply([], then="hang")]
    end = (await run(producer(upstream, first_chunk_timeout=0.2, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and "first_chunk_timeout=0.2s" in end.message


async def test_timeout_between_chunks_keeps_the_text(upstream: Upstream) -> None:
    upstream.replies = [Reply([PARTIAL], then="hang")]
    events = await run(producer(upstream, timeout=0.2, retries=3))
    assert text(events) == "部分"
    end = events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and "timeout=0.2s" in end.message


@pytest.mark.parametrize("then", ["drop", "end"])
async def test_no_message_stop_is_truncated(upstream: Upstream, then: str) -> None:
    upstream.replies = [Reply([STREAM[: STREAM.index(b"event: message_stop")]], then=then)]
    events = await run(producer(upstream, retries=2))
    assert text(events) == "こんにちは、世界🎌👩‍💻"
    end = events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "truncated"
    assert "message_stop" in end.message if then == "end" else "connection broke" in end.message
    assert len(upstream.requests) == 1


async def test_abort_closes_the_http_response(upstream: Upstream) -> None:
    upstream.replies = [Reply([PARTIAL], then="hang")]
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        p = producer(upstream, timeout=30)
        bus.start_producer(p)
        with anyio.fail_after(10):
            await capture.wait_for(lambda c: any(isinstance(e, DeltaEvent) for e in c.events))
        bus.abort(p.stream_ids[0], "enough", by="client")
        with anyio.fail_after(10):
            await upstream.disconnected.wait()
    assert isinstance(capture.events[-1], AbortEvent)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"model": ""}, "model: required"),
        ({"messages": None}, "messages: required"),
        ({"messages": [{"content": "x"}]}, "messages[0].role: required"),
        ({"max_tokens": 0}, "max_tokens: must be at least 1"),
        ({"timeout": 0}, "timeout: must be more than 0"),
        ({"base_url": "ftp://x"}, "base_url: expected an http"),
    ],
)
def test_bad_options_name_the_key(keys: dict[str, Any], problem: str) -> None:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        AnthropicProducer(**{**base, **keys})


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error() -> None:
    p = AnthropicProducer(model="m", prompt="hi")
    async with Bus() as bus:
        with pytest.raises(RuntimeError, match="runs only on asyncio"):
            await p.run(bus)
