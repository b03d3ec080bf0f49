"""Failures: unreachable upstream, error status, a cut mid-stream, a client that leaves, a silent upstream."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import anyio
import ollama
import openai
import pytest
from streambus_moderation import KeywordModerator, ModerationStage
from streambus_proxy import ProxyError

from streambus.events import AbortEvent, EndEvent, ErrorEvent
from streambus.mockserver import MockServer
from streambus.producing import RetryPolicy
from streambus.testing import Reply

from .conftest import FAKE_KEY, Upstream

pytestmark = pytest.mark.anyio

LINE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"%s"},"done":false}\n'


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_upstream_is_a_502_in_the_providers_shape(
    proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(f"http://127.0.0.1:{_closed_port()}", connect_timeout=2) as env:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="llama3.2", messages=[], stream=True):
                pass
        assert info.value.status_code == 502 and "unreachable" in info.value.error
        with pytest.raises(openai.InternalServerError) as err:
            await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
                model="gpt-4o-mini", messages=[], stream=True
            )
        assert err.value.status_code == 502
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        for stream in env.capture.streams:
            terminal = env.capture.terminal(stream)
            assert isinstance(terminal, ErrorEvent) and terminal.kind == "connect" and terminal.retryable
        async with aiohttp.ClientSession() as http, http.get(env.url + "/api/tags") as response:
            assert response.status == 502


async def test_upstream_error_status_and_body_reach_the_client(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url) as env:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="missing", messages=[], stream=True):
                pass
        assert info.value.status_code == 404 and info.value.error == "model 'missing' not found"
        with pytest.raises(openai.NotFoundError) as err:
            await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
                model="missing", messages=[], stream=True
            )
        assert err.value.code == "model_not_found"
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        for stream in env.capture.streams:
            terminal = env.capture.terminal(stream)
            assert isinstance(terminal, ErrorEvent) and terminal.kind == "model_not_found"
            assert "404" in terminal.message


async def test_upstream_5xx_is_forwarded_and_retryable(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.status = 503
    scripted.reply.content_type = "application/json"
    scripted.reply.chunks = [b'{"error":"server busy"}']
    async with proxy_env(scripted.url) as env:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                pass
        assert info.value.status_code == 503 and info.value.error == "server busy"
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "http_status" and terminal.retryable


async def test_upstream_cut_mid_stream_ends_the_client_stream_with_an_error(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.chunks = [LINE % b"Hel", LINE % b"lo"]
    scripted.reply.then = "drop"
    async with proxy_env(scripted.url) as env:
        seen: list[str] = []
        with pytest.raises(ollama.ResponseError) as info:
            async for part in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                seen.append(part.message.content or "")
        assert seen == ["Hel", "lo"]
        assert "upstream" in info.value.error
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        env.capture.assert_text("Hello")
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "truncated" and terminal.retryable


async def test_openai_cut_mid_stream(scripted: Upstream, proxy_env: Callable[..., Any], clients: Any) -> None:
    chunk = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    )
    scripted.reply.chunks = [chunk]
    scripted.reply.content_type = "text/event-stream"
    scripted.reply.then = "drop"
    async with proxy_env(scripted.url) as env:
        stream = await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
            model="m", messages=[], stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError):
            async for part in stream:
                seen.append(part.choices[0].delta.content or "")
        assert seen == ["Hi"]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "truncated"


@pytest.mark.parametrize("moderated", [False, True])
async def test_client_disconnect_cancels_the_upstream_request_and_aborts_by_client(
    scripted: Upstream, proxy_env: Callable[..., Any], moderated: bool
) -> None:
    scripted.reply.chunks = [LINE % b"Hel", LINE % b"lo there, a long enough text to pass the gate"]
    scripted.reply.then = "hang"
    stage = ModerationStage(moderator=KeywordModerator(words={"x": ["zzz"]}), window_chars=16) if moderated else None
    async with proxy_env(scripted.url, stage=stage) as env:
        async with aiohttp.ClientSession() as http:
            response = await http.post(env.url + "/api/chat", json={"model": "m", "messages": []})
            assert b"Hel" in await response.content.readline()
            response.close()  # the client goes away mid-stream
        with anyio.fail_after(10):
            await scripted.disconnected.wait()  # the proxy closed its upstream request
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, AbortEvent) and terminal.by == "client"
        assert env.raw.text().startswith("Hello there")


async def test_silent_upstream_never_hangs_the_client(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.chunks = [LINE % b"Hel"]
    scripted.reply.then = "hang"
    async with proxy_env(scripted.url, read_timeout=0.3) as env:
        with anyio.fail_after(10), pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                pass
        assert "read_timeout" in info.value.error
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "timeout"


async def test_malformed_upstream_bytes_still_reach_the_client(
    scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    scripted.reply.chunks = [LINE % b"ok", b"not json\n", b'{"done":true}\n']
    async with proxy_env(scripted.url) as env:
        async with aiohttp.ClientSession() as http, http.post(env.url + "/api/chat", json={"model": "m"}) as response:
            body = await response.read()
        assert body == b"".join(scripted.reply.chunks)
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "malformed"
        assert "JSON" in terminal.message or "json" in terminal.message


async def test_non_json_request_body_is_passed_through_unpublished(
    mock: MockServer, proxy_env: Callable[..., Any]
) -> None:
    async with proxy_env(mock.url) as env, aiohttp.ClientSession() as http:
        async with http.post(mock.url + "/api/chat", data=b"{nope") as a:
            direct = (a.status, await a.read())
        async with http.post(env.url + "/api/chat", data=b"{nope") as b:
            proxied = (b.status, await b.read())
        assert proxied == direct and proxied[0] == 400
        assert env.capture.streams == []


@pytest.mark.parametrize("moderated", [False, True])
async def test_client_leaving_before_the_upstream_answers_cancels_the_request(
    scripted: Upstream, proxy_env: Callable[..., Any], moderated: bool
) -> None:
    scripted.reply.stall_headers = True
    stage = ModerationStage(moderator=KeywordModerator(words={"x": ["zzz"]})) if moderated else None
    async with proxy_env(scripted.url, stage=stage) as env:
        async with aiohttp.ClientSession() as http:
            request = asyncio.ensure_future(http.post(env.url + "/api/chat", json={"model": "m"}))
            with anyio.fail_after(10):
                await scripted.arrived.wait()
            request.cancel()  # the client gives up while the model is still loading
            with pytest.raises(asyncio.CancelledError):
                await request
        with anyio.fail_after(10):
            await scripted.disconnected.wait()
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, AbortEvent) and terminal.by == "client"


async def test_stream_id_header_names_the_bus_stream(mock: MockServer, proxy_env: Callable[..., Any]) -> None:
    async with proxy_env(mock.url) as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/api/chat", json={"model": "llama3.2"}) as response:
            await response.read()
            stream = response.headers["X-Streambus-Stream"]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        assert env.capture.streams == [stream]


async def test_credentials_in_the_upstream_url_become_a_header_and_are_never_recorded(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import base64
    import logging

    from structlog.testing import capture_logs

    caplog.set_level(logging.DEBUG)
    scripted.reply.chunks = [LINE % b"ok", b'{"message":{"role":"assistant","content":""},"done":true}\n']
    secret_url = scripted.url.replace("http://", f"http://user:{FAKE_KEY}@")
    dead_url = f"http://user:{FAKE_KEY}@127.0.0.1:{_closed_port()}"
    with capture_logs() as logs:
        async with proxy_env(secret_url) as env:
            async for _ in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                pass
            await env.capture.wait_for(lambda c: len(c.ended) == 1)
        async with proxy_env(dead_url) as env2:
            with pytest.raises(ollama.ResponseError) as info:
                async for _ in await clients.ollama(env2.url).chat(model="m", messages=[], stream=True):
                    pass
            await env2.capture.wait_for(lambda c: len(c.ended) == 1)
    expected = "Basic " + base64.b64encode(f"user:{FAKE_KEY}".encode()).decode()
    assert scripted.headers[0]["Authorization"] == expected
    assert FAKE_KEY not in info.value.error
    for seen in (repr(env.capture.of()), repr(env2.capture.of()), repr(logs), caplog.text):
        assert FAKE_KEY not in seen
    assert FAKE_KEY not in env.recorder_path.read_text()
    assert env.capture.start().meta["upstream"] == scripted.url


async def test_stream_id_header_on_failures_and_moderated_answers(
    mock: MockServer, proxy_env: Callable[..., Any]
) -> None:
    stage = ModerationStage(moderator=KeywordModerator(words={"x": ["zzz"]}))
    async with proxy_env(mock.url, stage=stage) as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/api/chat", json={"model": "llama3.2", "stream": False}) as response:
            assert response.status == 200
            moderated = response.headers["X-Streambus-Stream"]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        assert env.capture.streams == [moderated]
    async with proxy_env(f"http://127.0.0.1:{_closed_port()}") as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/api/chat", json={"model": "llama3.2"}) as response:
            assert response.status == 502
            failed = response.headers["X-Streambus-Stream"]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        assert env.capture.streams == [failed]


DONE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done":true}\n'


async def _no_sleep(seconds: float) -> None:
    """The retry policy's sleep in these tests: the wait is recorded in ``policy.waits``, not slept."""


async def test_a_busy_upstream_is_tried_again_as_it_asks_before_the_client_sees_it(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    """429 with Retry-After, then 503 with an HTTP date, then the answer: the client gets only the answer."""
    scripted.replies = [
        Reply(status=429, body=b'{"error":"slow down"}', headers={"Retry-After": "1"}),
        Reply(status=503, body=b'{"error":"busy"}', headers={"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}),
        Reply(chunks=[LINE % b"Hel", LINE % b"lo", DONE]),
    ]
    policy = RetryPolicy(retries=2, backoff=0.5, max_wait=10.0, sleep=_no_sleep)
    async with proxy_env(scripted.url, retry=policy) as env:
        seen = [
            part.message.content or ""
            async for part in await clients.ollama(env.url).chat(model="m", messages=[], stream=True)
        ]
        assert "".join(seen) == "Hello"
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        env.capture.assert_text("Hello")
        assert isinstance(env.capture.terminal(), EndEvent)
    assert list(policy.waits) == [1.0, 0.0]  # exactly what the upstream asked, no backoff of our own on top
    assert len(scripted.requests) == 3


async def test_a_refusal_that_outlasts_the_retries_reaches_the_client(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.status = 429
    scripted.reply.body = b'{"error":"slow down"}'
    policy = RetryPolicy(retries=2, backoff=0.5, max_wait=10.0, sleep=_no_sleep)
    async with proxy_env(scripted.url, retry=policy) as env:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                pass
        assert info.value.status_code == 429 and info.value.error == "slow down"
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "http_status" and terminal.retryable
    assert len(scripted.requests) == 3
    waits = list(policy.waits)
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 1.5  # exponential, with up to one backoff of jitter


async def test_a_retry_after_beyond_the_limit_is_passed_on_at_once(
    scripted: Upstream, proxy_env: Callable[..., Any], clients: Any
) -> None:
    scripted.reply.status = 503
    scripted.reply.body = b'{"error":"down for maintenance"}'
    scripted.reply.headers = {"Retry-After": "3600"}
    policy = RetryPolicy(retries=2, backoff=0.5, max_wait=10.0, sleep=_no_sleep)
    async with proxy_env(scripted.url, retry=policy) as env:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await clients.ollama(env.url).chat(model="m", messages=[], stream=True):
                pass
        assert info.value.status_code == 503
    assert list(policy.waits) == []
    assert len(scripted.requests) == 1


def test_bad_retry_options_are_named() -> None:
    from streambus_proxy import Proxy

    from streambus import Bus

    with pytest.raises(ProxyError, match="retries: must be at least 0, got -1"):
        Proxy(Bus(), "http://127.0.0.1:1", retries=-1)
    with pytest.raises(ProxyError, match="retry_max_wait: must be at least 0 and finite, got nan"):
        Proxy(Bus(), "http://127.0.0.1:1", retry_max_wait=float("nan"))
