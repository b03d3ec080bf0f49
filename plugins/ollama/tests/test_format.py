"""OllamaFormat: byte-exact encoding, round trips through our parser and the official client."""

from __future__ import annotations

from typing import Any

import ollama
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from streambus_ollama import DonePiece, ErrorPiece, OllamaFormat, OllamaStreamParser, TextPiece

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import StreamEncoder, WireFormat, load_format
from streambus.wire import ToolCallFragment, tool_text

from .conftest import Upstream

TS = 1_767_225_600.25  # 2026-01-01T00:00:00.25Z


def events(*deltas: tuple[str, str], end: Event | None = None) -> list[Event]:
    out: list[Event] = [StartEvent(stream="s1", seq=0, ts=TS, model="llama3.2", provider="ollama")]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream="s1", seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    n = len(out)
    out.append(
        end
        or EndEvent(
            stream="s1",
            seq=n,
            ts=TS + n,
            reason="stop",
            usage=Usage(prompt_tokens=26, completion_tokens=3, total_tokens=29),
            timings={
                "total_duration": 4.883583458,
                "load_duration": 0.001334875,
                "prompt_eval_duration": 0.342546,
                "eval_duration": 4.535599,
            },
        )
    )
    return out


CHAT = events(("reasoning", "Hmm."), ("content", "こんにちは"), ("content", " world"))


def test_registered_as_ollama_format() -> None:
    fmt = load_format("ollama")
    assert isinstance(fmt, WireFormat)
    assert fmt.name == "ollama"
    assert dict(fmt.routes) == {"/api/chat": "chat", "/api/generate": "generate"}
    assert isinstance(fmt.stream_encoder("/api/chat", {}), StreamEncoder)


def test_chat_stream_is_byte_exact() -> None:
    body = OllamaFormat().encode_stream("/api/chat", {"model": "llama3.2"}, CHAT)
    assert body == (
        b'{"model":"llama3.2","created_at":"2026-01-01T00:00:01.250000Z","message":{"role":"assistant","content":"",'
        b'"thinking":"Hmm."},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2026-01-01T00:00:02.250000Z","message":{"role":"assistant",'
        b'"content":"\xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf"},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2026-01-01T00:00:03.250000Z","message":{"role":"assistant",'
        b'"content":" world"},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2026-01-01T00:00:04.250000Z","message":{"role":"assistant","content":""},'
        b'"done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,'
        b'"prompt_eval_duration":342546000,"eval_count":3,"eval_duration":4535599000}\n'
    )


def test_generate_stream_is_byte_exact() -> None:
    evs = events(("content", "Hi"), end=EndEvent(stream="s1", seq=2, ts=TS + 2, reason="length"))
    body = OllamaFormat().encode_stream("generate", {"model": "qwen3"}, evs)
    assert body == (
        b'{"model":"qwen3","created_at":"2026-01-01T00:00:01.250000Z","response":"Hi","done":false}\n'
        b'{"model":"qwen3","created_at":"2026-01-01T00:00:02.250000Z","response":"","done_reason":"length","done":true}\n'
    )


def test_error_and_abort_become_error_objects() -> None:
    fmt = OllamaFormat()
    err = events(("content", "a"), end=ErrorEvent(stream="s1", seq=2, ts=TS, kind="upstream_error", message="boom"))
    assert fmt.encode_stream("chat", {}, err).endswith(b'{"error":"boom"}\n')
    ab = events(("content", "a"), end=AbortEvent(stream="s1", seq=2, ts=TS, reason="unsafe", by="moderation"))
    assert fmt.encode_stream("chat", {}, ab).endswith(b'{"error":"stream aborted by moderation: unsafe"}\n')
    assert fmt.assemble("chat", {}, err) == {"error": "boom"}


def test_tool_fragments_are_held_until_the_arguments_are_whole() -> None:
    first = tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments='{"city": "Pa'))
    rest = tool_text(ToolCallFragment(index=0, arguments='ris"}'))
    encoder = OllamaFormat().stream_encoder("/api/chat", {"model": "m"})
    assert encoder.encode(DeltaEvent(stream="s", seq=1, ts=TS, text=first, channel="tool")) == b""
    line = encoder.encode(DeltaEvent(stream="s", seq=2, ts=TS, text=rest, channel="tool"))
    assert orjson.loads(line)["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    pieces = list(OllamaStreamParser("chat").feed(line))
    assert pieces == [
        TextPiece(
            tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments='{"city":"Paris"}')), "tool"
        )
    ]


def test_bad_route_names_the_known_routes() -> None:
    with pytest.raises(ValueError, match="/api/chat"):
        OllamaFormat().stream_encoder("/v1/chat/completions", {})


def test_streaming_default_and_bodies() -> None:
    fmt = OllamaFormat()
    assert fmt.is_streaming("/api/chat", {})
    assert not fmt.is_streaming("/api/chat", {"stream": False})
    assert fmt.error_body(404, 'model "x" not found') == {"error": 'model "x" not found'}
    assert [m["name"] for m in fmt.models_body(["a", "b"])["models"]] == ["a", "b"]


channels = st.sampled_from(["content", "reasoning"])
texts = st.text(min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    deltas=st.lists(st.tuples(channels, texts), max_size=12),
    route=st.sampled_from(["chat", "generate"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_round_trip_through_our_parser(deltas: list[tuple[str, str]], route: str, cuts: list[int]) -> None:
    """Encode events, cut the bytes anywhere, parse: the same texts per channel and the same end."""
    evs = events(*deltas)
    body = OllamaFormat().encode_stream(route, {"model": "m"}, evs)
    points = sorted({c % (len(body) + 1) for c in cuts})
    parser = OllamaStreamParser(route)  # type: ignore[arg-type]
    pieces: list[Any] = []
    for a, b in zip([0, *points], [*points, len(body)], strict=True):
        pieces.extend(parser.feed(body[a:b]))
    pieces.extend(parser.close())
    assert parser.done
    got = [(p.channel, p.text) for p in pieces if isinstance(p, TextPiece)]
    assert got == [(c, t) for c, t in deltas]
    end = evs[-1]
    assert isinstance(end, EndEvent)
    assert pieces[-1] == DonePiece(reason="stop", usage=end.usage, timings=end.timings)
    assert not any(isinstance(p, ErrorPiece) for p in pieces)


async def _serve_format(upstream: Upstream, evs: list[Event]) -> None:
    fmt = OllamaFormat()

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        if body.get("model") == "missing":
            return web.json_response(fmt.error_body(404, 'model "missing" not found, try pulling it first'), status=404)
        if not fmt.is_streaming(request.path, body):
            return web.json_response(fmt.assemble(request.path, body, evs))
        encoder = fmt.stream_encoder(request.path, body)
        response = web.StreamResponse(headers={"Content-Type": encoder.content_type})
        await response.prepare(request)
        for event in evs:
            await response.write(encoder.encode(event))
        await response.write(encoder.close())
        await response.write_eof()
        return response

    async def tags(request: web.Request, body: Any) -> web.StreamResponse:
        return web.json_response(fmt.models_body(["llama3.2", "qwen3"]))

    upstream.by_path.update({"/api/chat": answer, "/api/generate": answer, "/api/tags": tags})


@pytest.mark.anyio
async def test_official_client_reads_the_encoded_chat_stream(upstream: Upstream) -> None:
    tool = tool_text(ToolCallFragment(index=0, name="get_weather", arguments='{"city":"Paris"}'))
    evs = [
        *CHAT[:-1],
        DeltaEvent(stream="s1", seq=4, ts=TS + 4, text=tool, channel="tool"),
        EndEvent(stream="s1", seq=5, ts=TS + 5, reason="stop", usage=Usage(prompt_tokens=26, completion_tokens=3)),
    ]
    await _serve_format(upstream, evs)
    async with ollama.AsyncClient(host=upstream.url) as client:
        await _read_chat(client)


async def _read_chat(client: ollama.AsyncClient) -> None:
    parts = [
        part
        async for part in await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
    ]
    assert "".join(p.message.content or "" for p in parts) == "こんにちは world"
    assert "".join(p.message.thinking or "" for p in parts) == "Hmm."
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    final = parts[-1]
    assert final.done and final.done_reason == "stop"
    assert (final.prompt_eval_count, final.eval_count) == (26, 3)

    whole = await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert whole.message.content == "こんにちは world"
    assert whole.message.thinking == "Hmm."
    assert whole.done_reason == "stop"


@pytest.mark.anyio
async def test_official_client_reads_generate_errors_and_tags(upstream: Upstream) -> None:
    await _serve_format(upstream, CHAT)
    async with ollama.AsyncClient(host=upstream.url) as client:
        await _read_generate(client)


async def _read_generate(client: ollama.AsyncClient) -> None:
    parts = [part async for part in await client.generate(model="llama3.2", prompt="hi", stream=True)]
    assert "".join(p.response for p in parts) == "こんにちは world"
    assert parts[-1].total_duration == 4883583458
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="missing", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert "not found" in info.value.error
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2", "qwen3"]
