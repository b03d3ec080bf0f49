"""LiteLLMProducer through LiteLLM's OpenAI-compatible route, against serve-mock and a scripted server on loopback."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from streambus_litellm import LiteLLMProducer, chunk_pieces, usage_of

from streambus import Bus
from streambus.events import DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.mockserver import MockServer
from streambus.testing import EventCapture
from streambus.wire import ToolCallFragment, merge_tool_calls, parse_tool_text, tool_text

from .conftest import Reply, Upstream

pytest.importorskip("litellm", reason="install streambus-litellm[litellm]")

pytestmark = [
    pytest.mark.anyio,
    # LiteLLM and its dependencies warn about their own deprecations; they are not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBUS_TEST_LITELLM_KEY", "sk-lite")


TS = 1_767_225_600.25
TEXT = "こんにちは、世界🎌👩‍💻"
ARGS = '{"city": "京都"}'
USAGE = Usage(
    prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920, reasoning_tokens=256
)


def recorded(model: str = "gpt-4o-mini", tool: bool = True) -> list[Event]:
    deltas: list[tuple[str, str]] = [("reasoning", "考え中"), ("content", TEXT[:3]), ("content", TEXT[3:])]
    if tool:
        deltas.append(("tool", tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments=ARGS))))
    out: list[Event] = [StartEvent(stream="r", seq=0, ts=TS, model=model, provider="openai")]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream="r", seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    out.append(EndEvent(stream="r", seq=len(out), ts=TS + 9, reason="tool_calls" if tool else "stop", usage=USAGE))
    return out


async def run(p: LiteLLMProducer) -> list[Event]:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(p)
    return capture.events


def text(evs: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in evs if isinstance(e, DeltaEvent) and e.channel == channel)


def producer(base_url: str, **keys: Any) -> LiteLLMProducer:
    base: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "base_url": base_url,
        "api_key_env": "STREAMBUS_TEST_LITELLM_KEY",
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
    }
    return LiteLLMProducer(**{**base, **keys})


async def test_through_litellm_against_serve_mock() -> None:
    async with MockServer(recorded(), burst=True) as server:
        evs = await run(producer(server.url + "/v1"))
    assert isinstance(evs[0], StartEvent) and evs[0].provider == "litellm"
    assert text(evs) == TEXT and text(evs, "reasoning") == "考え中"
    (call,) = merge_tool_calls(parse_tool_text(text(evs, "tool")))
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", ARGS)
    end = evs[-1]
    assert isinstance(end, EndEvent) and end.reason == "tool_calls"
    assert end.usage is not None
    u = end.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_input_tokens, u.reasoning_tokens) == (
        2006,
        300,
        2306,
        1920,
        256,
    )


async def test_unknown_model_and_unreachable_server() -> None:
    async with MockServer(recorded(), burst=True) as server:
        end = (await run(producer(server.url + "/v1", model="openai/gpt-9", retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "model_not_found" and "gpt-9" in end.message
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    end = (await run(producer(f"http://127.0.0.1:{port}/v1", retries=0, extra_body={"num_retries": 0})))[-1]
    # LiteLLM reports a refused connection as its InternalServerError (500), not APIConnectionError.
    assert isinstance(end, ErrorEvent) and end.kind in ("connect", "http_status") and end.retryable
    assert "Connection error" in end.message


async def test_recorded_error_mid_stream_keeps_the_text() -> None:
    failed = [
        *recorded(tool=False)[:-1],
        ErrorEvent(stream="r", seq=4, ts=TS + 5, kind="upstream_error", message="GPU gone"),
    ]
    async with MockServer(failed, burst=True) as server:
        evs = await run(producer(server.url + "/v1", retries=0))
    assert text(evs) == TEXT
    end = evs[-1]
    assert isinstance(end, ErrorEvent) and "GPU gone" in end.message


async def test_timeout_between_chunks(upstream: Upstream) -> None:
    first = (
        'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        '"choices":[{"index":0,"delta":{"content":"部分"},"finish_reason":null}]}\n\n'
    ).encode()
    upstream.replies = [Reply([first], then="hang")]
    evs = await run(producer(upstream.url + "/v1", timeout=0.3, retries=0))
    assert text(evs) == "部分"
    end = evs[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and "timeout=0.3s" in end.message


def test_chunk_mapping_reads_dicts_and_anthropic_cache_counts() -> None:
    chunk = {
        "choices": [
            {
                "delta": {"content": "a", "tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "cache_creation_input_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 6},
        },
    }
    pieces, finish, usage = chunk_pieces(chunk)
    assert pieces == [("a", "content"), (tool_text(ToolCallFragment(index=1, arguments="{}")), "tool")]
    assert finish == "stop"
    assert usage == Usage(
        prompt_tokens=10, completion_tokens=2, total_tokens=12, cached_input_tokens=6, cache_creation_input_tokens=4
    )
    assert usage_of(None) is None


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ValueError, match="model: required"):
        LiteLLMProducer(messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="messages: required"):
        LiteLLMProducer(model="openai/x")
