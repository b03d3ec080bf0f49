"""OllamaProducer against a real aiohttp server on loopback serving byte-exact fixtures."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import orjson
import pytest
from streambus_ollama import OllamaProducer

from streambus import Bus, ConfigError, StreamBusError
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.plugins import build
from streambus.wire import parse_tool_text

from .conftest import Reply, Upstream

pytestmark = pytest.mark.anyio

# A /api/chat stream as the Ollama API documentation shows it, with a
# thinking model and Japanese text (multi-byte characters everywhere).
CHAT = (
    b'{"model":"qwen3","created_at":"2026-01-01T00:00:00.1Z","message":{"role":"assistant","content":"",'
    b'"thinking":"\xe8\x80\x83\xe3\x81\x88\xe4\xb8\xad"},"done":false}\n'
    + b'{"model":"qwen3","created_at":"2026-01-01T00:00:00.2Z","message":{"role":"assistant","content":"'
    + "こんにちは".encode()
    + b'"},"done":false}\n'
    + b'{"model":"qwen3","created_at":"2026-01-01T00:00:00.3Z","message":{"role":"assistant","content":"'
    + "、世界🎌".encode()
    + b'"},"done":false}\n'
    + b'{"model":"qwen3","created_at":"2026-01-01T00:00:00.4Z","message":{"role":"assistant","content":""},'
    b'"done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,'
    b'"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}\n'
)
CHAT_TEXT = "こんにちは、世界🎌"
GENERATE = (
    b'{"model":"llama3.2","created_at":"2026-01-01T00:00:00.1Z","response":"The","done":false}\r\n'
    b'{"model":"llama3.2","created_at":"2026-01-01T00:00:00.2Z","response":" sky","done":false}\r\n\r\n'
    b'{"model":"llama3.2","created_at":"2026-01-01T00:00:00.3Z","response":"","done":true,"done_reason":"length",'
    b'"context":[1,2,3],"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,'
    b'"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000}\r\n'
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


async def run(producer: OllamaProducer, sink: Collect | None = None) -> Collect:
    sink = sink or Collect()
    async with Bus() as bus:
        bus.add_sink(sink, name="collect")
        bus.start_producer(producer)
    return sink


def producer(upstream: Upstream, **keys: Any) -> OllamaProducer:
    base: dict[str, Any] = {
        "url": upstream.url,
        "model": "qwen3",
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
    }
    return OllamaProducer(**{**base, **keys})


def text(events: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent) and e.channel == channel)


def terminal(events: list[Event]) -> Event:
    return events[-1]


async def test_chat_stream_becomes_events(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT])]
    p = producer(
        upstream, system="Be brief.", think=True, keep_alive="5m", options={"temperature": 0.1}, meta={"session": "s-1"}
    )
    sink = await run(p)
    (stream,) = p.stream_ids
    events = sink.of(stream)
    start = events[0]
    assert isinstance(start, StartEvent)
    assert (start.model, start.provider, start.meta) == ("qwen3", "ollama", {"session": "s-1"})
    assert text(events, "reasoning") == "考え中"
    assert text(events) == CHAT_TEXT
    end = terminal(events)
    assert isinstance(end, EndEvent)
    assert end.reason == "stop"
    assert end.usage == Usage(prompt_tokens=26, completion_tokens=282, total_tokens=308)
    assert end.timings == {
        "total_duration": 4.883583458,
        "load_duration": 0.001334875,
        "prompt_eval_duration": 0.342546,
        "eval_duration": 4.535599,
    }
    assert [e.seq for e in events] == list(range(len(events)))
    assert upstream.requests == [
        {
            "model": "qwen3",
            "stream": True,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "options": {"temperature": 0.1},
            "think": True,
            "keep_alive": "5m",
        }
    ]


async def test_generate_with_crlf_blank_lines_and_done_reason(upstream: Upstream) -> None:
    upstream.replies = [Reply([GENERATE])]
    p = OllamaProducer(
        url=upstream.url,
        model="llama3.2",
        endpoint="generate",
        prompt="Why is the sky blue?",
        system="You are a physicist.",
        format="json",
    )
    sink = await run(p)
    events = sink.of(p.stream_ids[0])
    assert text(events) == "The sky"
    end = terminal(events)
    assert isinstance(end, EndEvent) and end.reason == "length"
    assert end.timings["load_duration"] == 6.338219291
    assert upstream.requests[0] == {
        "model": "llama3.2",
        "stream": True,
        "prompt": "Why is the sky blue?",
        "system": "You are a physicist.",
        "format": "json",
    }


def chunkings(body: bytes) -> list[list[bytes]]:
    """Every split point inside a multi-byte character, one byte per read, and everything at once."""
    inside = [i for i in range(1, len(body)) if 0x80 <= body[i] < 0xC0]
    out = [[body[:i], body[i:]] for i in inside]
    out.append([body[i : i + 1] for i in range(len(body))])
    out.append([body])
    return out


async def test_adversarial_chunking_never_changes_the_events(upstream: Upstream) -> None:
    cases = chunkings(CHAT)
    upstream.replies = [Reply(chunks) for chunks in cases]
    p = producer(upstream, requests=[{"prompt": "hi"} for _ in cases], concurrency=4)
    sink = await run(p)
    assert len(p.stream_ids) == len(cases) > 20
    for stream in p.stream_ids:
        events = sink.of(stream)
        assert text(events) == CHAT_TEXT
        assert text(events, "reasoning") == "考え中"
        assert [type(e) for e in events] == [StartEvent, *[DeltaEvent] * 3, EndEvent]


async def test_tool_calls_become_tool_deltas(upstream: Upstream) -> None:
    body = (
        b'{"model":"qwen3","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"",'
        b'"tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Tokyo"}}},'
        b'{"function":{"name":"get_time","arguments":{}}}]},"done":false}\n'
        b'{"model":"qwen3","created_at":"2026-01-01T00:00:01Z","message":{"role":"assistant","content":""},'
        b'"done":true,"done_reason":"stop"}\n'
    )
    upstream.replies = [Reply([body])]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    p = producer(upstream, tools=tools)
    sink = await run(p)
    fragments = parse_tool_text(text(sink.events, "tool"))
    assert [(f.index, f.name, orjson.loads(f.arguments)) for f in fragments] == [
        (0, "get_weather", {"city": "Tokyo"}),
        (1, "get_time", {}),
    ]
    assert upstream.requests[0]["tools"] == tools


# -- failures -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_refused_is_connect_error_after_retries() -> None:
    p = OllamaProducer(url=f"http://127.0.0.1:{closed_port()}", model="m", prompt="hi", retries=1, retry_backoff=0)
    sink = await run(p)
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent)
    assert (end.kind, end.retryable) == ("connect", True)
    assert "cannot reach" in end.message


async def test_dns_failure_is_connect_error() -> None:
    p = OllamaProducer(url="http://no-such-host.invalid:11434", model="m", prompt="hi", retries=0)
    end = terminal((await run(p)).events)
    assert isinstance(end, ErrorEvent) and end.kind == "connect"


async def test_http_status_carries_the_error_body(upstream: Upstream) -> None:
    upstream.replies = [Reply(status=500, body=b'{"error":"llama runner process has terminated"}')]
    sink = await run(producer(upstream, retries=0))
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent)
    assert end.kind == "http_status" and end.retryable
    assert end.message == "HTTP 500: llama runner process has terminated"


async def test_unknown_model_is_model_not_found(upstream: Upstream) -> None:
    upstream.replies = [Reply(status=404, body=b'{"error":"model \\"nope\\" not found, try pulling it first"}')]
    sink = await run(producer(upstream, model="nope", retries=3))
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent)
    assert (end.kind, end.retryable) == ("model_not_found", False)
    assert 'model "nope" not found' in end.message
    assert len(upstream.requests) == 1  # not retryable: asked once


async def test_error_object_mid_stream_keeps_the_text(upstream: Upstream) -> None:
    upstream.replies = [
        Reply([CHAT.split(b"\n")[1] + b"\n", b'{"error":"an error was encountered while running the model"}\n'])
    ]
    sink = await run(producer(upstream))
    assert text(sink.events) == "こんにちは"
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "upstream_error"
    assert "while running the model" in end.message


async def test_malformed_line_keeps_the_text_and_names_the_offset(upstream: Upstream) -> None:
    first = CHAT.split(b"\n")[1] + b"\n"
    upstream.replies = [Reply([first, b"{not json}\n"])]
    sink = await run(producer(upstream, retries=2))
    assert text(sink.events) == "こんにちは"
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "malformed"
    assert f"at byte {len(first)}" in end.message
    assert len(upstream.requests) == 1


async def test_wrong_shape_is_malformed(upstream: Upstream) -> None:
    upstream.replies = [Reply([b'{"message":{"content":42},"done":false}\n'])]
    end = terminal((await run(producer(upstream))).events)
    assert isinstance(end, ErrorEvent) and end.kind == "malformed"
    assert "message.content" in end.message


async def test_first_chunk_timeout(upstream: Upstream) -> None:
    upstream.replies = [Reply([], then="hang")]
    sink = await run(producer(upstream, first_chunk_timeout=0.2, retries=0))
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "timeout" and end.retryable
    assert "first_chunk_timeout=0.2s" in end.message


async def test_timeout_between_chunks_keeps_the_text(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT.split(b"\n")[1] + b"\n"], then="hang")]
    sink = await run(producer(upstream, timeout=0.2, retries=3))
    assert text(sink.events) == "こんにちは"
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "timeout"
    assert "timeout=0.2s" in end.message
    assert len(upstream.requests) == 1  # a delta was published: never retried


@pytest.mark.parametrize("cut", ["after_line", "mid_line"])
async def test_upstream_closing_before_done_is_truncated(upstream: Upstream, cut: str) -> None:
    lines = CHAT.split(b"\n")
    body = lines[1] + b"\n" + (lines[2][:20] if cut == "mid_line" else b"")
    upstream.replies = [Reply([body], then="drop")]
    sink = await run(producer(upstream, retries=2))
    assert text(sink.events) == "こんにちは"
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "truncated"
    assert len(upstream.requests) == 1


async def test_clean_end_of_body_before_done_is_truncated(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT.split(b"\n")[1] + b"\n"], then="end")]
    end = terminal((await run(producer(upstream, retries=0))).events)
    assert isinstance(end, ErrorEvent) and end.kind == "truncated"
    assert "before the final done object" in end.message


async def test_retries_happen_only_before_the_first_delta(upstream: Upstream) -> None:
    busy = Reply(status=503, body=b'{"error":"server busy"}')
    upstream.replies = [busy, busy, Reply([CHAT])]
    sink = await run(producer(upstream, retries=2))
    assert len(upstream.requests) == 3
    assert text(sink.events) == CHAT_TEXT  # once: nothing duplicated
    assert sum(isinstance(e, StartEvent) for e in sink.events) == 1
    assert isinstance(terminal(sink.events), EndEvent)


async def test_retries_give_up_with_the_last_failure(upstream: Upstream) -> None:
    upstream.replies = [Reply(status=503, body=b'{"error":"server busy"}')]
    sink = await run(producer(upstream, retries=2))
    assert len(upstream.requests) == 3
    end = terminal(sink.events)
    assert isinstance(end, ErrorEvent) and end.kind == "http_status"


async def test_abort_closes_the_http_response(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT.split(b"\n")[1] + b"\n"], then="hang")]
    sink = Collect(abort_at_first_delta=True)
    async with Bus() as bus:
        bus.add_sink(sink, name="collect")
        bus.start_producer(producer(upstream, timeout=30))
        with anyio.fail_after(10):
            await upstream.disconnected.wait()  # the server saw the client go away
    end = terminal(sink.events)
    assert isinstance(end, AbortEvent)
    assert (end.reason, end.by) == ("enough", "client")
    assert text(sink.events) == "こんにちは"


async def test_requests_run_with_a_concurrency_limit(upstream: Upstream) -> None:
    upstream.replies = [Reply([CHAT])]
    p = producer(upstream, requests=[{"prompt": f"q{i}", "meta": {"q": i}} for i in range(6)], concurrency=2)
    sink = await run(p)
    assert upstream.max_inflight <= 2
    assert len(p.stream_ids) == 6
    starts = [e for e in sink.events if isinstance(e, StartEvent)]
    assert sorted(s.meta["q"] for s in starts) == list(range(6))
    assert all(s.meta["request_index"] == s.meta["q"] for s in starts)
    assert sorted(r["messages"][-1]["content"] for r in upstream.requests) == [f"q{i}" for i in range(6)]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error() -> None:
    p = OllamaProducer(model="m", prompt="hi")
    async with Bus() as bus:
        with pytest.raises(RuntimeError, match="runs only on asyncio"):
            await p.run(bus)


# -- configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"url": "localhost:11434"}, "url: expected an http"),
        ({"timeout": 0}, "timeout: must be more than 0"),
        ({"first_chunk_timeout": -1}, "first_chunk_timeout"),
        ({"retries": -1}, "retries: must be at least 0, got -1"),
        ({"concurrency": 0}, "concurrency: must be at least 1"),
        ({"endpoint": "generate", "messages": [{"role": "user", "content": "x"}]}, "prompt: required"),
        ({"messages": None}, "messages: required"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "", "requests": [{"model": "a", "prompt": "x"}, {"prompt": "y"}]}, "requests[1].model"),
    ],
)
def test_bad_options_name_the_key(keys: dict[str, Any], problem: str) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")) as info:
        build("producers", "ollama", {**base, **keys}, path="pipe.toml", location="producers[0]")
    assert isinstance(info.value, StreamBusError)
    assert "pipe.toml" in str(info.value)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="producers\\[0\\].modle"):
        build("producers", "ollama", {"modle": "x"}, path="pipe.toml", location="producers[0]")


def test_built_from_config_like_in_python() -> None:
    p = build("producers", "ollama", {"model": "m", "prompt": "hi", "endpoint": "generate", "think": "high"})
    assert isinstance(p, OllamaProducer)
    assert p.requests()[0][1]["think"] == "high"
    same = OllamaProducer(OllamaProducer.Options(model="m", prompt="hi", endpoint="generate", think="high"))
    assert same.requests() == p.requests()


def test_python_keywords_are_validated_too() -> None:
    with pytest.raises(ValueError, match="unknown field `modle`"):
        OllamaProducer(modle="x")
    with pytest.raises(ValueError, match="timeout: must be more than 0"):
        OllamaProducer(model="m", prompt="p", timeout=0)
    base = OllamaProducer.Options(model="m", prompt="p")
    assert OllamaProducer(base, model="other").options.model == "other"
