"""Moderated mode: the client gets only approved text, re-encoded; an abort ends it like a filtering server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from streambus_moderation import KeywordModerator, ModerationStage

from streambus.events import AbortEvent, EndEvent
from streambus.mockserver import MockServer

from .conftest import FAKE_KEY, OLLAMA_TEXT, OPENAI_TEXT

pytestmark = pytest.mark.anyio


def gate(action: str) -> ModerationStage:
    moderator = KeywordModerator(words={"banned": ["forbidden", "rayleigh"]})
    return ModerationStage(moderator=moderator, mode="gate", action=action, window_chars=24, overlap_chars=12)


async def test_openai_abort_ends_with_content_filter(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url, stage=gate("abort")) as env:
        stream = await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[], stream=True
        )
        text, finish = "", None
        async for chunk in stream:  # the official client accepts the filtered end: no exception
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        await env.raw.wait_for(lambda c: len(c.ended) == 1)
        terminal = env.capture.terminal()
        assert isinstance(terminal, AbortEvent) and terminal.by == "moderation"
        assert env.capture.text() == text
    full = "".join(OPENAI_TEXT)
    assert finish == "content_filter"
    assert "forbidden" not in text and full.startswith(text)
    assert env.stats.snapshot(streams=False)["overall"]["aborts"] == {"moderation": 1}


async def test_ollama_abort_ends_with_a_done_object_and_done_reason(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url, stage=gate("abort")) as env:
        parts = [p async for p in await clients.ollama(env.url).chat(model="llama3.2", messages=[], stream=True)]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
    text = "".join(p.message.content or "" for p in parts)
    assert parts[-1].done is True and parts[-1].done_reason == "content_filter"
    assert "Rayleigh" not in text and "".join(OLLAMA_TEXT).startswith(text)


async def test_redaction_reaches_the_client_in_its_wire_format(
    mock: MockServer, proxy_env: Callable[..., Any], clients: Any
) -> None:
    async with proxy_env(mock.url, stage=gate("redact")) as env:
        stream = await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[], stream=True
        )
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        parts = [p async for p in await clients.ollama(env.url).generate(model="llama3.2", prompt="x", stream=True)]
        await env.capture.wait_for(lambda c: len(c.ended) == 2)
        raw_texts = sorted(env.raw.texts().values())
    assert text == "".join(OPENAI_TEXT).replace("forbidden", "[removed]")
    assert "".join(p.response for p in parts) == "".join(OLLAMA_TEXT).replace("Rayleigh", "[removed]")
    assert parts[-1].done_reason == "stop"
    # The recorder behind the proxy sees the moderated stream; a raw sink sees the upstream's.
    assert raw_texts == sorted(["".join(OPENAI_TEXT), "".join(OLLAMA_TEXT)])
    assert "forbidden" not in env.recorder_path.read_text()


async def test_non_streaming_moderated_answers(mock: MockServer, proxy_env: Callable[..., Any], clients: Any) -> None:
    async with proxy_env(mock.url, stage=gate("abort")) as env:
        completion = await clients.openai(env.url, api_key=FAKE_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[]
        )
        assert completion.choices[0].finish_reason == "content_filter"
        assert "forbidden" not in (completion.choices[0].message.content or "")
        reply = await clients.ollama(env.url).chat(model="llama3.2", messages=[], stream=False)
        assert reply.done_reason == "content_filter"
        await env.capture.wait_for(lambda c: len(c.ended) == 2)


async def test_pass_through_can_be_forced_with_a_stage(mock: MockServer, proxy_env: Callable[..., Any]) -> None:
    async with proxy_env(mock.url, stage=gate("redact"), moderated=False) as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as response:
            lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
        await env.capture.wait_for(lambda c: len(c.ended) == 1)
        assert isinstance(env.capture.terminal(), EndEvent)
    assert "".join(line["response"] for line in lines) == "".join(OLLAMA_TEXT)
