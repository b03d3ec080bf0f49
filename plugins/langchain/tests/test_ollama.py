"""A real ``langchain_ollama.ChatOllama`` against ``streambus serve-mock`` (the pytest fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from streambus_langchain import BusCallbackHandler, ChatModelProducer

from streambus import Bus, Usage
from streambus.testing import EventCapture
from streambus.wire import merge_tool_calls, parse_tool_text

langchain_ollama = pytest.importorskip("langchain_ollama", reason="pip install langchain-ollama")

pytestmark = pytest.mark.anyio


@pytest.fixture
async def chat_ollama(recording: Path, mock_model_server: Callable[..., Any]) -> AsyncIterator[Any]:
    """Return ``make(**kwargs) -> ChatOllama`` talking to serve-mock; closes the models' HTTP clients after."""
    server = mock_model_server(recording)
    models: list[Any] = []

    def make(**kwargs: Any) -> Any:
        model = langchain_ollama.ChatOllama(model="llama3", base_url=server.url, **kwargs)
        models.append(model)
        return model

    make.server = server  # type: ignore[attr-defined]
    yield make
    for model in models:
        # ChatOllama never closes its ollama.AsyncClient; its sockets would outlive the loop.
        await model._async_client._client.aclose()


async def test_chat_ollama_through_the_producer(chat_ollama: Callable[..., Any]) -> None:
    model = chat_ollama(reasoning=True)
    producer = ChatModelProducer(chat_model=model)
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        first = await producer.generate(bus, [("user", "hi")])
        second = await producer.generate(bus, [("user", "weather in Oslo?")])
    start = capture.start(first)
    assert (start.model, start.provider) == ("llama3", "ollama")
    capture.assert_text("Hello there, friend!", first)
    end = capture.end(first)
    assert end.reason == "stop"
    assert end.usage == Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
    assert capture.text(second, "reasoning") == "thinking..."
    capture.assert_text("Checking the weather.", second)
    (call,) = merge_tool_calls(parse_tool_text(capture.text(second, "tool")))
    assert call.name == "weather"
    assert call.arguments.replace(" ", "") == '{"city":"Oslo"}'
    assert capture.end(second).usage == Usage(prompt_tokens=20, completion_tokens=8, total_tokens=28)
    assert [r.path for r in chat_ollama.server.requests] == ["/api/chat", "/api/chat"]  # type: ignore[attr-defined]


async def test_chat_ollama_runs_reach_the_bus_through_the_callback_handler(chat_ollama: Callable[..., Any]) -> None:
    model = chat_ollama()
    async with Bus() as bus:
        capture = EventCapture().attach(bus)
        handler = BusCallbackHandler(bus, meta={"app": "chat"})
        text = "".join([str(c.content) async for c in model.astream("hi", config={"callbacks": [handler]})])
    assert text == "Hello there, friend!"
    (stream_id,) = handler.stream_ids
    assert capture.start(stream_id).meta["app"] == "chat"
    capture.assert_text("Hello there, friend!", stream_id)
    assert capture.end(stream_id).usage == Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
