"""The sample project's tests: recorded through the proxy the first time, replayed after."""

from __future__ import annotations

import pytest
from app import ask_ollama, ask_ollama_async, ask_openai

ENGLISH = "The sky is blue because air scatters short blue light more than red."
JAPANESE = "空が青いのは、空気が青い光をより強く散乱するからです。"
HELLO = "Hello! How can I help you today?"


def test_openai_chat(streambus_recording):
    chunks = list(ask_openai(streambus_recording.openai(), "Say hello"))
    assert "".join(chunks) == HELLO
    assert len(chunks) == 9  # the upstream's chunking survives


def test_ollama_two_questions(streambus_recording):
    client = streambus_recording.ollama()
    assert "".join(ask_ollama(client, "Why is the sky blue?")) == ENGLISH
    assert "".join(ask_ollama(client, "Why is the sky blue? In Japanese.")) == JAPANESE


@pytest.mark.anyio
async def test_async_ollama(streambus_recording):
    async with streambus_recording.async_ollama() as client:
        chunks = [c async for c in ask_ollama_async(client, "Why is the sky blue?")]
    assert "".join(chunks) in (ENGLISH, JAPANESE)
    assert len(chunks) == 14


def test_langchain_chat_model(streambus_recording):
    langchain_openai = pytest.importorskip("langchain_openai")
    model = langchain_openai.ChatOpenAI(
        model="gpt-4o-mini",
        base_url=streambus_recording.openai_url,
        api_key=streambus_recording.api_key(),
        max_retries=0,
    )
    assert "".join(chunk.content for chunk in model.stream("Say hello")) == HELLO


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_through_the_streambus_proxy(streambus_recording, anyio_backend):
    """The app's own proxy in front of the recording: the bus sees the stream the app streamed."""
    ollama = pytest.importorskip("ollama")
    from aiohttp import web
    from streambus_proxy import create_app

    from streambus import Bus
    from streambus.testing import EventCapture

    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        runner = web.AppRunner(create_app(bus, streambus_recording.url))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with ollama.AsyncClient(host=f"http://127.0.0.1:{port}") as client:
                text = "".join([c async for c in ask_ollama_async(client, "Through the proxy?")])
        finally:
            await runner.cleanup()
    assert text in (ENGLISH, JAPANESE)
    assert capture.text() == text
