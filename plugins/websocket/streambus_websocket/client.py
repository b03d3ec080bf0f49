"""One connected client: its subscriptions and its bounded outbound queue.

Under asyncio, a client that keeps up gets live frames written at once with
``websockets.asyncio.server.broadcast()`` (the sink groups every such client
of an event in one call). Those writes draw on a *credit* of 32 KiB:
broadcast() does not wait for the socket, so the credit is what bounds the
socket's write buffer (at most the connection's 64 KiB write limit, plus the
credit, plus one frame). Once it is spent, frames queue here and the
per-client sender writes the next one with ``await ws.send()``, which returns
when the buffer is back under ``write_limit``; that restores the credit, and
the sender writes the backlog with ``broadcast([ws], ...)`` while it lasts.
With the backlog written and nothing queued, the client is back on the direct
path for the rest of its credit (:attr:`Client.direct` counts those frames).
Under trio every frame goes through the queue and ``send()``.

The queue is a :class:`streambus.coalesce.Coalescer`: once it holds
``coalesce_bytes`` (a quarter of ``client_buffer_bytes``, at most 64 KiB), a
new ``delta`` merges into the client's last queued delta of the same stream
and channel, so a slow reader gets bigger chunks but never loses a character.
Past ``client_buffer_bytes`` queued, the client is closed with
:attr:`~streambus_websocket.protocol.CloseCode.LAGGED`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from streambus import DeltaEvent, Filter, encode
from streambus.coalesce import Coalescer, MergedDelta
from streambus.tokens import OPERATOR, Scope

from .protocol import CloseCode

__all__ = ["Client"]

_FRAME_OVERHEAD = 64


class Client:
    """State of one connection. Built by the sink; read its counters for monitoring.

    ``ws`` is the ``websockets`` server connection (asyncio or trio flavour).
    With *write_now* (``broadcast``, asyncio), *credit* bytes may be written
    without waiting each time ``send()`` found the socket's buffer under its
    write limit; without it (trio) every frame goes through :meth:`send_loop`.
    *token_scope* is what the client's token covers; every subscription of
    the client is narrowed to it.
    """

    def __init__(
        self,
        ws: Any,
        *,
        buffer_bytes: int,
        peer: str,
        credit: int = 32768,
        write_now: Callable[..., None] | None = None,
        token_scope: Scope = OPERATOR,
    ) -> None:
        self.ws = ws
        self.peer = peer
        self.token_scope = token_scope
        """What this client's token lets it read (:data:`~streambus.tokens.OPERATOR` for a static token or none)."""
        self.buffer_bytes = buffer_bytes
        self.coalesce_bytes = min(65536, buffer_bytes // 4)
        """Queued bytes from which new deltas merge into queued ones (the buffer counts as full)."""
        self.subscriptions: dict[str | int, Filter] = {}
        self.queue: Coalescer[bytes] = Coalescer()
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
        self.direct = 0
        """Of ``sent``, frames written at once by the fan-out (the client kept up), not through the queue."""
        self.merged = 0
        """Deltas merged into an already queued delta (the client was behind)."""
        self.replayed = 0
        """Bytes of replays (recovery, snapshots) queued on this connection, counted as in ``queued_bytes``."""
        self.write_now = write_now
        """``websockets.asyncio.server.broadcast`` (a write that does not wait), or None under trio."""
        self.credit_bytes = credit if write_now is not None else 0
        """What the credit is refilled to each time ``send()`` returns (0 under trio)."""
        self.credit = self.credit_bytes
        """Bytes that may still be written at once (asyncio); 0 sends every frame through the queue."""
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None

    # -- fan-out side (synchronous: never waits on this client) -------------------
    def take(self, size: int) -> bool:
        """Whether a frame of *size* bytes may be written at once (then the credit is spent on it)."""
        # queued_bytes is 0 exactly when nothing is queued (every item counts at least its overhead).
        if self.credit <= 0 or self.queued_bytes or self.sending or self.close_code is not None:
            return False
        self.credit -= size
        self.sent += 1
        self.direct += 1
        return True

    def take_run(self, sizes: list[int]) -> int:
        """How many of the next frames (their *sizes*, in order) may be written at once, as :meth:`take` each.

        The credit is spent on them; the rest must queue (a client's direct
        frames are always a prefix: once one queues, the next ones queue too).
        """
        credit = self.credit
        if credit <= 0 or self.queued_bytes or self.sending or self.close_code is not None:
            return 0
        # Frame k goes while the credit left before it is positive.
        spent = list(itertools.accumulate(sizes))
        count = min(bisect.bisect_left(spent, credit) + 1, len(sizes))
        if count:
            self.credit = credit - spent[count - 1]
            self.sent += count
            self.direct += count
        return count

    def push(self, data: bytes) -> None:
        """Queue a frame that must never merge (a control frame)."""
        if self.close_code is not None:
            return
        self.queue.append(data)
        self.queued_bytes += len(data) + _FRAME_OVERHEAD
        self._check()

    @staticmethod
    def cost(frames: list[bytes]) -> int:
        """What queuing *frames* adds to ``queued_bytes`` (compare it with :attr:`room`)."""
        return sum(map(len, frames)) + _FRAME_OVERHEAD * len(frames)

    @staticmethod
    def cost_of(frames: int, size: int) -> int:
        """:meth:`cost` of *frames* frames of *size* bytes in all, without the frames at hand."""
        return size + _FRAME_OVERHEAD * frames

    @property
    def room(self) -> int:
        """Bytes that may still be queued before the client passes ``client_buffer_bytes``."""
        return self.buffer_bytes - self.queued_bytes

    def push_many(self, frames: list[bytes]) -> None:
        """Queue replayed events (recovery, snapshots): never merged, counted like any queued frame.

        Past ``client_buffer_bytes`` the client is closed as lagged: a replay
        held for a client that does not read costs memory like any backlog.
        """
        if self.close_code is not None or not frames:
            return
        self.queue.extend(frames)
        self.queued_bytes += self.cost(frames)
        self._check()

    def push_event(self, stream: str, event: DeltaEvent | None, data: bytes) -> None:
        """Queue one live event; a delta merges into this client's queued delta when the buffer is full."""
        if self.close_code is not None:
            return
        if event is None:
            self.queue.append(data, stream)
            self.queued_bytes += len(data) + _FRAME_OVERHEAD
        else:
            size = len(data) + _FRAME_OVERHEAD
            if self.queue.add_delta(event, data, merge=self.queued_bytes >= self.coalesce_bytes, size=size) is None:
                self.queued_bytes += size
            else:
                self.merged += 1
                self.queued_bytes += len(event.text)
        self._check()

    def push_deltas(self, stream: str, deltas: list[DeltaEvent], payloads: list[bytes]) -> None:
        """Queue consecutive deltas of *stream* (encoded as *payloads*) as :meth:`push_event` would, in one call."""
        queue = self.queue
        limit = self.buffer_bytes
        for event, data in zip(deltas, payloads, strict=True):
            if self.close_code is not None:
                return
            size = len(data) + _FRAME_OVERHEAD
            if queue.add_delta(event, data, merge=self.queued_bytes >= self.coalesce_bytes, size=size) is None:
                self.queued_bytes += size
            else:
                self.merged += 1
                self.queued_bytes += len(event.text)
            if self.queued_bytes > limit:
                self.close(CloseCode.LAGGED, f"client buffer passed {limit} bytes")
                return
        self._notify()

    def _check(self) -> None:
        if self.queued_bytes > self.buffer_bytes:
            self.close(CloseCode.LAGGED, f"client buffer passed {self.buffer_bytes} bytes")
        else:
            self._notify()

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
        self.queued_bytes = 0
        if self.scope is not None and (self.credit_bytes or not self.sending):
            # Under asyncio a cancelled send leaves its frame whole in the socket's
            # buffer; under trio a cancelled send breaks the stream, so the sender
            # finishes its frame first (bounded by the connection's watchdog).
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
        write = self.write_now
        while True:
            while not queue:
                if self.close_code is not None:
                    return
                self.sending = False
                self._set_idle()
                self._wake = anyio.Event()
                await self._wake.wait()
            self.sending = True
            # Returns once the socket's buffer is under write_limit: the backpressure.
            await ws.send(self._pop(), text=True)
            self.sent += 1
            if self.close_code is not None and not queue:
                return
            if write is not None:
                # The buffer is under write_limit again: the backlog goes out through
                # broadcast() while the credit lasts (one send() per credit,
                # not per frame), then the loop serves others.
                self.credit = self.credit_bytes
                conns = [ws]
                while queue and self.credit > 0 and self.close_code is None:
                    data = self._pop()
                    self.credit -= len(data)
                    write(conns, data, text=True)
                    self.sent += 1
                if not queue:
                    # Nothing in flight and nothing queued: the next events go
                    # out at once from the fan-out (take()) while the credit lasts,
                    # instead of through this queue one frame at a time.
                    self.sending = False
                await anyio.lowlevel.checkpoint()

    def _pop(self) -> bytes:
        item = self.queue.popleft()
        if type(item) is MergedDelta:
            self.queued_bytes -= item.size
            # Never merged: the bytes encoded once for every client.
            return item.payload if item.payload is not None else encode(item.event())
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
