"""One-shot wake-up signals for parked readers and publishers (private).

The bus parks a reader on a signal when it has nothing to read and sets the
signal on the next publish. On trio (and anything else) that is an
:class:`anyio.Event`. On asyncio it is :class:`FutureSignal`: ``wait()``
returns a bare loop future, so a woken reader resumes through no wrapper
coroutine (``anyio.Event.wait`` on asyncio nests ``asyncio.Event.wait``,
whose extra frames and per-wait bookkeeping made the bus's wake-up about
half as costly again as an ``asyncio.Queue`` getter's; see
``docs/decisions.md``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

import anyio

__all__ = ["FutureSignal", "Signal", "new_signal"]


class Signal(Protocol):
    """What the bus needs of a wake-up signal: set once, test, wait."""

    def set(self) -> None:
        """Wake every waiter (idempotent)."""

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""

    def wait(self) -> Awaitable[None]:
        """Return an awaitable that finishes once the signal is set."""


class FutureSignal:
    """An asyncio signal: each waiter awaits its own loop future.

    Each waiter gets its own future, so cancelling one waiting task cancels
    only its future (a shared future would be cancelled for everyone).
    """

    __slots__ = ("_flag", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] = []
        self._flag = False

    def set(self) -> None:
        """Wake every waiter (idempotent)."""
        if self._flag:
            return
        self._flag = True
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._flag

    def wait(self) -> Awaitable[None]:
        """Return a future that completes on :meth:`set` (or a checkpoint if already set)."""
        if self._flag:
            return anyio.lowlevel.checkpoint()
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(future)
        return future


def new_signal() -> Signal:
    """A fresh signal for the running event loop: :class:`FutureSignal` on asyncio, else an anyio Event."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event()
    return FutureSignal(loop)
