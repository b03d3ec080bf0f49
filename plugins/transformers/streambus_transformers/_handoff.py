"""A bounded handoff of text from the ``generate`` worker thread to the event loop.

The worker thread appends under a :class:`threading.Condition` and blocks
(without spinning) while ``capacity`` pieces are waiting, so a stalled bus
slows generation down instead of growing a queue. The event loop takes
everything waiting in one batch, and sleeps on an :class:`anyio.Event` when
nothing is: the worker wakes it with one ``from_thread.run_sync`` call only
when the loop is actually asleep, so a busy loop costs the worker nothing but
a lock per piece.
"""

from __future__ import annotations

import threading
from collections import deque

import anyio
import anyio.from_thread

__all__ = ["Handoff"]


class Handoff:
    """A bounded, thread-safe handoff of strings: one worker thread puts, one task takes."""

    __slots__ = ("_cancelled", "_closed", "_cond", "_items", "_waiter", "capacity")

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._items: deque[str] = deque()
        self._closed = False
        self._cancelled = False
        self._waiter: anyio.Event | None = None

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
            anyio.from_thread.run_sync(waiter.set)
        return True

    def close(self) -> None:
        """Tell the reader nothing more will come (worker thread only)."""
        with self._cond:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            anyio.from_thread.run_sync(waiter.set)

    # -- event loop side ---------------------------------------------------------
    async def take(self) -> list[str] | None:
        """Return every waiting piece (at least one), or None after :meth:`close`."""
        while True:
            with self._cond:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    self._cond.notify_all()
                    return batch
                if self._closed:
                    return None
                waiter = self._waiter = anyio.Event()
            await waiter.wait()

    def cancel(self) -> None:
        """Drop what is waiting and release a worker blocked in :meth:`put`."""
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._waiter = None
            self._cond.notify_all()
