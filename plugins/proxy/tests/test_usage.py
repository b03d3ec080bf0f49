"""The proxy asks the upstream for usage the client did not ask for, and takes it back out of the client's bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from streambus.events import EndEvent, Usage

from .conftest import FAKE_KEY, Upstream

pytestmark = pytest.mark.anyio

TEXT = ["Hel", "lo", " wörld", "!"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def openai_answer(include_usage: bool) -> list[bytes]:
    """The events an OpenAI server streams, as documented for ``stream_options.include_usage``:
    every chunk then carries ``"usage":null``, and a last chunk with no choices carries the usage.
    Non-ASCII text is escaped, as OpenAI's JSON is, so a re-encoding would show."""
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini"'
    tail = ',"usage":null}' if include_usage else "}"
    chunks = []
    for i, text in enumerate(TEXT):
        delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
        choice = orjson.dumps({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}).decode()
        chunks.append(head + ',"choices":[' + choice.replace("ö", "\\u00f6") + "]" + tail)
    chunks.append(head + ',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]' + tail)
    if include_usage:
        chunks.append(head + ',"choices":[],"usage":' + orjson.dumps(USAGE).decode() + "}")
    return [b"data: " + c.encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


@pytest.fixture
def fake_openai(scripted: Upstream) -> list[dict[str, Any]]:
    """An OpenAI-like upstream on ``/v1/chat/completions``; returns the request bodies it received."""
    seen: list[dict[str, Any]] = []

    async def answer(request: web.Request, body: Any) -> web.StreamResponse:
        seen.append(body)
        options = body.get("stream_options") or {}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in openai_answer(options.get("include_usage") is True):
            # Split every event across two writes: the client's bytes must not depend on read boundaries.
            await response.write(event[:7])
            await response.write(event[7:])
        await response.write_eof()
        return response

    scripted.by_path["/v1/chat/completions"] = answer
    return seen


REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_the_bus_gets_provider_usage_and_the_client_exactly_its_bytes(
    scripted: Upstream, fake_openai: list[dict[str, Any]], proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http:
            async with http.post(env.url + "/v1/chat/completions", json=REQUEST) as response:
                raw = await response.read()
        client = clients.openai(env.url, api_key=FAKE_KEY)
        chunks = [c async for c in await client.chat.completions.create(**REQUEST)]
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        ends = [env.capture.terminal(stream) for stream in env.capture.streams]
    # What the client gets is what the upstream sends a client that did not ask: byte for byte, [DONE] included.
    assert raw == b"".join(openai_answer(include_usage=False))
    assert raw.endswith(b"data: [DONE]\n\n")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT)
    assert all(c.choices and c.usage is None for c in chunks)
    # The upstream was asked for usage, and the bus has it.
    assert all(body["stream_options"] == {"include_usage": True} for body in fake_openai)
    usage = Usage(**USAGE)
    assert all(isinstance(end, EndEvent) and end.usage == usage and end.reason == "stop" for end in ends)


async def test_a_client_that_asks_for_usage_gets_it_unchanged(
    scripted: Upstream, fake_openai: list[dict[str, Any]], proxy_env: Callable[..., Any], clients: Any
) -> None:
    asked = {**REQUEST, "stream_options": {"include_usage": True}}
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http:
            async with http.post(env.url + "/v1/chat/completions", json=asked) as response:
                raw = await response.read()
        client = clients.openai(env.url, api_key=FAKE_KEY)
        chunks = [c async for c in await client.chat.completions.create(**asked)]
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
    assert raw == b"".join(openai_answer(include_usage=True))
    assert scripted.bodies == [] and fake_openai == [asked, asked]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15


async def test_a_request_that_does_not_stream_is_forwarded_as_sent(
    scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    body = b'{"model": "m", "messages": [], "stream": false}'
    whole = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    scripted.reply.content_type = "application/json"
    scripted.reply.chunks = [orjson.dumps(whole)]
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http:
            headers = {"Content-Type": "application/json"}
            async with http.post(env.url + "/v1/chat/completions", data=body, headers=headers) as response:
                assert await response.json() == whole
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        end = env.capture.terminal()
    assert scripted.bodies == [body]
    assert isinstance(end, EndEvent) and end.usage == Usage(**USAGE)
