"""AnthropicFormat: what it encodes, round trips, and the official ``anthropic`` client reading it.

The client reads the encoder's bytes twice: cut inside every multi-byte
character (each piece its own write, from a scripted server) and from
``streambus serve-mock`` (:class:`~streambus.mockserver.MockServer`) over loopback.
"""

from __future__ import annotations

import itertools
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web
from anthropic.types import InputJSONDelta, RawContentBlockDeltaEvent
from streambus_anthropic import AnthropicFormat, AnthropicStreamParser

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import (
    EndPiece,
    ErrorPiece,
    ModelsRoute,
    Piece,
    StreamEncoder,
    TextPiece,
    WireFormat,
    load_format,
)
from streambus.mockserver import MockServer
from streambus.wire import ToolCallFragment, tool_text

from .conftest import Upstream

TS = 1_767_225_600.25
TEXT = "こんにちは、世界🎌👩‍💻"
THOUGHT = "考えています🤔"
ARGS = '{"city": "京都", "unit": "c"}'
USAGE = Usage(
    prompt_tokens=2112,
    completion_tokens=42,
    total_tokens=2154,
    cached_input_tokens=2000,
    cache_creation_input_tokens=100,
)
MODEL = "claude-sonnet-4-5"
ASK = [{"role": "user", "content": "hi"}]


def events(stream: str = "s1", *, end: Event | None = None, model: str = MODEL) -> list[Event]:
    deltas = [
        ("reasoning", THOUGHT[:3]),
        ("reasoning", THOUGHT[3:]),
        ("content", TEXT[:4]),
        ("content", TEXT[4:]),
        ("tool", tool_text(ToolCallFragment(index=0, id="toolu_01", name="get_weather", arguments=ARGS[:12]))),
        ("tool", tool_text(ToolCallFragment(index=0, arguments=ARGS[12:]))),
    ]
    out: list[Event] = [StartEvent(stream=stream, seq=0, ts=TS, model=model, provider="anthropic")]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream=stream, seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    out.append(end or EndEvent(stream=stream, seq=len(out), ts=TS + 9, reason="tool_calls", usage=USAGE))
    return out


def test_registered_and_shaped_as_a_wire_format() -> None:
    fmt = load_format("anthropic")
    assert isinstance(fmt, AnthropicFormat) and isinstance(fmt, WireFormat) and isinstance(fmt, ModelsRoute)
    assert isinstance(fmt.stream_encoder("/v1/messages", {}), StreamEncoder)
    assert fmt.claims({"Anthropic-Version": "2023-06-01"}) and not fmt.claims({"Authorization": "Bearer x"})
    with pytest.raises(ValueError, match="route: Anthropic serves /v1/messages"):
        fmt.stream_encoder("/v1/chat/completions", {})


def test_round_trip_through_our_parser_at_every_cut() -> None:
    body = AnthropicFormat().encode_stream("messages", {"model": MODEL}, events())
    for size in (1, 2, 3, 5, len(body)):
        parser = AnthropicStreamParser()
        pieces: list[Piece] = []
        for i in range(0, len(body), size):
            pieces.extend(parser.feed(body[i : i + size]))
        assert parser.done
        by = {
            c: "".join(p.text for p in pieces if isinstance(p, TextPiece) and p.channel == c)
            for c in ("content", "reasoning")
        }
        assert (by["content"], by["reasoning"]) == (TEXT, THOUGHT)
        assert pieces[-1] == EndPiece(reason="tool_calls", usage=USAGE)


def test_errors_and_aborts_become_error_events() -> None:
    fmt = AnthropicFormat()
    failed = events(
        end=ErrorEvent(stream="s1", seq=7, ts=TS, kind="upstream_error", message="GPU gone", retryable=True)
    )
    parser = AnthropicStreamParser()
    pieces = list(parser.feed(fmt.encode_stream("messages", {}, failed)))
    assert pieces[-1] == ErrorPiece(message="GPU gone", code="overloaded_error", retryable=True)
    aborted = events(end=AbortEvent(stream="s1", seq=7, ts=TS, reason="flagged", by="moderation"))
    assert fmt.assemble("messages", {}, aborted) == {
        "type": "error",
        "error": {"type": "api_error", "message": "stream aborted by moderation: flagged"},
    }


def split_inside_characters(body: bytes) -> list[bytes]:
    """Cut *body* after the first byte of every multi-byte UTF-8 character."""
    cuts = [i + 1 for i, byte in enumerate(body) if byte >= 0xC0]
    return [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]


async def _serve(upstream: Upstream, evs: list[Event]) -> None:
    fmt = AnthropicFormat()

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        if not fmt.is_streaming("messages", body):
            return web.json_response(fmt.assemble("messages", body, evs))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in split_inside_characters(fmt.encode_stream("messages", body, evs)):
            await response.write(piece)
        await response.write_eof()
        return response

    upstream.by_path["/v1/messages"] = answer


@pytest.mark.anyio
async def test_official_client_stream_helper_reads_characters_split_across_reads(upstream: Upstream) -> None:
    await _serve(upstream, events())
    async with anthropic.AsyncAnthropic(base_url=upstream.url, api_key="test", max_retries=0) as client:
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:  # type: ignore[arg-type]
            texts = [t async for t in stream.text_stream]
            message = await stream.get_final_message()
        assert "".join(texts) == TEXT
        thinking, text, tool = message.content
        assert thinking.type == "thinking" and thinking.thinking == THOUGHT
        assert text.type == "text" and text.text == TEXT
        assert tool.type == "tool_use" and (tool.id, tool.name, tool.input) == (
            "toolu_01",
            "get_weather",
            orjson.loads(ARGS),
        )
        assert message.stop_reason == "tool_use"
        u = message.usage
        assert (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens) == (
            12,
            100,
            2000,
            42,
        )

        raw = await client.messages.create(model=MODEL, max_tokens=100, messages=ASK, stream=True)  # type: ignore[arg-type]
        pieces: list[str] = []
        assert isinstance(raw, anthropic.AsyncStream)
        async for e in raw:
            if isinstance(e, RawContentBlockDeltaEvent) and isinstance(e.delta, InputJSONDelta):
                pieces.append(e.delta.partial_json)
        partial = "".join(pieces)
        assert partial == ARGS

        whole = await client.messages.create(model=MODEL, max_tokens=100, messages=ASK)  # type: ignore[arg-type]
        assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
        assert whole.usage.cache_read_input_tokens == 2000


@pytest.mark.anyio
async def test_official_client_raises_the_error_event(upstream: Upstream) -> None:
    failed = events(end=ErrorEvent(stream="s1", seq=7, ts=TS, kind="overloaded_error", message="Overloaded"))
    await _serve(upstream, failed)
    async with anthropic.AsyncAnthropic(base_url=upstream.url, api_key="test", max_retries=0) as client:
        seen: list[str] = []
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with client.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:  # type: ignore[arg-type]
                async for t in stream.text_stream:
                    seen.append(t)
        assert "".join(seen) == TEXT


def test_official_client_against_serve_mock() -> None:
    recorded = [*events("a"), *events("b", model="qwen3")]
    with (
        MockServer(recorded, burst=True).running() as url,
        anthropic.Anthropic(base_url=url, api_key="k", max_retries=0) as client,
    ):
        with client.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:  # type: ignore[arg-type]
            assert "".join(stream.text_stream) == TEXT
            message = stream.get_final_message()
        assert message.usage.cache_read_input_tokens == 2000 and message.usage.output_tokens == 42
        assert [m.id for m in client.models.list()] == [MODEL, "qwen3"]
        assert client.models.retrieve("qwen3").id == "qwen3"
        with pytest.raises(anthropic.NotFoundError) as info:
            client.messages.create(model="claude-9", max_tokens=10, messages=ASK)  # type: ignore[arg-type]
        assert info.value.status_code == 404 and "claude-9" in str(info.value)
