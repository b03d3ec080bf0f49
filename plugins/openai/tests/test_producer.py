"""OpenAIProducer against a real aiohttp server on loopback serving byte-exact fixtures."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import orjson
import pytest
from streambus_openai import OpenAIProducer
from structlog.testing import capture_logs

from streambus import Bus, ConfigError
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.plugins import build
from streambus.wire import merge_tool_calls, parse_tool_text

from .conftest import Reply, Upstream

pytestmark = pytest.mark.anyio


def chunk(choices: list[dict[str, Any]], usage: Any = None, obj: str = "chat.completion.chunk") -> bytes:
    body = {
        "id": "chatcmpl-7",
        "object": obj,
        "created": 1767225600,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def delta(d: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}


USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
# A chat stream as the OpenAI API reference shows it (include_usage on),
# with reasoning_content as DeepSeek/vLLM send it and Japanese text.
CHAT = (
    chunk([delta({"role": "assistant", "content": ""})])
    + chunk([delta({"reasoning_content": "考え中"})])
    + chunk([delta({"content": "こんにちは"})])
    + chunk([delta({"content": "、世界🎌"})])
    + chunk([delta({}, "stop")])
    + chunk([], USAGE)
    + b"data: [DONE]\n\n"
)
CHAT_TEXT = "こんにちは、世界🎌"
# The same stream as some compatible servers write it: keep-alive comments,
# no space after "data:", CRLF line ends.
LOOSE = b": keep-alive\r\n\r\n" + CHAT.replace(b"data: ", b"data:").replace(b"\n", b"\r\n").replace(
    b"data:[DONE]", b": bye\r\ndata:[DONE]"
)


class Collect:
    """A sink that keeps every event; aborts a stream at its first delta when asked."""

    overflow = "block"

    def __init__(self, abort_at_first_delta: bool = False) -> None:
        self.events: list[Event] = []
        self.abort = abort_at_first_delta
        self.bus: Bus | None = None

    async def setup(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, events: Any) -> None:
        async for event in events:
            self.events.append(event)
            if self.abort and isinstance(event, DeltaEvent) and self.bus is not None:
                self.bus.abort(event.stream, "enough", by="client")

    def of(self, stream: str) -> list[Event]:
        return [e for e in self.events if e.stream == stream]


async def run(producer: OpenAIProducer, sink: Collect | None = None) -> Collect:
    sink = sink or Collect()
    async with Bus() as bus:
        bus.add_sink(sink, name="collect")
        bus.start_producer(producer)
    return sink


def producer(upstream: Upstream, **keys: Any) -> OpenAIProducer:
    base: dict[str, Any] = {
        "base_url": upstream.url + "/v1",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
        "api_key_env": "STREAMBUS_TEST_OPENAI_KEY",
    }
    return OpenAIProducer(**{**base, **keys})


def text(events: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent) and e.channel == channel)


@pytest.mark.parametrize("body", [CHAT, LOOSE], ids=["openai", "loose"])
async def test_chat_stream_becomes_events(upstream: Upstream, body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBUS_TEST_OPENAI_KEY", "sk-secret-123")
    upstream.replies = [Reply([body])]
    p = producer(upstream, temperature=0.2, max_tokens=50, extra_body={"seed": 7}, meta={"user": "u1"})
    with capture_logs() as logs:
        sink = await run(p)
    (stream,) = p.stream_ids
    events = sink.of(stream)
    start = events[0]
    assert isinstance(start, StartEvent)
    assert (start.model, start.provider, start.meta) == ("gpt-4o-mini", "openai", {"user": "u1"})
    assert text(events, "reasoning") == "考え中"
    assert text(events) == CHAT_TEXT
    end = events[-1]
    assert isinstance(end, EndEvent)
    assert end.reason == "stop"
    assert end.usage == Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21)
    assert upstream.requests == [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2,
            "max_tokens": 50,
            "seed": 7,
        }
    ]
    assert upstream.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in repr(logs) + repr(sink.events) + repr(p.options)


async def test_no_key_in_the_environment_sends_no_authorization(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT])]
    await run(producer(upstream, api_key_env="STREAMBUS_TEST_UNSET_KEY"))
    assert "Authorization" not in upstream.headers[0]


def chunkings(body: bytes) -> list[list[bytes]]:
    """Every split point inside a multi-byte character, one byte per read, and everything at once."""
    inside = [i for i in range(1, len(body)) if 0x80 <= body[i] < 0xC0]
    out = [[body[:i], body[i:]] for i in inside]
    out.append([body[i : i + 1] for i in range(len(body))])
    out.append([body])
    return out


async def test_adversarial_chunking_never_changes_the_events(upstream: Upstream) -> None:
    cases = chunkings(LOOSE)
    upstream.replies = [Reply(chunks) for chunks in cases]
    p = producer(upstream, requests=[{"prompt": "hi"} for _ in cases], concurrency=4)
    sink = await run(p)
    assert len(p.stream_ids) == len(cases) > 20
    for stream in p.stream_ids:
        events = sink.of(stream)
        assert text(events) == CHAT_TEXT
        assert [type(e) for e in events] == [StartEvent, *[DeltaEvent] * 3, EndEvent]


async def test_n_choices_become_one_stream_each(upstream: Upstream) -> None:
    body = (
        chunk(
            [delta({"role": "assistant", "content": ""}, index=0), delta({"role": "assistant", "content": ""}, index=1)]
        )
        + chunk([delta({"content": "A1"}, index=0)])
        + chunk([delta({"content": "B1"}, index=1)])
        + chunk([delta({"content": "A2"}, index=0), delta({"content": "B2"}, index=1)])
        + chunk([delta({}, "length", index=1)])
        + chunk([delta({}, "stop", index=0)])
        + chunk([], USAGE)
        + b"data: [DONE]\n\n"
    )
    upstream.replies = [Reply([body])]
    p = producer(upstream, n=2)
    sink = await run(p)
    assert upstream.requests[0]["n"] == 2
    by_choice = {}
    for stream in p.stream_ids:
        events = sink.of(stream)
        start = events[0]
        assert isinstance(start, StartEvent)
        by_choice[start.meta["choice"]] = events
        assert start.meta["n"] == 2
    assert text(by_choice[0]) == "A1A2" and text(by_choice[1]) == "B1B2"
    end0, end1 = by_choice[0][-1], by_choice[1][-1]
    assert isinstance(end0, EndEvent) and isinstance(end1, EndEvent)
    assert (end0.reason, end1.reason) == ("stop", "length")
    assert end0.usage is not None and end0.usage.total_tokens == 21
    assert end1.usage is None  # the request's usage is counted once, on choice 0


async def test_tool_call_fragments_become_tool_deltas(upstream: Upstream) -> None:
    body = (
        chunk(
            [
                delta(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_abc",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ],
                    }
                )
            ]
        )
        + chunk([delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})])
        + chunk([delta({"tool_calls": [{"index": 0, "function": {"arguments": ' "東京"}'}}]})])
        + chunk([delta({}, "tool_calls")])
        + b"data: [DONE]\n\n"
    )
    upstream.replies = [Reply([body])]
    sink = await run(producer(upstream, tools=[{"type": "function", "function": {"name": "get_weather"}}]))
    (call,) = merge_tool_calls(parse_tool_text(text(sink.events, "tool")))
    assert (call.id, call.name, orjson.loads(call.arguments)) == ("call_abc", "get_weather", {"city": "東京"})
    end = sink.events[-1]
    assert isinstance(end, EndEvent) and end.reason == "tool_calls"


async def test_legacy_completions(upstream: Upstream) -> None:
    body = (
        chunk([{"text": "Once", "index": 0, "logprobs": None, "finish_reason": None}], obj="text_completion")
        + chunk([{"text": " upon", "index": 0, "logprobs": None, "finish_reason": "length"}], obj="text_completion")
        + b"data: [DONE]\n\n"
    )
    upstream.replies = [Reply([body])]
    p = producer(upstream, messages=None, prompt="Tell a story", include_usage=False)
    sink = await run(p)
    assert text(sink.events) == "Once upon"
    end = sink.events[-1]
    assert isinstance(end, EndEvent) and end.reason == "length" and end.usage is None
    assert upstream.requests[0] == {"model": "gpt-4o-mini", "prompt": "Tell a story", "stream": True}


# -- failures -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_refused_is_connect_error() -> None:
    p = OpenAIProducer(
        base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m", prompt="hi", retries=1, retry_backoff=0
    )
    end = (await run(p)).events[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("connect", True)


async def test_http_status_carries_the_openai_error_body(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(
            status=429,
            body=b'{"error":{"message":"Rate limit reached","type":"requests",'
            b'"param":null,"code":"rate_limit_exceeded"}}',
        )
    ]
    end = (await run(producer(upstream, retries=0))).events[-1]
    assert isinstance(end, ErrorEvent)
    assert (end.kind, end.retryable) == ("http_status", True)
    assert end.message == "HTTP 429 (rate_limit_exceeded): Rate limit reached"


async def test_unauthorized_is_not_retried(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(
            status=401,
            body=b'{"error":{"message":"Incorrect API key provided","type":'
            b'"invalid_request_error","param":null,"code":"invalid_api_key"}}',
        )
    ]
    end = (await run(producer(upstream, retries=3))).events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "http_status" and not end.retryable
    assert len(upstream.requests) == 1


async def test_unknown_model_is_model_not_found(upstream: Upstream) -> None:
    upstream.replies = [
        Reply(
            status=404,
            body=b'{"error":{"message":"The model `gpt-9` does not exist","type":'
            b'"invalid_request_error","param":null,"code":"model_not_found"}}',
        )
    ]
    end = (await run(producer(upstream, model="gpt-9"))).events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "model_not_found"
    assert "gpt-9" in end.message


async def test_error_object_mid_stream_keeps_the_text(upstream: Upstream) -> None:
    err = b'data: {"error":{"message":"The server had an error","type":"server_error","code":null}}\n\n'
    upstream.replies = [Reply([chunk([delta({"content": "partial"})]), err])]
    sink = await run(producer(upstream))
    assert text(sink.events) == "partial"
    end = sink.events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "upstream_error"
    assert "The server had an error" in end.message


async def test_error_event_type_is_upstream_error(upstream: Upstream) -> None:
    upstream.replies = [Reply([b'event: error\ndata: {"message":"overloaded"}\n\n'])]
    end = (await run(producer(upstream, retries=0))).events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "upstream_error" and "overloaded" in end.message


async def test_malformed_payload_keeps_the_text_and_names_the_offset(upstream: Upstream) -> None:
    first = chunk([delta({"content": "partial"})])
    upstream.replies = [Reply([first, b"data: {oops\n\n"])]
    sink = await run(producer(upstream, retries=2))
    assert text(sink.events) == "partial"
    end = sink.events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "malformed"
    assert f"at byte {len(first)}" in end.message
    assert len(upstream.requests) == 1


async def test_choice_out_of_range_is_malformed(upstream: Upstream) -> None:
    upstream.replies = [Reply([chunk([delta({"content": "x"}, index=3)])])]
    end = (await run(producer(upstream))).events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "malformed" and "choice 3" in end.message


async def test_first_chunk_timeout(upstream: Upstream) -> None:
    upstream.replies = [Reply([], then="hang")]
    end = (await run(producer(upstream, first_chunk_timeout=0.2, retries=0))).events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and "first_chunk_timeout=0.2s" in end.message


async def test_timeout_between_chunks_keeps_the_text(upstream: Upstream) -> None:
    upstream.replies = [Reply([chunk([delta({"content": "partial"})])], then="hang")]
    sink = await run(producer(upstream, timeout=0.2, retries=3))
    assert text(sink.events) == "partial"
    end = sink.events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and "timeout=0.2s" in end.message
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("then", ["drop", "end"])
async def test_no_done_is_truncated(upstream: Upstream, then: str) -> None:
    body = CHAT.split(b"data: [DONE]")[0]
    upstream.replies = [Reply([body[: len(body) - 30]], then=then)]
    sink = await run(producer(upstream, retries=2))
    assert text(sink.events) == CHAT_TEXT
    end = sink.events[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "truncated"
    assert len(upstream.requests) == 1


async def test_retries_happen_only_before_the_first_delta(upstream: Upstream) -> None:
    busy = Reply(status=503, body=b'{"error":{"message":"busy","type":"server_error","code":null}}')
    upstream.replies = [busy, Reply([], then="drop"), Reply([CHAT])]
    sink = await run(producer(upstream, retries=2))
    assert len(upstream.requests) == 3
    assert text(sink.events) == CHAT_TEXT
    assert sum(isinstance(e, StartEvent) for e in sink.events) == 1
    assert isinstance(sink.events[-1], EndEvent)


async def test_abort_closes_the_http_response(upstream: Upstream) -> None:
    upstream.replies = [Reply([chunk([delta({"content": "partial"})])], then="hang")]
    sink = Collect(abort_at_first_delta=True)
    async with Bus() as bus:
        bus.add_sink(sink, name="collect")
        bus.start_producer(producer(upstream, timeout=30))
        with anyio.fail_after(10):
            await upstream.disconnected.wait()
    end = sink.events[-1]
    assert isinstance(end, AbortEvent) and (end.reason, end.by) == ("enough", "client")
    assert text(sink.events) == "partial"


async def test_requests_run_with_a_concurrency_limit(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT])]
    p = producer(upstream, requests=[{"prompt": f"q{i}"} for i in range(5)], concurrency=2)
    sink = await run(p)
    assert upstream.max_inflight <= 2
    assert len([e for e in sink.events if isinstance(e, EndEvent)]) == 5


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error() -> None:
    p = OpenAIProducer(model="m", prompt="hi")
    async with Bus() as bus:
        with pytest.raises(RuntimeError, match="runs only on asyncio"):
            await p.run(bus)


# -- configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"base_url": "api.openai.com"}, "base_url: expected an http"),
        ({"timeout": 0}, "timeout: must be more than 0"),
        ({"n": 0}, "n: must be at least 1"),
        ({"max_tokens": 0}, "max_tokens: must be at least 1"),
        ({"api_key_env": ""}, "api_key_env"),
        ({"messages": None}, "messages: required"),
        ({"endpoint": "completions"}, "prompt: required"),
        ({"requests": [{"prompt": "x", "n": 0}]}, r"requests\[0\].n"),
    ],
)
def test_bad_options_name_the_key(keys: dict[str, Any], problem: str) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ConfigError, match=problem):
        build("producers", "openai", {**base, **keys}, path="pipe.toml", location="producers[0]")


def test_endpoint_auto_picks_the_route() -> None:
    chat = OpenAIProducer(model="m", messages=[{"role": "user", "content": "hi"}], prompt="and?", system="S")
    route, _, body, _ = chat.requests()[0]
    assert route == "chat"
    assert body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "and?"},
    ]
    assert OpenAIProducer(model="m", prompt="x").requests()[0][0] == "completions"
    built = build("producers", "openai", {"model": "m", "prompt": "x", "n": 3})
    assert isinstance(built, OpenAIProducer) and built.requests()[0][2]["n"] == 3


class AbortAll(Collect):
    """Aborts every stream at its first delta."""

    async def run(self, events: Any) -> None:
        aborted: set[str] = set()
        async for event in events:
            self.events.append(event)
            if isinstance(event, DeltaEvent) and event.stream not in aborted and self.bus is not None:
                aborted.add(event.stream)
                self.bus.abort(event.stream, "enough", by="client")


async def test_aborting_every_choice_closes_the_http_response(upstream: Upstream) -> None:
    body = chunk([delta({"content": "A"}, index=0), delta({"content": "B"}, index=1)])
    upstream.replies = [Reply([body], then="hang")]
    sink = AbortAll()
    async with Bus() as bus:
        bus.add_sink(sink, name="collect")
        p = producer(upstream, n=2, timeout=30)
        bus.start_producer(p)
        with anyio.fail_after(10):
            await upstream.disconnected.wait()
    ends = [e for e in sink.events if isinstance(e, AbortEvent)]
    assert len(ends) == 2


async def test_aborting_one_choice_lets_the_others_go_on(upstream: Upstream) -> None:
    upstream.replies = [Reply([chunk([delta({"content": "A"}, index=0)])], then="hang")]
    sink = Collect(abort_at_first_delta=True)
    sink_events = await run(producer(upstream, n=2, timeout=0.3, retries=0), sink)
    kinds = sorted(type(e).__name__ for e in sink_events.events if isinstance(e, AbortEvent | ErrorEvent))
    # Choice 0 was aborted; choice 1 kept reading until the upstream went quiet.
    assert kinds == ["AbortEvent", "ErrorEvent"]
    (error,) = [e for e in sink_events.events if isinstance(e, ErrorEvent)]
    assert error.kind == "timeout"


def test_python_keywords_are_validated_too() -> None:
    with pytest.raises(ValueError, match="unknown field `temprature`"):
        OpenAIProducer(model="m", prompt="p", temprature=1)
    with pytest.raises(ValueError, match="n: must be at least 1"):
        OpenAIProducer(model="m", prompt="p", n=0)
    base = OpenAIProducer.Options(model="m", prompt="p")
    assert OpenAIProducer(base, n=3).requests()[0][2]["n"] == 3
