"""The official clients pointed at the proxy in front of serve-mock stream exactly the recorded text."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import ollama
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from structlog.testing import capture_logs

from streambus.events import DeltaEvent
from streambus.mockserver import MockServer
from streambus.recording import read_recording

from .conftest import FAKE_KEY, OLLAMA_TEXT, OPENAI_TEXT, Env

pytestmark = pytest.mark.anyio


def _assert_no_key(env: Env, logs: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    assert FAKE_KEY not in env.recorder_path.read_text()
    assert FAKE_KEY not in repr(logs)
    assert FAKE_KEY not in caplog.text
    assert logs, "the proxy logs its requests: the check above must have looked at something"


def _recorded_text(env: Env) -> dict[str, str]:
    texts: dict[str, str] = {}
    for event in read_recording(env.recorder_path).events:
        if isinstance(event, DeltaEvent) and event.channel == "content":
            texts[event.stream] = texts.get(event.stream, "") + event.text
    return texts


async def test_ollama_client_streams_the_recorded_text_while_the_bus_records_it(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with proxy_env(mock.url) as env:
            client = clients.ollama(
                env.url, headers={"Authorization": f"Bearer {FAKE_KEY}", "X-Streambus-Tags": "user=alice, session=s1"}
            )
            parts = [
                part.message.content
                async for part in await client.chat(
                    model="llama3.2", messages=[{"role": "user", "content": "why?"}], stream=True
                )
            ]
            await env.capture.wait_for(lambda c: len(c.ended) == 1)
            (stream,) = env.capture.streams
            start = env.capture.start(stream)
            assert start.model == "llama3.2" and start.provider == "ollama"
            assert start.meta["user"] == "alice" and start.meta["session"] == "s1"
            assert start.meta["tags"] == {"user": "alice", "session": "s1"}
            assert start.meta["client"] == "127.0.0.1" and start.meta["request_id"]
            env.capture.assert_text("".join(OLLAMA_TEXT), stream)
            assert env.capture.end(stream).usage is not None
    # The mock server sent one chunk per delta; the client got them one by one.
    assert [p for p in parts if p] == OLLAMA_TEXT
    assert _recorded_text(env) == {stream: "".join(OLLAMA_TEXT)}
    summary = env.stats.snapshot(streams=False)
    assert summary["overall"]["streams"]["started"] == 1, summary["overall"]
    assert summary["overall"]["chunks"] == len(OLLAMA_TEXT)
    _assert_no_key(env, logs, caplog)


async def test_openai_client_streams_and_the_credential_reaches_only_the_upstream(
    scripted: Any, mock: MockServer, proxy_env: Callable[..., Any], clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with proxy_env(mock.url) as env:
            client = clients.openai(env.url, api_key=FAKE_KEY)
            response = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces = []
            finish = None
            async for chunk in response:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            await env.capture.wait_for(lambda c: len(c.ended) == 1)
            (stream,) = env.capture.streams
            env.capture.assert_text("".join(OPENAI_TEXT), stream)
            end = env.capture.end(stream)
            assert end.reason == "stop" and end.usage is not None and end.usage.completion_tokens == len(OPENAI_TEXT)
    assert "".join(pieces) == "".join(OPENAI_TEXT) and finish == "stop"
    assert _recorded_text(env) == {stream: "".join(OPENAI_TEXT)}
    assert env.stats.snapshot(streams=False)["overall"]["streams"]["started"] == 1
    _assert_no_key(env, logs, caplog)


async def test_authorization_is_forwarded_upstream(scripted: Any, proxy_env: Callable[..., Any], clients: Any) -> None:
    scripted.reply.chunks = [b'{"model":"m","message":{"role":"assistant","content":"ok"},"done":true}\n']
    async with proxy_env(scripted.url) as env:
        client = clients.ollama(env.url, headers={"Authorization": f"Bearer {FAKE_KEY}", "X-Streambus-Tags": "a=b"})
        await client.chat(model="m", messages=[], stream=False)
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
    (headers,) = scripted.headers
    assert headers["Authorization"] == f"Bearer {FAKE_KEY}"
    assert "X-Streambus-Tags" not in headers


async def test_non_streaming_requests_are_one_delta(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url) as env:
        client = clients.openai(env.url, api_key=FAKE_KEY)
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=[])
        assert completion.choices[0].message.content == "".join(OPENAI_TEXT)
        reply = await clients.ollama(env.url).generate(model="llama3.2", prompt="x", stream=False)
        assert reply.response == "".join(OLLAMA_TEXT)
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        first, second = env.capture.streams
        for stream, text in ((first, OPENAI_TEXT), (second, OLLAMA_TEXT)):
            deltas = [e for e in env.capture.of(stream) if isinstance(e, DeltaEvent)]
            assert [d.text for d in deltas] == ["".join(text)]
            assert env.capture.start(stream).meta["streamed"] is False
            assert env.capture.end(stream).usage is not None


async def test_langchain_chat_models_through_the_proxy(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url) as env:
        llm = ChatOllama(model="llama3.2", base_url=env.url)
        ollama_text = "".join([str(chunk.content) async for chunk in llm.astream("why?")])
        await llm._async_client._client.aclose()  # LangChain never closes its client
        async with httpx.AsyncClient() as http:
            chat = ChatOpenAI(
                model="gpt-4o-mini",
                base_url=env.url + "/v1",
                api_key=FAKE_KEY,  # type: ignore[arg-type]
                max_retries=0,
                http_async_client=http,
            )
            openai_text = "".join([str(chunk.content) async for chunk in chat.astream("hi")])
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        assert sorted(env.capture.texts().values()) == sorted(["".join(OLLAMA_TEXT), "".join(OPENAI_TEXT)])
    assert ollama_text == "".join(OLLAMA_TEXT)
    assert openai_text == "".join(OPENAI_TEXT)
    assert sorted(_recorded_text(env).values()) == sorted([ollama_text, openai_text])
    assert env.stats.snapshot(streams=False)["overall"]["streams"]["started"] == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "llama3.2", "messages": []}),
        ("/api/generate", {"model": "llama3.2", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "stream": True}),
        ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "x", "stream": True}),
        ("/api/chat", {"model": "llama3.2", "messages": [], "stream": False}),
        ("/api/chat", {"model": "nope", "messages": []}),
        ("/v1/chat/completions", {"model": "nope", "messages": []}),
    ],
)
async def test_bytes_status_and_headers_are_the_upstreams(
    recording: Any, proxy_env: Callable[..., Any], clients: Any, path: str, body: dict[str, Any]
) -> None:
    # Two identical mock servers, so both answers come from the same recorded stream.
    async with MockServer(recording, burst=True) as direct, MockServer(recording, burst=True) as behind:
        async with proxy_env(behind.url) as env, aiohttp.ClientSession() as http:
            async with http.post(direct.url + path, json=body) as a:
                direct_bytes, direct_status, direct_type = await a.read(), a.status, a.headers["Content-Type"]
            async with http.post(env.url + path, json=body) as b:
                proxied_bytes, proxied_status, proxied_type = await b.read(), b.status, b.headers["Content-Type"]
    assert proxied_status == direct_status
    assert proxied_type == direct_type
    assert proxied_bytes == direct_bytes


@pytest.mark.parametrize("path", ["/api/tags", "/api/version", "/v1/models", "/", "/api/nope?x=1"])
async def test_other_endpoints_pass_through(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any, path: str
) -> None:
    async with proxy_env(mock.url) as env, aiohttp.ClientSession() as http:
        async with http.get(mock.url + path) as a:
            direct = (a.status, await a.read())
        async with http.get(env.url + path) as b:
            proxied = (b.status, await b.read())
        assert env.capture.streams == []
    assert proxied == direct


async def test_bad_tags_header_is_a_400_naming_the_header(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url) as env:
        client = clients.ollama(env.url, headers={"X-Streambus-Tags": "no-equals-sign"})
        with pytest.raises(ollama.ResponseError) as info:
            await client.chat(model="llama3.2", messages=[], stream=False)
        assert info.value.status_code == 400
        assert "X-Streambus-Tags" in info.value.error
        client = clients.ollama(env.url, headers={"X-Streambus-Tags": '{"team": "red", "n": 2}'})
        await client.chat(model="llama3.2", messages=[], stream=False)
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        assert env.capture.start().meta["tags"] == {"team": "red", "n": 2}


async def test_uploads_to_other_endpoints_are_streamed_through(
    scripted: Any, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.chunks = [b"{}"]
    blob = bytes(range(256)) * 4096  # 1 MiB
    async with proxy_env(scripted.url) as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/api/blobs/sha256:abc?x=1", data=blob) as response:
            assert response.status == 200 and await response.read() == b"{}"
        assert env.capture.streams == []
    assert scripted.bodies == [blob]
    assert scripted.headers[0]["Content-Length"] == str(len(blob))
