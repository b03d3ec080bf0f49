"""One connected client: its subscriptions and its bounded outbound buffer.

Frames normally go straight to the socket, written by the sink (under
asyncio, one write per batch of events). Once the socket's write buffer is full, the
client falls behind: frames queue here, and a per-client sender task drains
the queue with backpressure. Once the queue holds ``coalesce_bytes`` (a
quarter of ``client_buffer_bytes``, at most 64 KiB), the buffer counts as
full: a new ``delta`` merges into the client's last queued delta of the same
stream and channel (text concatenated,
``n`` summed, ``first_seq`` kept), so a slow reader gets bigger chunks but
never loses a character. Past ``client_buffer_bytes`` queued, the client is
closed with :attr:`~streambus_websocket.protocol.CloseCode.LAGGED`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from websockets.protocol import OPEN

from streambus import DeltaEvent, Filter, encode

from .protocol import CloseCode, server_text_frame

__all__ = ["Client"]

_FRAME_OVERHEAD = 64
# What the sender writes at once before letting the loop serve others.
_CHUNK_BYTES = 65536


class _Pending:
    """A queued delta that later deltas of the same stream and channel merge into."""

    __slots__ = ("channel", "data", "first_seq", "n", "pieces", "seq", "size", "stream", "ts")

    def __init__(self, delta: DeltaEvent, data: bytes) -> None:
        self.stream = delta.stream
        self.channel = delta.channel
        self.first_seq = delta.seq_range[0]
        self.seq = delta.seq
        self.ts = delta.ts
        self.n = delta.n
        self.pieces = [delta.text]
        self.data: bytes | None = data
        self.size = len(data) + _FRAME_OVERHEAD

    def add(self, delta: DeltaEvent) -> None:
        self.pieces.append(delta.text)
        self.seq = delta.seq
        self.ts = delta.ts
        self.n += delta.n
        self.size += len(delta.text)
        self.data = None

    def encode(self) -> bytes:
        if self.data is not None:
            # Never merged: send the bytes encoded once for every client.
            return self.data
        return encode(
            DeltaEvent(
                stream=self.stream,
                seq=self.seq,
                ts=self.ts,
                text="".join(self.pieces),
                channel=self.channel,
                n=self.n,
                first_seq=self.first_seq,
            )
        )


class Client:
    """State of one connection. Built by the sink; read its counters for monitoring.

    ``ws`` is the ``websockets`` server connection (asyncio or trio flavour).
    """

    def __init__(
        self,
        ws: Any,
        *,
        buffer_bytes: int,
        direct: bool,
        peer: str,
        write_now: Callable[..., None] | None = None,
    ) -> None:
        self.ws = ws
        self.peer = peer
        self.buffer_bytes = buffer_bytes
        self.coalesce_bytes = min(65536, buffer_bytes // 4)
        """Queued bytes from which new deltas merge into queued ones (the buffer counts as full)."""
        self.subscriptions: dict[str | int, Filter] = {}
        self.queue: deque[bytes | _Pending] = deque()
        self.queued_bytes = 0
        self.sending = False
        self.done = False
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self.scope: anyio.CancelScope | None = None
        self.closing = anyio.Event()
        """Set once :meth:`close` was called."""
        self.sent = 0
        """Frames handed to the socket."""
        self.merged = 0
        """Deltas merged into an already queued delta (the client was behind)."""
        self.replayed = 0
        """Bytes of replays (recovery, snapshots) queued on this connection, counted as in ``queued_bytes``."""
        self._tails: dict[str, _Pending] = {}
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        # asyncio only: the transport tells whether a synchronous write is safe.
        self._transport = getattr(ws, "transport", None) if direct else None
        self.write_now = write_now
        """``websockets.asyncio.server.broadcast`` (a synchronous write), or None under trio."""
        self._write_limit = getattr(ws, "write_limit_high", 2**15)

    # -- fan-out side (synchronous: never waits on this client) -------------------
    def writable(self) -> bool:
        """Whether a frame may be written straight to the socket, bypassing the queue."""
        transport = self._transport
        return (
            transport is not None
            and not self.queue
            and not self.sending
            and self.close_code is None
            and transport.get_write_buffer_size() <= self._write_limit
        )

    def push(self, data: bytes) -> None:
        """Queue a frame that must never merge (a control frame)."""
        if self.close_code is not None:
            return
        self.queue.append(data)
        self.queued_bytes += len(data) + _FRAME_OVERHEAD
        self._check()
        self._notify()

    @staticmethod
    def cost(frames: list[bytes]) -> int:
        """What queuing *frames* adds to ``queued_bytes`` (compare it with :attr:`room`)."""
        return sum(map(len, frames)) + _FRAME_OVERHEAD * len(frames)

    @property
    def room(self) -> int:
        """Bytes that may still be queued before the client passes ``client_buffer_bytes``."""
        return self.buffer_bytes - self.queued_bytes

    def push_many(self, frames: list[bytes]) -> None:
        """Queue replayed events (recovery, snapshots): never merged, counted like any queued frame.

        Past ``client_buffer_bytes`` the client is closed as lagged: a replay
        held for a client that does not read costs memory like any backlog
        (frames the history has since dropped stay alive here).
        """
        if self.close_code is not None or not frames:
            return
        self.queue.extend(frames)
        self.queued_bytes += self.cost(frames)
        self._check()
        self._notify()

    def push_event(self, stream: str, event: DeltaEvent | None, data: bytes) -> None:
        """Queue one live event; a delta merges into this client's queued delta when the buffer is full."""
        if self.close_code is not None:
            return
        if event is not None and self.queued_bytes >= self.coalesce_bytes:
            tail = self._tails.get(stream)
            if tail is not None and tail.channel == event.channel:
                tail.add(event)
                self.merged += 1
                self.queued_bytes += len(event.text)
                self._check()
                return
            # Later deltas of this stream and channel merge into this one.
            pending = _Pending(event, data)
            self._tails[stream] = pending
            self.queue.append(pending)
            self.queued_bytes += pending.size
        else:
            # Below the mark (or a control event): queued as encoded, nothing merges into it.
            if self._tails:
                self._tails.pop(stream, None)
            self.queue.append(data)
            self.queued_bytes += len(data) + _FRAME_OVERHEAD
        self._check()
        self._notify()

    def _check(self) -> None:
        if self.queued_bytes > self.buffer_bytes:
            self.close(CloseCode.LAGGED, f"client buffer passed {self.buffer_bytes} bytes")

    def close(self, code: CloseCode, reason: str, *, flush: bool = False) -> None:
        """Have the connection closed with *code*.

        Everything queued is dropped, unless *flush*: then the queued frames
        (answers, error frames) are sent first and nothing new is queued.
        """
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self.closing.set()
        if flush:
            self._notify()
            return
        self.queue.clear()
        self._tails.clear()
        self.queued_bytes = 0
        if self.scope is not None and (self._transport is not None or not self.sending):
            # Under asyncio a cancelled send leaves its frame whole in the transport
            # buffer; under trio a cancelled send_all breaks the stream, so the
            # sender finishes its frame first (bounded by the connection's watchdog).
            self.scope.cancel()
        self._notify()
        self._set_idle()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    # -- sender task ------------------------------------------------------------------
    async def send_loop(self) -> None:
        """Drain the queue to the socket, in order, with backpressure; runs until cancelled."""
        try:
            await self._send_all()
        finally:
            # Whatever stopped the loop (closed socket, cancellation), nobody waits on it any more.
            self.done = True
            self._set_idle()

    async def _send_all(self) -> None:
        ws = self.ws
        queue = self.queue
        transport = self._transport
        write_now = self.write_now
        while True:
            while not queue:
                if self.close_code is not None:
                    return
                self.sending = False
                self._set_idle()
                self._wake = anyio.Event()
                await self._wake.wait()
            self.sending = True
            # send() waits until the socket drains below its high-water mark...
            await ws.send(self._pop(), text=True)
            self.sent += 1
            if self.close_code is not None and not queue:
                return
            # ... then, while it stays below, the backlog goes out a chunk per write
            # (asyncio only: trio has no synchronous write). The kernel may take
            # megabytes without blocking, so the loop serves others between chunks.
            if transport is not None and write_now is not None:
                while queue and transport.get_write_buffer_size() <= self._write_limit:
                    if transport.is_closing():
                        break  # the peer is gone: the next send() says so
                    self._write_chunk(ws, transport, write_now)
                    await anyio.lowlevel.checkpoint()

    def _write_chunk(self, ws: Any, transport: Any, write_now: Callable[..., None]) -> None:
        """Write up to 64 KiB of queued frames with one transport write (asyncio, no extension)."""
        protocol = ws.protocol
        if protocol.extensions or protocol.state is not OPEN:
            # Compressed frames differ per client, and a closing connection is websockets' to handle.
            write_now([ws], self._pop(), text=True)
            self.sent += 1
            return
        queue = self.queue
        frames: list[bytes] = []
        size = 0
        while queue and size < _CHUNK_BYTES:
            data = self._pop()
            frames.append(server_text_frame(data))
            size += len(data)
        # Whatever the protocol queued itself (a pong) goes first; it sends no EOF while OPEN.
        transport.writelines([*protocol.data_to_send(), *frames])
        self.sent += len(frames)

    def _pop(self) -> bytes:
        item = self.queue.popleft()
        if type(item) is _Pending:
            if self._tails.get(item.stream) is item:
                del self._tails[item.stream]
            self.queued_bytes -= item.size
            return item.encode()
        data: bytes = item  # type: ignore[assignment]
        self.queued_bytes -= len(data) + _FRAME_OVERHEAD
        return data

    def _set_idle(self) -> None:
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Wait until everything queued was handed to the socket."""
        while (self.queue or self.sending) and not self.done:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()
