"""Edges in distributed mode: ask the engine for what memory does not hold, and say what to read.

Two small contracts connect a bus's *sinks* (the WebSocket and HTTP edges
clients talk to) with the *source* that feeds that bus from a distributed
engine (the Redis source in its ``per_stream`` layout), without either
importing the other::

    edge bus:   engine source ──publish──► Bus ──► websocket sink ──► clients
                      ▲                               │
                      └── StreamArchive (fetch, follow) ◄┘   Interest (wants)

* A sink that serves clients registers an :class:`Interest` on its bus
  (:func:`add_interest`): the source asks it, for each stream that starts
  anywhere, whether a client here follows it (:func:`interested`), and reads
  only those streams' events.
* The source registers itself as the bus's :class:`StreamArchive`
  (:func:`attach_archive`). A sink whose own history cannot answer a
  resume (``since``, ``Last-Event-ID``) asks it for the stream as the engine
  retains it (:meth:`StreamArchive.fetch`, all or nothing), and asks it to
  :meth:`~StreamArchive.follow` a stream a client now wants.

A bus without an archive (one process, or a source that reads everything)
behaves as before: :func:`archive_of` returns ``None`` and sinks answer from
memory alone.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .bus import Bus
    from .events import Event, StartEvent

__all__ = [
    "Interest",
    "StreamArchive",
    "add_interest",
    "archive_of",
    "attach_archive",
    "detach_archive",
    "interested",
    "remove_interest",
]


@runtime_checkable
class StreamArchive(Protocol):
    """Where an edge finds the streams its own memory does not hold (a distributed engine's retention)."""

    async def fetch(self, stream: str) -> list[Event] | None:
        """Every event of *stream* the engine retains, from its ``start`` (seq 0) on, in seq order, gap-free.

        ``None`` when that cannot be vouched for: the stream is unknown,
        expired, trimmed at its beginning, or has a hole (lost in the engine).
        The caller answers its client "not recovered" then, never a text with
        a hole. The list ends with the terminal event when the stream ended.
        """
        ...

    def follow(self, stream: str) -> None:
        """Deliver *stream*'s events on the bus from its ``start`` on (events already delivered come again).

        Returns at once; the events arrive through the bus like any other.
        Following ends by itself when the stream's terminal event was delivered.
        """
        ...

    def live_starts(self) -> list[StartEvent]:
        """The ``start`` of streams known to have begun and not ended (bounded, newest last), followed or not."""
        ...


@runtime_checkable
class Interest(Protocol):
    """A sink that only needs some streams: the ones its clients follow."""

    def wants(self, start: StartEvent) -> bool:
        """Whether a client of this sink follows the stream *start* begins (decided at its start)."""
        ...


_ARCHIVES: weakref.WeakKeyDictionary[Bus, StreamArchive] = weakref.WeakKeyDictionary()
_INTERESTS: weakref.WeakKeyDictionary[Bus, list[Interest]] = weakref.WeakKeyDictionary()


def attach_archive(bus: Bus, archive: StreamArchive) -> None:
    """Make *archive* the one *bus*'s sinks ask (a source calls this as it starts); replaces another."""
    _ARCHIVES[bus] = archive


def detach_archive(bus: Bus, archive: StreamArchive) -> None:
    """Undo :func:`attach_archive` (a source calls this as it stops); nothing if another one replaced it."""
    if _ARCHIVES.get(bus) is archive:
        del _ARCHIVES[bus]


def archive_of(bus: Bus | None) -> StreamArchive | None:
    """The archive attached to *bus*, or ``None`` (no distributed engine feeds it, or it reads everything)."""
    if bus is None:
        return None
    return _ARCHIVES.get(bus)


def add_interest(bus: Bus, interest: Interest) -> None:
    """Register *interest* (a sink) on *bus*; registering it twice counts once."""
    found = _INTERESTS.setdefault(bus, [])
    if not any(known is interest for known in found):
        found.append(interest)


def remove_interest(bus: Bus, interest: Interest) -> None:
    """Unregister *interest* from *bus* (a sink calls this as it stops)."""
    found = _INTERESTS.get(bus)
    if found is not None:
        found[:] = [known for known in found if known is not interest]


def interested(bus: Bus, start: StartEvent) -> bool:
    """Whether any :class:`Interest` registered on *bus* wants the stream *start* begins."""
    return any(interest.wants(start) for interest in _INTERESTS.get(bus, ()))
