"""Where parked readers and publishers wait to be woken (private).

A subscription parks its reader when its buffer is empty, and a publisher
when a ``block`` subscription is full; :meth:`Parking.wake` releases them.
One :class:`Parking` serves every wait of its subscription, so parking
allocates nothing but what the backend needs: on asyncio a bare loop future
per waiting task (a woken task resumes through no wrapper coroutine, and
cancelling one waiter cancels only its own future); on trio, and anything
else, an :class:`anyio.Event` per round. See ``docs/decisions.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import anyio

__all__ = ["Parking"]


class Parking:
    """Tasks waiting for the next :meth:`wake`; check :attr:`waiting` before waking."""

    __slots__ = ("_event", "_first", "_loop", "_more", "waiting")

    def __init__(self) -> None:
        self.waiting = False
        """Whether a task parked since the last :meth:`wake`."""
        # The first waiting task's future in a slot of its own, the others' in a list made only when
        # a second task waits: one reader parking and waking (the commonest case) touches no list,
        # neither its reallocations nor, with 10,000 subscribers, its cache line (docs/decisions.md).
        self._first: asyncio.Future[None] | None = None
        self._more: list[asyncio.Future[None]] | None = None
        self._event: anyio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wait(self) -> Awaitable[None]:
        """Return what to await until the next :meth:`wake` (a spurious wake-up is possible: re-check)."""
        self.waiting = True
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # not asyncio (trio)
                if self._event is None:
                    self._event = anyio.Event()
                return self._event.wait()
        future = loop.create_future()
        if self._first is None:
            self._first = future
        elif self._more is None:
            self._more = [future]
        else:
            self._more.append(future)
        return future

    def relay(self, steps: int) -> None:
        """Release the tasks parked now in relay: one at once, one per loop turn for ``steps - 1`` more, then the rest.

        For the readers of one shared log: when the publisher yields after
        every event, the tasks released last then find ``steps + 1`` events
        per wake-up instead of one. Each step releases one task and schedules
        the next step right behind that task's wake-up, so until the last step
        has run a released task is always ready to run: a parked task never
        looks blocked to ``anyio.wait_all_tasks_blocked`` while its release is
        pending. Without an asyncio loop this is :meth:`wake`.
        """
        more = self._more
        first = self._first
        if not more or first is None or self._loop is None:
            self.wake()
            return
        self.waiting = False
        self._first = None
        self._more = None
        _relay(self._loop, [first, *more], 0, steps)

    def wake(self) -> None:
        """Release every task parked now."""
        self.waiting = False
        first = self._first
        if first is not None:
            self._first = None
            if not first.done():
                first.set_result(None)
            more = self._more
            if more is not None:
                self._more = None
                for future in more:
                    if not future.done():
                        future.set_result(None)
        if self._event is not None:
            self._event.set()
            self._event = None


def _relay(loop: asyncio.AbstractEventLoop, futures: list[asyncio.Future[None]], start: int, steps: int) -> None:
    # Release the first task still parked from *start* on; the next step runs right behind its wake-up.
    for i in range(start, len(futures)):
        future = futures[i]
        if not future.done():
            future.set_result(None)
            if steps > 1:
                loop.call_soon(_relay, loop, futures, i + 1, steps - 1)
            else:
                loop.call_soon(_release, futures, i + 1)
            return


def _release(futures: list[asyncio.Future[None]], start: int) -> None:
    for future in futures[start:]:
        if not future.done():
            future.set_result(None)
