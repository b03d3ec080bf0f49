"""Fixtures: a real aiohttp server on loopback that serves scripted byte streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@pytest.fixture
def anyio_backend() -> str:
    """The producer uses aiohttp, which is asyncio-bound; trio is checked separately."""
    return "asyncio"


@dataclass
class Reply:
    """How the fake upstream answers one request.

    ``chunks`` are written one ``write`` each (with a yield in between, so
    the client usually sees them as separate reads). ``then`` says what
    happens after the last chunk: ``end`` (clean end of body), ``drop``
    (close the connection mid-body) or ``hang`` (keep the connection open,
    sending nothing, until the client goes away).
    """

    chunks: list[bytes] = field(default_factory=list)
    status: int = 200
    content_type: str = "application/x-ndjson"
    then: str = "end"
    body: bytes | None = None


@dataclass
class Upstream:
    """A scripted model server: ``replies`` are used in order (the last one repeats)."""

    url: str = ""
    replies: list[Reply] = field(default_factory=list)
    by_path: dict[str, Callable[[web.Request, Any], Awaitable[web.StreamResponse]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: int = 0
    max_inflight: int = 0

    def reply_for(self, index: int) -> Reply:
        return self.replies[min(index, len(self.replies) - 1)]


async def _handle(upstream: Upstream, request: web.Request) -> web.StreamResponse:
    body = await request.json() if request.can_read_body else {}
    custom = upstream.by_path.get(request.path)
    if custom is not None:
        return await custom(request, body)
    index = len(upstream.requests)
    upstream.requests.append(body)
    upstream.headers.append(dict(request.headers))
    reply = upstream.reply_for(index)
    upstream.inflight += 1
    upstream.max_inflight = max(upstream.max_inflight, upstream.inflight)
    try:
        return await _reply(upstream, request, reply)
    finally:
        upstream.inflight -= 1


async def _reply(upstream: Upstream, request: web.Request, reply: Reply) -> web.StreamResponse:
    if reply.body is not None:
        return web.Response(status=reply.status, body=reply.body, content_type="application/json")
    response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type})
    await response.prepare(request)
    try:
        for chunk in reply.chunks:
            await response.write(chunk)
            await asyncio.sleep(0)
        if reply.then == "drop":
            assert request.transport is not None
            request.transport.close()
            return response
        if reply.then == "hang":
            # Keep the response open; a client that goes away makes writes fail.
            for _ in range(4000):
                await asyncio.sleep(0.005)
                if request.transport is None or request.transport.is_closing():
                    break
                await response.write(b"")
            upstream.disconnected.set()
            return response
        await response.write_eof()
    except ConnectionError:
        upstream.disconnected.set()
    return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """Start the fake upstream on 127.0.0.1 (a free port); its base URL is ``upstream.url``."""
    state = Upstream()
    app = web.Application()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle(state, request)

    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    yield state
    await runner.cleanup()
