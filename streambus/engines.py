"""State that one distributed engine's sinks and sources share on one bus.

An engine plugin (Redis Streams, NATS JetStream) runs a sink that sends the
bus's events out and a source that republishes what other hosts sent. On one
bus they must agree on two things, kept here per bus and per engine:

- ``origin``: an id stamped on everything this bus's sinks write, so its
  sources skip their own writes;
- ``foreign``: the streams a source republished, so a sink of the same engine
  on the same bus does not send them back (which would loop). Another engine's
  sink on that bus still forwards them, so a bus can bridge two engines.

:class:`ControlSink` is what every engine's control sink (``redis-control``,
``nats-control``) shares: it becomes the bus's stop route under the engine's
origin id, answers a stop request from another host by stopping the stream on
this bus, and says when it listens. A subclass carries the requests over its
engine (``run`` and ``forward_stop``).
"""

from __future__ import annotations

import abc
import secrets
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import anyio

from .plugins import PluginBase
from .stopping import StopOutcome, StopReply, StopRequest

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["ControlSink", "EngineLocal", "engine_state"]


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


class ControlSink(PluginBase, abc.ABC):
    """Base of an engine's control sink: the bus's stop route, under the engine's origin id.

    A subclass sets :attr:`engine`, resolves its ``Options`` in ``__init__``
    and then calls ``super().__init__()``, listens on its engine in ``run``
    (calling :meth:`mark_ready` once it does, and :meth:`answer` for each stop
    request from another host), and sends this host's requests in
    :meth:`forward_stop`. The sink reads no events: its subscription is drained
    and dropped (``drop_oldest``, buffer 1).
    """

    engine: ClassVar[str] = ""
    """The engine's name in :func:`engine_state` (``"redis"``, ``"nats"``)."""
    overflow: ClassVar[str] = "drop_oldest"
    buffer: ClassVar[int] = 1

    def __init__(self) -> None:
        self.origin = secrets.token_hex(8)
        """This host's id on the control channel (the bus's origin for :attr:`engine` once set up)."""
        self.handled = 0
        """Stop requests from other hosts this sink answered."""
        self._bus: Bus | None = None
        self._remove_route: Callable[[], None] | None = None
        self._ready = anyio.Event()

    async def wait_ready(self) -> None:
        """Wait until the sink listens (stops it forwards are answered from then on)."""
        await self._ready.wait()

    def mark_ready(self) -> None:
        """Say that the sink listens on its engine (ends :meth:`wait_ready`)."""
        self._ready.set()

    async def setup(self, bus: Bus) -> None:
        """Become *bus*'s stop route, under the bus's origin id for :attr:`engine`."""
        self._bus = bus
        self.origin = engine_state(bus, self.engine).origin
        self._remove_route = bus.add_stop_route(self)

    async def teardown(self) -> None:
        """Stop routing stops (the bus is closing)."""
        if self._remove_route is not None:
            self._remove_route()
            self._remove_route = None

    async def answer(self, request: StopRequest) -> StopReply:
        """Stop *request*'s stream on this bus (never forwarding it again); the reply to send back."""
        if self._bus is None:
            raise RuntimeError(f"{type(self).__name__} answered a stop request before setup()")
        outcome = await self._bus.stop(request.stream, reason=request.reason, by=request.by, forward=False)
        self.handled += 1
        return StopReply(id=request.id, stream=request.stream, origin=self.origin, outcome=outcome.value)

    @abc.abstractmethod
    async def forward_stop(self, stream: str, *, reason: str, by: str) -> StopOutcome:
        """Ask the other hosts to stop *stream*; the outcome (each engine carries it its own way)."""
