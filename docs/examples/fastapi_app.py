"""FastAPI serving bus streams in every format (see docs/frontends.md).

Run it with ``uvicorn docs.examples.fastapi_app:app`` (or ``python
docs/examples/fastapi_app.py``). ``echo`` stands in for a real producer
(Ollama, OpenAI ...): it streams the prompt back word by word.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from streambus_http import StreamHub
from streambus_http.asgi import EventStreamResponse

from streambus import Bus, Filter, StreamWriter, new_stream_id

DELAY = float(os.environ.get("ECHO_DELAY", "0.02"))


async def echo(writer: StreamWriter, prompt: str) -> None:
    """A stand-in model: think briefly, then answer with the prompt, word by word."""
    await writer.delta("Echoing the prompt.", channel="reasoning")
    for word in f"You said: {prompt}".split(" "):
        await writer.delta(word + " ")
        await anyio.sleep(DELAY)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with Bus() as bus:
        app.state.bus = bus
        app.state.hub = StreamHub.attach(bus)  # one subscription + history for every response
        yield
        await bus.shutdown()


app = FastAPI(lifespan=lifespan)


def start_stream(request: Request, prompt: str, **meta: Any) -> str:
    """Start a generation on the bus and return its stream id (the response follows it)."""
    bus: Bus = request.app.state.bus
    stream_id = new_stream_id()

    async def produce() -> None:
        async with bus.stream(model="echo", provider="example", meta=meta, stream=stream_id) as writer:
            await echo(writer, prompt)

    bus.start_soon(produce)
    return stream_id


@app.post("/generate")
async def generate(request: Request) -> dict[str, str]:
    body = await request.json()
    return {"stream": start_stream(request, body["prompt"])}


# One line per format: the hub resolves the stream, Last-Event-ID and disconnects.
@app.get("/streams/{stream_id}/events")
async def sse(stream_id: str, request: Request) -> EventStreamResponse:
    return EventStreamResponse(request.app.state.hub, "sse", stream=stream_id)


@app.get("/streams/{stream_id}/text")
async def text(stream_id: str, request: Request) -> EventStreamResponse:
    return EventStreamResponse(request.app.state.hub, "text", stream=stream_id)


@app.get("/streams/{stream_id}/ndjson")
async def ndjson(stream_id: str, request: Request) -> EventStreamResponse:
    return EventStreamResponse(request.app.state.hub, "ndjson", stream=stream_id)


@app.get("/events")
async def all_events(request: Request, model: str | None = None) -> EventStreamResponse:
    """Every stream (or one model's) as SSE: a dashboard's feed."""
    return EventStreamResponse(request.app.state.hub, "sse", filter=Filter.of(models=model))


@app.post("/api/chat")
async def chat(request: Request) -> EventStreamResponse:
    """The endpoint the Vercel AI SDK's ``useChat`` posts to."""
    body = await request.json()
    last = body["messages"][-1]
    prompt = "".join(part.get("text", "") for part in last.get("parts", []) if part.get("type") == "text")
    stream_id = start_stream(request, prompt, chat=body.get("id", ""))
    return EventStreamResponse(request.app.state.hub, "ui", stream=stream_id)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> EventStreamResponse:
    """OpenAI-compatible: any OpenAI client streams the echo."""
    body = await request.json()
    prompt = str(body["messages"][-1]["content"])
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    stream_id = start_stream(request, prompt)
    return EventStreamResponse(request.app.state.hub, "openai", stream=stream_id, include_usage=include_usage)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
