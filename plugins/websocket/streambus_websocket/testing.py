"""Test helpers for code that uses the broadcaster: a running bus + sink, and real clients.

::

    from streambus_websocket.testing import connect, running

    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id="all")
        ...

``connect`` uses the ``websockets`` implementation of the running backend
(asyncio or trio), so the same test runs under both.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import sniffio
from websockets.exceptions import ConnectionClosed

from streambus import Bus

from .server import WebSocketSink

__all__ = ["Peer", "connect", "publish_text", "running"]

_json = msgspec.json.Decoder()


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[Bus, WebSocketSink]]:
    """A bus with a broadcaster listening on a free loopback port."""
    token = options.pop("token", None)
    options.setdefault("port", 0)
    async with Bus() as bus:
        sink = WebSocketSink(token=token, **options)
        bus.add_sink(sink, name="websocket")
        with anyio.fail_after(10):
            await sink.wait_ready()
        yield bus, sink
        await bus.shutdown()


class Peer:
    """A real WebSocket client (the websockets implementation of the running backend)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        """Send a frame: a dict is encoded as JSON, text and bytes go as they are."""
        data = message if isinstance(message, str | bytes) else msgspec.json.encode(message).decode()
        await self.ws.send(data)

    async def frame(self, within: float = 10) -> dict[str, Any]:
        """Receive the next frame as a dict; fail if none comes *within* seconds."""
        with anyio.fail_after(within):
            data = await self.ws.recv()
        decoded: dict[str, Any] = _json.decode(data)
        return decoded

    async def expect(self, op: str) -> dict[str, Any]:
        """Receive the next frame and assert it is the control frame *op*."""
        msg = await self.frame()
        assert msg.get("op") == op, msg
        return msg

    async def subscribe(self, **fields: Any) -> dict[str, Any]:
        """Send ``subscribe`` with *fields*; return the server's ``subscribed`` reply."""
        await self.send({"op": "subscribe", **fields})
        return await self.expect("subscribed")

    async def events_until_end(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Read frames until the terminal event of *stream* (or of the first stream seen)."""
        out: list[dict[str, Any]] = []
        while True:
            msg = await self.frame()
            assert "op" not in msg, msg
            out.append(msg)
            if stream is None:
                stream = msg["stream"]
            if msg["stream"] == stream and msg["type"] in ("end", "error", "abort"):
                return out

    async def closed(self, within: float = 10) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; return the close code and the frames read before it."""
        frames: list[dict[str, Any]] = []
        with anyio.fail_after(within):
            try:
                while True:
                    frames.append(_json.decode(await self.ws.recv()))
            except ConnectionClosed as exc:
                return (exc.rcvd.code if exc.rcvd is not None else None), frames


@asynccontextmanager
async def connect(url: str, *, rcvbuf: int | None = None, hello: bool = True, **kwargs: Any) -> AsyncIterator[Peer]:
    """Connect a client to *url*; *rcvbuf* shrinks its socket buffer (to stall it quickly)."""
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("max_size", None)
    sock = None
    if rcvbuf is not None:
        host, port = url.split("/")[2].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, int(port)))
        sock.setblocking(False)
    if sniffio.current_async_library() == "trio":
        import trio
        from websockets.trio.client import connect as trio_connect

        if sock is not None:
            kwargs["stream"] = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with trio_connect(url, **kwargs) as ws:
            peer = Peer(ws)
            if hello:
                await peer.expect("hello")
            yield peer
    else:
        from websockets.asyncio.client import connect as asyncio_connect

        if sock is not None:
            kwargs["sock"] = sock
        async with asyncio_connect(url, **kwargs) as ws:
            peer = Peer(ws)
            if hello:
                await peer.expect("hello")
            yield peer


async def publish_text(bus: Bus, pieces: list[str], **stream: Any) -> str:
    """Publish one stream with *pieces* as deltas; return its id."""
    async with bus.stream(**stream) as writer:
        for piece in pieces:
            await writer.delta(piece)
    return writer.stream
