"""A bounded handoff of text from the ``generate`` worker thread to the event loop.

The worker thread appends under a :class:`threading.Condition` and blocks
(without spinning) while ``capacity`` pieces are waiting, so a stalled bus
slows generation down instead of growing a queue. The event loop takes
everything waiting in one batch, and sleeps on an :class:`anyio.Event` when
nothing is: the worker wakes it only when the loop is actually asleep, and
without waiting for the loop (``call_soon_threadsafe`` on asyncio,
``TrioToken.run_sync_soon`` on trio), so handing over a piece costs the
worker a lock and, at most, one non-blocking wake-up.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
import sniffio

__all__ = ["Handoff"]


def _soon_threadsafe() -> Callable[[Callable[[], object]], object]:
    """Return a non-blocking, thread-safe "run this on the current event loop soon"."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        return lambda func: loop.call_soon_threadsafe(func)
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    # Another anyio backend: fall back to the blocking round trip.
    token = anyio.lowlevel.current_token()
    return lambda func: anyio.from_thread.run_sync(func, token=token)


class Handoff:
    """A bounded, thread-safe handoff of strings: one worker thread puts, one task takes."""

    __slots__ = ("_cancelled", "_closed", "_cond", "_items", "_soon", "_waiter", "capacity")

    def __init__(self, capacity: int = 64) -> None:
        """Create the handoff inside the event loop that will :meth:`take` from it."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._items: deque[str] = deque()
        self._closed = False
        self._cancelled = False
        self._waiter: anyio.Event | None = None
        self._soon = _soon_threadsafe()

    # -- worker thread side ----------------------------------------------------
    def put(self, text: str) -> bool:
        """Hand *text* over, waiting while the handoff is full (worker thread only).

        Returns False once the reader cancelled: the caller should stop producing.
        """
        with self._cond:
            while len(self._items) >= self.capacity and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                return False
            self._items.append(text)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._soon(waiter.set)
        return True

    def close(self) -> None:
        """Tell the reader nothing more will come (worker thread only)."""
        with self._cond:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._soon(waiter.set)

    # -- event loop side ---------------------------------------------------------
    async def take(self) -> list[str] | None:
        """Return every waiting piece (at least one), or None after :meth:`close`."""
        while True:
            with self._cond:
                batch = list(self._items)
                self._items.clear()
                if batch:
                    self._cond.notify_all()
                closed = self._closed
                waiter = None if batch or closed else anyio.Event()
                self._waiter = waiter
            if waiter is None:
                # Pieces were waiting: still a checkpoint, so a cancellation (an abort)
                # is seen even while the worker keeps the handoff full.
                await anyio.lowlevel.checkpoint()
                return batch or None
            await waiter.wait()

    def cancel(self) -> None:
        """Drop what is waiting and release a worker blocked in :meth:`put`."""
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._waiter = None
            self._cond.notify_all()
