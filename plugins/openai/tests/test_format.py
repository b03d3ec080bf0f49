"""OpenAIFormat: byte-exact encoding, round trips through our parser and the official client."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from streambus_openai import (
    DonePiece,
    ErrorPiece,
    FinishPiece,
    OpenAIFormat,
    OpenAIStreamParser,
    TextPiece,
    UsagePiece,
)

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import StreamEncoder, WireFormat, load_format
from streambus.wire import ToolCallFragment, merge_tool_calls, parse_tool_text, tool_text

from .conftest import Upstream

TS = 1_767_225_600.25
USAGE = Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)


def events(*deltas: tuple[str, str], end: Event | None = None, meta: dict[str, Any] | None = None) -> list[Event]:
    out: list[Event] = [StartEvent(stream="s1", seq=0, ts=TS, model="gpt-4o-mini", provider="openai", meta=meta or {})]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream="s1", seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    n = len(out)
    out.append(end or EndEvent(stream="s1", seq=n, ts=TS + n, reason="stop", usage=USAGE))
    return out


CHAT = events(("reasoning", "Hmm."), ("content", "こんにちは"), ("content", " world"))
REQUEST = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True}}


def test_registered_as_openai_format() -> None:
    fmt = load_format("openai")
    assert isinstance(fmt, WireFormat)
    assert fmt.name == "openai"
    assert dict(fmt.routes) == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completions",
        "/v1/responses": "responses",
    }
    assert isinstance(fmt.stream_encoder("/v1/chat/completions", {}), StreamEncoder)


def test_chat_stream_is_byte_exact() -> None:
    body = OpenAIFormat().encode_stream("/v1/chat/completions", REQUEST, CHAT)
    head = b'data: {"id":"chatcmpl-s1","object":"chat.completion.chunk","created":1767225600,"model":"gpt-4o-mini",'
    assert body == (
        head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"reasoning_content":"Hmm."},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"content":"\xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf"},'
        b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
        + head
        + b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_legacy_completions_without_usage_is_byte_exact() -> None:
    evs = events(("content", "Hi"), end=EndEvent(stream="s1", seq=2, ts=TS + 2, reason="length"))
    body = OpenAIFormat().encode_stream("/v1/completions", {"model": "davinci", "stream": True}, evs)
    head = b'data: {"id":"cmpl-s1","object":"text_completion","created":1767225600,"model":"davinci",'
    assert body == (
        head
        + b'"choices":[{"text":"Hi","index":0,"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}]}\n\n'
        b"data: [DONE]\n\n"
    )


def test_choice_index_comes_from_meta() -> None:
    body = OpenAIFormat().encode_stream("chat", {}, events(("content", "b"), meta={"choice": 1, "n": 2}))
    pieces = list(OpenAIStreamParser("chat").feed(body))
    assert TextPiece("b", "content", 1) in pieces
    assert FinishPiece("stop", 1) in pieces


def test_errors_and_aborts_end_without_done() -> None:
    fmt = OpenAIFormat()
    err = events(("content", "a"), end=ErrorEvent(stream="s1", seq=2, ts=TS, kind="timeout", message="slow"))
    body = fmt.encode_stream("chat", {}, err)
    assert body.endswith(b'data: {"error":{"message":"slow","type":"server_error","param":null,"code":"timeout"}}\n\n')
    ab = events(end=AbortEvent(stream="s1", seq=1, ts=TS, reason="x", by="client"))
    assert b"[DONE]" not in fmt.encode_stream("chat", {}, ab)
    assert fmt.assemble("chat", {}, err)["error"]["code"] == "timeout"
    pieces = list(OpenAIStreamParser("chat").feed(body))
    assert pieces[-1] == ErrorPiece(message="slow", type="server_error", code="timeout")


def test_tool_deltas_become_tool_call_chunks() -> None:
    first = tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments=""))
    rest = tool_text(ToolCallFragment(index=0, arguments='{"city":"Paris"}'))
    evs = events(("tool", first), ("tool", rest), end=EndEvent(stream="s1", seq=3, ts=TS, reason="tool_calls"))
    body = OpenAIFormat().encode_stream("chat", {}, evs)
    chunk = orjson.loads(body.split(b"\n\n")[1][len(b"data: ") :])
    assert chunk["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    ]
    pieces = list(OpenAIStreamParser("chat").feed(body))
    fragments = [f for p in pieces if isinstance(p, TextPiece) for f in parse_tool_text(p.text)]
    (call,) = merge_tool_calls(fragments)
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", '{"city":"Paris"}')


def test_bodies() -> None:
    fmt = OpenAIFormat()
    assert not fmt.is_streaming("/v1/chat/completions", {})
    assert fmt.is_streaming("/v1/chat/completions", {"stream": True})
    assert fmt.error_body(404, "The model `x` does not exist")["error"]["code"] == "model_not_found"
    assert fmt.error_body(503, "busy")["error"]["type"] == "server_error"
    assert fmt.models_body(["a"])["data"] == [{"id": "a", "object": "model", "created": 0, "owned_by": "streambus"}]
    with pytest.raises(ValueError, match="/v1/chat/completions"):
        fmt.stream_encoder("/api/chat", {})


channels = st.sampled_from(["content", "reasoning"])
texts = st.text(min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    deltas=st.lists(st.tuples(channels, texts), max_size=12),
    usage=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_round_trip_through_our_parser(deltas: list[tuple[str, str]], usage: bool, cuts: list[int]) -> None:
    """Encode events, cut the bytes anywhere, parse: the same texts per channel and the same end."""
    request = {"stream_options": {"include_usage": usage}}
    body = OpenAIFormat().encode_stream("chat", request, events(*deltas))
    points = sorted({c % (len(body) + 1) for c in cuts})
    parser = OpenAIStreamParser("chat")
    pieces: list[Any] = []
    for a, b in zip([0, *points], [*points, len(body)], strict=True):
        pieces.extend(parser.feed(body[a:b]))
    pieces.extend(parser.close())
    assert parser.done
    assert [(p.channel, p.text) for p in pieces if isinstance(p, TextPiece)] == list(deltas)
    tail = [FinishPiece("stop", 0), *([UsagePiece(USAGE)] if usage else []), DonePiece()]
    assert pieces[-len(tail) :] == tail


async def _serve_format(upstream: Upstream, evs: list[Event]) -> None:
    fmt = OpenAIFormat()

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        if body.get("model") == "missing":
            return web.json_response(fmt.error_body(404, "The model `missing` does not exist"), status=404)
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

    async def models(request: web.Request, body: Any) -> web.StreamResponse:
        return web.json_response(fmt.models_body(["gpt-4o-mini"]))

    upstream.by_path.update({"/v1/chat/completions": answer, "/v1/completions": answer, "/v1/models": models})


@pytest.mark.anyio
async def test_official_client_reads_the_encoded_streams(upstream: Upstream) -> None:
    tool = tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments='{"city":"Paris"}'))
    evs = [
        *CHAT[:-1],
        DeltaEvent(stream="s1", seq=4, ts=TS + 4, text=tool, channel="tool"),
        EndEvent(stream="s1", seq=5, ts=TS + 5, reason="tool_calls", usage=USAGE),
    ]
    await _serve_format(upstream, evs)
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="test", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "こんにちは world"
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        assert reasoning == "Hmm."
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert [(t.id, t.function.name, t.function.arguments) for t in calls] == [  # type: ignore[union-attr]
            ("call_1", "get_weather", '{"city":"Paris"}')
        ]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12

        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == "こんにちは world"
        assert whole.choices[0].finish_reason == "tool_calls"
        assert whole.usage is not None and whole.usage.prompt_tokens == 9

        legacy = await client.completions.create(model="gpt-4o-mini", prompt="hi", stream=True)
        assert "".join([c.choices[0].text async for c in legacy if c.choices]) == "こんにちは world"

        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "model_not_found"
        assert [m.id async for m in client.models.list()] == ["gpt-4o-mini"]


@pytest.mark.anyio
async def test_official_client_raises_on_an_encoded_error(upstream: Upstream) -> None:
    evs = events(
        ("content", "partial"), end=ErrorEvent(stream="s1", seq=2, ts=TS, kind="upstream_error", message="GPU")
    )
    await _serve_format(upstream, evs)
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="test", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError, match="GPU"):
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
        assert "".join(seen) == "partial"


def test_usage_details_round_trip_through_our_parser() -> None:
    """Cached and reasoning counts reach the client as OpenAI's details objects and come back."""
    usage = Usage(
        prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920, reasoning_tokens=256
    )
    evs = events(("content", "hi"), end=EndEvent(stream="s1", seq=2, ts=TS, reason="stop", usage=usage))
    body = OpenAIFormat().encode_stream("chat", REQUEST, evs)
    assert b'"prompt_tokens_details":{"cached_tokens":1920}' in body
    assert b'"completion_tokens_details":{"reasoning_tokens":256}' in body
    parser = OpenAIStreamParser("chat")
    (got,) = [p.usage for p in [*parser.feed(body), *parser.close()] if isinstance(p, UsagePiece)]
    assert got == usage
