"""A small LLM app: the code under test. It knows nothing of streambus's recordings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any


def ask_openai(client: Any, question: str, model: str = "gpt-4o-mini") -> Iterator[str]:
    """Stream an answer with the Chat Completions API."""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def ask_ollama(client: Any, question: str, model: str = "llama3.2") -> Iterator[str]:
    """Stream an answer from Ollama's chat endpoint."""
    for part in client.chat(model=model, messages=[{"role": "user", "content": question}], stream=True):
        if part.message.content:
            yield part.message.content


async def ask_ollama_async(client: Any, question: str, model: str = "llama3.2") -> AsyncIterator[str]:
    """The same, with the async client."""
    async for part in await client.chat(model=model, messages=[{"role": "user", "content": question}], stream=True):
        if part.message.content:
            yield part.message.content
