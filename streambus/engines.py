"""State that one distributed engine's sinks and sources share on one bus.

An engine plugin (Redis Streams, NATS JetStream) runs a sink that sends the
bus's events out and a source that republishes what other hosts sent. On one
bus they must agree on two things, kept here per bus and per engine:

- ``origin``: an id stamped on everything this bus's sinks write, so its
  sources skip their own writes;
- ``foreign``: the streams a source republished, so a sink of the same engine
  on the same bus does not send them back (which would loop). Another engine's
  sink on that bus still forwards them, so a bus can bridge two engines.
"""

from __future__ import annotations

import secrets
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["EngineLocal", "engine_state"]


class EngineLocal:
    """Per-bus, per-engine state shared by that engine's sinks and sources (see the module docstring)."""

    __slots__ = ("foreign", "origin")

    MAX_FOREIGN = 100_000
    """How many republished stream ids are remembered (the oldest are forgotten first)."""

    def __init__(self) -> None:
        self.origin = secrets.token_hex(8)
        self.foreign: OrderedDict[str, None] = OrderedDict()

    def mark_foreign(self, stream: str) -> None:
        """Remember that *stream* came from the engine (bounded, oldest forgotten first)."""
        foreign = self.foreign
        if stream in foreign:
            return
        foreign[stream] = None
        if len(foreign) > self.MAX_FOREIGN:
            foreign.popitem(last=False)


_STATES: weakref.WeakKeyDictionary[Bus, dict[str, EngineLocal]] = weakref.WeakKeyDictionary()


def engine_state(bus: Bus, engine: str) -> EngineLocal:
    """The :class:`EngineLocal` of *engine* (e.g. ``"redis"``) on *bus*, created on first use."""
    states = _STATES.get(bus)
    if states is None:
        states = _STATES[bus] = {}
    state = states.get(engine)
    if state is None:
        state = states[engine] = EngineLocal()
    return state
