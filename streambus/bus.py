"""The bus: one typed event channel, fanned out to supervised subscribers.

::

    async with Bus() as bus:
        bus.add_sink(StdoutSink())
        bus.start_producer(SyntheticProducer(count=3))
    # leaving the block waits for producers, then lets every sink drain

Lifecycle: entering starts a task group. Leaving the block normally waits
for every producer to finish, then closes every subscription (readers still
get what was buffered) and waits for sinks to drain. Leaving with an
exception, or calling :meth:`Bus.shutdown`, aborts live streams with
``by="shutdown"`` first. A sink marked ``critical`` that raises stops the bus
with :class:`~streambus.errors.SinkFailed`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from .errors import BusClosed, SinkFailed, StopFailed, StreamBusError
from .events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent
from .stopping import StopOutcome, StopRoute
from .subscription import Filter, Firehose, OverflowPolicy, StreamRoute, Subscription
from .writer import StreamWriter

__all__ = ["Bus", "Producer", "Sink"]

log = structlog.get_logger("streambus.bus")

_TERMINAL = frozenset({EndEvent, ErrorEvent, AbortEvent})

# Ended stream ids remembered so a late stop answers "ended" rather than "unknown".
_ENDED_KEPT = 10_000


class _Routes:
    """Who is offered the events of one side of the bus.

    A bus has one for what producers publish and, once a processing stage is
    interposed, a second one for the raw events only the stage and ``raw``
    subscribers read. A filter is decided once per stream, on its ``start``:
    the filtered subscribers it matches are kept in the stream's
    :class:`StreamRoute`, indexed by its id in ``following``: a later event of
    that stream costs one dictionary look-up (none from the stream's own
    writer, which holds its route) and one :meth:`Subscription.offer` per
    follower, however many other streams and subscribers are live.
    """

    __slots__ = ("by_id", "firehose", "following", "scan", "unrouted")

    def __init__(self) -> None:
        self.firehose = Firehose()  # unfiltered subscribers: offered every event
        self.by_id: dict[str, list[Subscription]] = {}  # filters naming stream ids, by id
        self.scan: list[Subscription] = []  # other filters (model, provider, meta): tried on every start
        self.following: dict[str, StreamRoute] = {}  # live stream -> its route (the filtered subscribers it matched)
        self.unrouted = StreamRoute(self.firehose)  # events of a stream that did not start here: the firehose only
        # A route's followers are a tuple, replaced when subscribers come and go: publish()
        # iterates them across awaits.

    def start(self, start: StartEvent) -> StreamRoute:
        """Decide who follows the stream *start* opens; return its route."""
        followers = tuple(sub for sub in (*self.by_id.get(start.stream, ()), *self.scan) if sub.filter.matches(start))
        old = self.following.get(start.stream)
        if old is not None:  # started again (a replayed start): whoever holds the old route asks again
            old.current = False
        route = self.following[start.stream] = StreamRoute(self.firehose, followers)
        return route

    def add(self, sub: Subscription, live: Mapping[str, StartEvent]) -> None:
        """Route to *sub* from now on, including the *live* streams its filter matches."""
        flt = sub.filter
        if flt.matches_all:
            self.firehose.add(sub)
            return
        candidates: Iterable[str]
        if flt.streams is not None:
            for stream in flt.streams:
                self.by_id[stream] = [*self.by_id.get(stream, ()), sub]
            candidates = [stream for stream in flt.streams if stream in live]
        else:
            self.scan = [*self.scan, sub]
            candidates = live
        for stream in candidates:
            if flt.matches(live[stream]):
                route = self.route(stream)
                route.followers = (*route.followers, sub)

    def route(self, stream: str) -> StreamRoute:
        """Live *stream*'s route on this side; made here if the stream started before a stage was interposed."""
        route = self.following.get(stream)
        if route is None:
            route = self.following[stream] = StreamRoute(self.firehose)
        return route

    def remove(self, sub: Subscription) -> None:
        """Stop routing to *sub*."""
        flt = sub.filter
        if flt.matches_all:
            self.firehose.remove(sub)
            return
        streams: Iterable[str]
        if flt.streams is not None:
            streams = flt.streams
            for stream in streams:
                rest = _without(self.by_id.get(stream, []), sub)
                if rest:
                    self.by_id[stream] = rest
                else:
                    self.by_id.pop(stream, None)
        else:
            # Rare (a sink filtered by model, say): a scan over the live streams.
            self.scan = _without(self.scan, sub)
            streams = list(self.following)
        for stream in streams:
            route = self.following.get(stream)
            if route is not None and sub in route.followers:  # the route stays while its stream is live
                route.followers = tuple(s for s in route.followers if s is not sub)

    def reroute(self) -> None:
        """Tell the holders of this side's routes to ask for them again (see :attr:`StreamRoute.current`)."""
        for route in self.following.values():
            route.current = False


def _without(subs: list[Subscription], sub: Subscription) -> list[Subscription]:
    return [s for s in subs if s is not sub]


@runtime_checkable
class Sink(Protocol):
    """Anything that consumes events: an object with ``async run(subscription)``.

    Optional members the bus honours when present: ``async setup(bus)`` and
    ``async teardown()`` around the sink's life, and the attributes
    ``overflow`` / ``buffer`` / ``raw`` as defaults for its subscription
    (a recorder sets ``overflow = "block"``; an audit sink sets ``raw = True``
    to see events before moderation), and ``interpose = True`` for a
    processing stage that republishes what it reads (see :meth:`Bus.interpose`).
    """

    async def run(self, events: Subscription) -> None:
        """Consume *events* until the subscription ends."""


@runtime_checkable
class Producer(Protocol):
    """Anything that publishes streams: an object with ``async run(bus)``.

    A producer opens one :meth:`Bus.stream` per model response.
    """

    async def run(self, bus: Bus) -> None:
        """Publish streams to *bus*; return when done."""


class Bus:
    """An async event bus; use it as ``async with Bus() as bus``.

    :param buffer: default per-subscriber buffer, in events.
    :param overflow: default overflow policy (``coalesce``).
    :param max_bytes: byte cap of a ``coalesce`` subscriber's buffer.
    :param drain_timeout: seconds sinks get to drain at shutdown before they are cancelled.
    """

    def __init__(
        self,
        *,
        buffer: int = 1024,
        overflow: OverflowPolicy | str = OverflowPolicy.COALESCE,
        max_bytes: int = 8 * 1024 * 1024,
        drain_timeout: float = 10.0,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self.buffer = buffer
        self.overflow = OverflowPolicy.parse(overflow)
        self.max_bytes = max_bytes
        self.drain_timeout = drain_timeout
        self._subs: dict[Subscription, None] = {}  # an ordered set: closing one of 10,000 stays cheap
        self._routes = _Routes()
        self._raw = _Routes()  # producers' events, once a stage is interposed
        self._interposed = False
        self._live: dict[str, StartEvent] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._stop_routes: list[StopRoute] = []
        self._writers: dict[str, StreamWriter] = {}
        self._sink_tg: anyio.abc.TaskGroup | None = None
        self._producer_tg: anyio.abc.TaskGroup | None = None
        self._running = False
        self._failure: SinkFailed | None = None
        self._writers_idle: anyio.Event | None = None
        self._producer_scopes: set[anyio.CancelScope] = set()
        self._stopped: anyio.Event | None = None
        self._sink_count = 0
        self._stages: list[tuple[Subscription, anyio.Event]] = []  # interposed stages and their "finished"

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> Bus:
        if self._running:
            raise RuntimeError("this Bus is already running")
        self._sink_tg = anyio.create_task_group()
        await self._sink_tg.__aenter__()
        self._producer_tg = anyio.create_task_group()
        await self._producer_tg.__aenter__()
        self._stopped = anyio.Event()
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._producer_tg is not None
        assert self._sink_tg is not None
        if exc is not None:
            # The caller's exception propagates as it is, not wrapped in a
            # task group's ExceptionGroup: stop producers, then exit cleanly.
            self._abort_all("shutdown", "shutdown")
            self._cancel_producers()
        try:
            try:
                await self._producer_tg.__aexit__(None, None, None)
            finally:
                self._abort_all("shutdown", "shutdown")
                # Writers running outside the producer task group (request
                # handlers, the caller's own tasks) publish their abort first.
                with anyio.CancelScope(shield=True) as shield:
                    shield.deadline = anyio.current_time() + self.drain_timeout
                    while self._writers:
                        self._writers_idle = anyio.Event()
                        await self._writers_idle.wait()
                self._running = False
                self._routes.reroute()  # writers still open past the drain timeout check the bus again
                self._raw.reroute()
                await self._drain_stages()
                for sub in list(self._subs):
                    sub.close()
                # Sinks drain what was already accepted, shielded from the
                # cancellation that may be tearing the caller down, but bounded.
                scope = self._sink_tg.cancel_scope
                scope.shield = True
                scope.deadline = anyio.current_time() + self.drain_timeout
                await self._sink_tg.__aexit__(None, None, None)
                if scope.cancelled_caught:
                    log.warning("bus.drain_timeout", timeout=self.drain_timeout)
        except BaseException as group:
            if self._failure is not None:
                raise self._failure from self._failure.__cause__
            raise group
        if self._failure is not None:
            raise self._failure from self._failure.__cause__
        return None

    @property
    def running(self) -> bool:
        """Whether the bus accepts events."""
        return self._running

    @property
    def interposed(self) -> bool:
        """Whether a processing stage (e.g. moderation) sits between producers and non-raw subscribers."""
        return self._interposed

    def _check_running(self) -> None:
        if not self._running:
            raise BusClosed("the bus is not running; use it inside `async with Bus() as bus:`")

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Abort every live stream with ``by="shutdown"`` and cancel producers.

        Wakes :meth:`wait_stopped`; leaving the ``async with`` block then drains sinks.
        """
        self._abort_all(reason, "shutdown")
        self._cancel_producers()
        if self._stopped is not None:
            self._stopped.set()
        await anyio.lowlevel.checkpoint()

    def _cancel_producers(self) -> None:
        # Each producer has its own scope: the task group's scope would also
        # cancel the body of the caller's `async with Bus()` block.
        for scope in list(self._producer_scopes):
            scope.cancel()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`shutdown` is called or a critical sink fails."""
        self._check_running()
        assert self._stopped is not None
        await self._stopped.wait()

    @property
    def failure(self) -> SinkFailed | None:
        """The :class:`~streambus.errors.SinkFailed` that stopped the bus, if any."""
        return self._failure

    # -- producers -----------------------------------------------------------
    def stream(
        self,
        *,
        model: str = "",
        provider: str = "",
        meta: Mapping[str, Any] | None = None,
        stream: str | None = None,
    ) -> StreamWriter:
        """Return a writer for a new stream; publish through it with ``async with``."""
        return StreamWriter(self, stream=stream, model=model, provider=provider, meta=meta)

    def start_producer(self, producer: Producer, *, name: str | None = None) -> None:
        """Run *producer* in the bus's task group; leaving the bus waits for it."""
        self.start_soon(producer.run, self, name=name or type(producer).__name__)

    def start_soon(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Run ``func(*args)`` as a producer task (its failure is logged, not fatal)."""
        self._check_running()
        assert self._producer_tg is not None
        self._producer_tg.start_soon(self._guard_producer, func, args, name or getattr(func, "__name__", "task"))

    async def _guard_producer(self, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...], name: str) -> None:
        with anyio.CancelScope() as scope:
            self._producer_scopes.add(scope)
            try:
                await func(*args)
            except Exception as exc:
                log.error("producer.failed", producer=name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            finally:
                self._producer_scopes.discard(scope)

    def abort(self, stream: str, reason: str = "", by: str = "client") -> bool:
        """Abort a live stream: cancel its producer and publish ``abort``.

        Returns False if the stream is not live here (unknown or already ended).
        """
        writer = self._writers.get(stream)
        if writer is None:
            return False
        return writer.request_abort(reason, by)

    async def stop(self, stream: str, *, reason: str = "", by: str = "client", forward: bool = True) -> StopOutcome:
        """Stop *stream* wherever its producer runs; return what became of the request.

        - :attr:`~streambus.stopping.StopOutcome.STOPPED`: the producer runs on
          this bus; it is cancelled (closing its upstream HTTP response) and
          publishes one ``abort`` event with *reason* and *by*.
        - :attr:`~streambus.stopping.StopOutcome.ENDED`: the stream already
          ended (here, or as the owner reports): a clean no-op.
        - :attr:`~streambus.stopping.StopOutcome.FORWARDED`: a stop route
          (see :meth:`add_stop_route`) carried the request to the owner, which
          stopped it; the ``abort`` arrives here as the owner's other events do.
        - :attr:`~streambus.stopping.StopOutcome.UNKNOWN`: nobody owns a live
          stream with that id.

        With ``forward=False`` the routes are not asked (what a route's
        receiving end uses, so a request never travels twice). Raises
        :class:`~streambus.errors.StopFailed` when a route's engine is
        unreachable and no other route answered.
        """
        if self.abort(stream, reason, by):
            return StopOutcome.STOPPED
        if stream in self._ended:
            return StopOutcome.ENDED
        if forward:
            failure: StopFailed | None = None
            for route in list(self._stop_routes):
                try:
                    outcome = await route.forward_stop(stream, reason=reason, by=by)
                except StopFailed as exc:
                    failure = exc
                    continue
                if outcome is not StopOutcome.UNKNOWN:
                    return outcome
            if stream in self._ended:  # it ended while the routes were asked
                return StopOutcome.ENDED
            if failure is not None:
                raise failure
            if stream in self._live:
                # Its events arrive here (a Redis source...) but its producer runs elsewhere.
                log.warning(
                    "bus.stop_unrouted",
                    stream=stream,
                    routes=len(self._stop_routes),
                    hint="the stream is live here but owned by another process that no stop route reached "
                    "(add the redis-control sink to every bus of the deployment)",
                )
        return StopOutcome.UNKNOWN

    def add_stop_route(self, route: StopRoute) -> Callable[[], None]:
        """Let *route* carry :meth:`stop` requests for streams whose producer runs elsewhere.

        An engine linking buses across processes registers one (the Redis
        plugin's ``redis-control`` sink does, in its ``setup``). Routes are
        asked in the order they were added, after this bus's own producers.
        Returns a function that removes the route.
        """
        self._stop_routes = [*self._stop_routes, route]

        def remove() -> None:
            self._stop_routes = [r for r in self._stop_routes if r is not route]

        return remove

    def ended(self, stream: str) -> bool:
        """Whether *stream* had its terminal event on this bus (the last 10,000 ended streams are remembered)."""
        return stream in self._ended

    def _abort_all(self, reason: str, by: str) -> None:
        for writer in list(self._writers.values()):
            writer.request_abort(reason, by)

    def register_writer(self, writer: StreamWriter) -> None:
        """Claim *writer*'s stream id while it is open, so :meth:`abort` finds it.

        :class:`StreamWriter` calls this as its block is entered (and
        :meth:`unregister_writer` as it is left); you need neither unless you
        write a writer of your own. Raises ``ValueError`` if the id is already live.
        """
        self._check_running()
        if writer.stream in self._writers or writer.stream in self._live:
            raise ValueError(f"stream id {writer.stream!r} is already live on this bus")
        self._writers[writer.stream] = writer

    def unregister_writer(self, writer: StreamWriter) -> None:
        """Release *writer*'s stream id (see :meth:`register_writer`)."""
        if self._writers.get(writer.stream) is writer:
            del self._writers[writer.stream]
            if not self._writers and self._writers_idle is not None:
                self._writers_idle.set()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Every open subscription, sinks' included."""
        return tuple(self._subs)

    @property
    def live_streams(self) -> Mapping[str, StartEvent]:
        """The ``start`` event of every stream that has not ended yet."""
        return self._live

    # -- publishing ------------------------------------------------------------
    async def publish(self, event: Event, *, processed: bool = False) -> None:
        """Deliver *event* to the subscribers that follow its stream, and to unfiltered ones.

        Producers normally publish through :meth:`stream`; call this directly
        to republish events that already carry their ``stream``/``seq`` (a
        Redis source, a replay). Waits only while a ``block`` subscriber is
        full. *processed* is for interposed stages (moderation): see
        :meth:`interpose`.
        """
        wait = self.offer(event, processed=processed)
        if wait is not None:
            await wait

    def offer(self, event: Event, processed: bool = False) -> Awaitable[None] | None:
        """Deliver *event* at once, as :meth:`publish` does, without a coroutine of its own.

        Returns ``None`` when every subscriber took the event. Otherwise a
        full ``block`` subscriber makes the publisher wait: await the returned
        awaitable before offering the stream's next event (the event reaches
        that subscriber when it finishes). :class:`StreamWriter` publishes
        its deltas this way. *processed* is :meth:`publish`'s (interposed
        stages only); it may be given positionally, so the writer's call per
        delta skips a keyword-only default's look-up.
        """
        if not self._running and not self._subs:
            raise BusClosed("the bus is not running; use it inside `async with Bus() as bus:`")
        routes = self._raw if self._interposed and not processed else self._routes
        kind = type(event)
        if kind is StartEvent:
            if not processed:
                self._live[event.stream] = event  # type: ignore[assignment]
            route = routes.start(event)  # type: ignore[arg-type]
        else:
            route = routes.following.get(event.stream, routes.unrouted)
        wait = route.offer(event)
        if kind is not DeltaEvent and kind in _TERMINAL:
            if route is not routes.unrouted:
                del routes.following[event.stream]
                route.current = False
            if not processed:
                self._live.pop(event.stream, None)
                ended = self._ended
                ended[event.stream] = None
                if len(ended) > _ENDED_KEPT:
                    ended.popitem(last=False)
        return wait

    def route(self, stream: str) -> StreamRoute:
        """The route of live *stream*'s events as its producer publishes them.

        A producer may offer the stream's deltas to it (``route.offer(event)``,
        awaiting what that returns, as with :meth:`offer`) instead of calling
        :meth:`offer` for each: :class:`StreamWriter` does, so a token costs
        no look-up of its stream. Ask again whenever the route's ``current``
        turns False (a stage was interposed, the bus is stopping, or the
        stream ended or started again). Publish the stream's ``start`` and its
        terminal event through :meth:`offer`, which open and close the route. Raises
        :class:`~streambus.errors.BusClosed` once the bus stopped and
        nobody is left to read, ``KeyError`` if *stream* is not live.
        """
        if not self._running and not self._subs:
            raise BusClosed("the bus is not running; use it inside `async with Bus() as bus:`")
        if stream not in self._live:
            raise KeyError(f"stream {stream!r} is not live on this bus (publish its start first)")
        return (self._raw if self._interposed else self._routes).route(stream)

    # -- subscribing -------------------------------------------------------------
    def subscribe(
        self,
        filter: Filter | None = None,
        *,
        buffer: int | None = None,
        overflow: OverflowPolicy | str | None = None,
        max_bytes: int | None = None,
        name: str = "subscriber",
        raw: bool = False,
    ) -> Subscription:
        """Subscribe to events matching *filter* (everything by default).

        Returns a :class:`~streambus.Subscription` to read with ``async for``.
        Streams already live are included from their next event on. *raw*
        subscribers see events before any interposed stage (moderation).
        """
        if not self._running:
            raise BusClosed("the bus is not running; use it inside `async with Bus() as bus:`")
        sub = Subscription(
            filter,
            buffer=buffer or self.buffer,
            overflow=overflow if overflow is not None else self.overflow,
            max_bytes=max_bytes or self.max_bytes,
            name=name,
            raw=raw,
            on_close=self._forget,
        )
        self._subs[sub] = None
        self._routes_of(sub).add(sub, self._live)
        return sub

    def _routes_of(self, sub: Subscription) -> _Routes:
        return self._raw if sub.raw and self._interposed else self._routes

    def interpose(self, *, name: str = "stage", buffer: int | None = None) -> Subscription:
        """Put a processing stage (e.g. moderation) between producers and subscribers.

        Returns a raw ``block`` subscription of everything producers publish.
        From now on, non-raw subscribers only see what the stage republishes
        with ``publish(event, processed=True)``; raw subscribers keep seeing
        the producers' events.

        A bus takes one stage: a second would read the same raw events and
        republish them again, so every subscriber would see each event
        twice. Asking for a second raises :class:`~streambus.errors.StreamBusError`
        (do both kinds of processing inside one stage).
        """
        self._check_running()
        if self._interposed:
            raise StreamBusError(
                f"interpose: this bus already has a processing stage; {name!r} would be a second one, "
                "and both would republish every event (combine them into one stage)"
            )
        # Raw subscribers that joined before the stage keep seeing producers' events.
        for existing in self._subs:
            if existing.raw:
                self._routes.remove(existing)
                self._raw.add(existing, self._live)
        self._interposed = True
        self._routes.reroute()  # writers now publish to the raw side
        return self.subscribe(buffer=buffer, overflow=OverflowPolicy.BLOCK, name=name, raw=True)

    def _forget(self, sub: Subscription) -> None:
        # The subscription's on_close: it is closed, so stop routing to it.
        if self._subs.pop(sub, False) is None:
            self._routes_of(sub).remove(sub)

    # -- sinks -----------------------------------------------------------------
    def add_sink(
        self,
        sink: Sink,
        *,
        name: str | None = None,
        filter: Filter | None = None,
        buffer: int | None = None,
        overflow: OverflowPolicy | str | None = None,
        critical: bool = False,
        raw: bool | None = None,
        max_restarts: float = math.inf,
    ) -> Subscription:
        """Subscribe *sink* and run it supervised in the bus's task group.

        An exception in the sink is logged and the sink restarted with
        exponential backoff (0.05 s doubling to 5 s) on the same subscription,
        so nothing buffered is lost; a *critical* sink stops the bus instead.
        Returns the sink's subscription.
        """
        self._check_running()
        assert self._sink_tg is not None
        self._sink_count += 1
        label = name or getattr(sink, "name", None) or f"{type(sink).__name__}-{self._sink_count}"
        if getattr(sink, "interpose", False):
            # A processing stage (moderation): it reads what producers publish
            # and republishes with processed=True for everyone else.
            sub = self.interpose(name=label, buffer=buffer or getattr(sink, "buffer", None))
            done = anyio.Event()
            self._stages.append((sub, done))
            self._sink_tg.start_soon(
                self._supervise_stage, sink, sub, label, critical, max_restarts, done, name=f"sink:{label}"
            )
            return sub
        sub = self.subscribe(
            filter,
            buffer=buffer or getattr(sink, "buffer", None),
            overflow=overflow or getattr(sink, "overflow", None),
            name=label,
            raw=raw if raw is not None else bool(getattr(sink, "raw", False)),
        )
        self._sink_tg.start_soon(self._supervise, sink, sub, label, critical, max_restarts, name=f"sink:{label}")
        return sub

    async def _supervise_stage(
        self, sink: Sink, sub: Subscription, name: str, critical: bool, max_restarts: float, done: anyio.Event
    ) -> None:
        try:
            await self._supervise(sink, sub, name, critical, max_restarts)
        finally:
            done.set()

    async def _drain_stages(self) -> None:
        """Let interposed stages finish before their readers' subscriptions close.

        A stage republishes what producers already published (moderation
        checks the final window at the end), so it drains first, bounded by
        ``drain_timeout``, while the subscriptions it publishes to stay open.
        """
        if not self._stages:
            return
        for sub, _ in self._stages:
            sub.close()
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.drain_timeout
            for _, done in self._stages:
                await done.wait()
        if scope.cancelled_caught:
            log.warning("bus.stage_drain_timeout", timeout=self.drain_timeout)

    async def _supervise(self, sink: Sink, sub: Subscription, name: str, critical: bool, max_restarts: float) -> None:
        delay = 0.05
        restarts = 0
        try:
            setup = getattr(sink, "setup", None)
            if setup is not None:
                await setup(self)
            while True:
                try:
                    await sink.run(sub)
                    return
                except Exception as exc:
                    if critical:
                        self._fail(SinkFailed(name), exc)
                        return
                    if restarts >= max_restarts:
                        log.error("sink.gave_up", sink=name, restarts=restarts, error=repr(exc))
                        return
                    restarts += 1
                    log.error(
                        "sink.failed", sink=name, error=f"{type(exc).__name__}: {exc}", restart_in=delay, exc_info=exc
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        except Exception as exc:  # setup failed
            if critical:
                self._fail(SinkFailed(name), exc)
            else:
                log.error("sink.setup_failed", sink=name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        finally:
            sub.close()
            teardown = getattr(sink, "teardown", None)
            if teardown is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await teardown()
                    except Exception as exc:
                        log.error("sink.teardown_failed", sink=name, error=repr(exc))

    def _fail(self, failure: SinkFailed, cause: BaseException) -> None:
        failure.__cause__ = cause
        log.error("sink.critical_failure", sink=failure.name, error=f"{type(cause).__name__}: {cause}")
        if self._failure is None:
            self._failure = failure
        self._abort_all("critical sink failed", "shutdown")
        self._cancel_producers()
        if self._stopped is not None:
            self._stopped.set()
