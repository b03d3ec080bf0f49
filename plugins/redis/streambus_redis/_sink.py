"""The ``redis`` sink: publish the bus's events to a Redis stream."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import anyio
import msgspec
import structlog

from streambus import Event, PluginBase, StartEvent, Subscription, is_terminal
from streambus.plugins import NonNegativeInt, PositiveInt
from streambus.producing import Failure, RetryPolicy

from ._codec import encode_entry
from ._common import (
    DEFAULT_STREAM,
    ENV_PASSWORD,
    connect,
    epoch_key,
    heartbeat_key,
    index_key,
    local_state,
    new_epoch,
    redact,
    require_asyncio,
    resolve_url,
    stream_key,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streambus import Bus

__all__ = ["RedisSink"]

log = structlog.get_logger("streambus.redis")


class RedisSink(PluginBase):
    """Publish every event to a Redis stream with pipelined ``XADD`` (config type ``redis``).

    Events are batched for at most ``batch_max_ms`` (or until
    ``batch_max_events`` are waiting), packed ``entry_max_events`` to an entry
    and written in one pipeline, each ``XADD`` trimming the stream with
    ``MAXLEN ~ maxlen``. A dropped connection is retried with backoff until
    Redis answers again, the same entries re-sent (consumers drop the
    duplicates), so nothing accepted is lost; meanwhile the sink's ``block``
    subscription slows producers down. Every pipeline also creates (or reads)
    the key's epoch (``<key>#epoch``, see :func:`epoch_key`), so consumers can
    tell a key that Redis lost and the sink recreated from the old one; the
    sink logs ``redis.epoch_changed`` when that happens. Streams that a
    :class:`RedisSource` on the same bus brought in are not sent back. Needs
    asyncio.

    ::

        bus.add_sink(RedisSink(url="redis://cache:6379/0", stream="llm:events"))
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``redis`` sink."""

        url: str | None = None
        """Redis URL; default ``$STREAMBUS_REDIS_URL`` or ``redis://127.0.0.1:6379/0``. ``rediss://`` for TLS."""
        stream: str = DEFAULT_STREAM
        """The Redis stream key."""
        namespace_tag: str | None = None
        """A ``meta`` tag whose value picks the key ``<stream>:<value>`` (one key per namespace)."""
        maxlen: NonNegativeInt = 100_000
        """Approximate entries kept (``MAXLEN ~``); 0 keeps everything."""
        batch_max_events: PositiveInt = 1000
        """Send as soon as this many events wait."""
        batch_max_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 2.0
        """Longest an event waits for others to share its pipeline; 0 sends what is buffered at once."""
        entry_max_events: PositiveInt = 128
        """Events packed into one stream entry (1 = one entry per event)."""
        tls: bool | None = None
        """Force TLS even for a ``redis://`` URL (CA and client cert from ``STREAMBUS_REDIS_TLS_*_FILE``)."""
        password_env: str = ENV_PASSWORD
        """The environment variable holding the password."""
        origin: str | None = None
        """Origin id written on each entry; default: the bus's own (its sources skip it)."""
        max_attempts: PositiveInt = 5
        """Attempts for an error Redis answered (not a dropped connection, which retries forever)."""
        layout: Literal["single", "per_stream"] = "single"
        """``single``: every event in the key ``stream``. ``per_stream``: each stream in its own key
        ``<stream>:s:<id>`` plus every ``start`` and terminal event in the index ``<stream>:index``, so an edge
        reads only the streams its clients follow (see docs/distributed.md)."""
        stream_maxlen: PositiveInt = 10_000
        """``per_stream``: approximate entries kept per stream key (a stream longer than that cannot be
        resumed from its beginning)."""
        stream_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
        """``per_stream``: how long a stream key (and its epoch) is kept after its last write: the retention a
        resume on any edge can reach back."""
        producer_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 5000
        """A heartbeat key ``<stream>:producer:<id>`` lives this long and is refreshed every third of it; when a
        killed producer's key expires, consumers end its live streams with an ``error`` of kind
        ``producer_lost``. 0: no heartbeat (consumers then never declare this sink's streams lost)."""

        def __post_init__(self) -> None:
            if not self.stream:
                raise ValueError("stream: must not be empty")
            if self.layout == "per_stream" and self.namespace_tag is not None:
                raise ValueError('namespace_tag: not used with layout = "per_stream" (every stream has its own key)')
            if not 0 < self.stream_ttl_s <= 30 * 86400:
                raise ValueError(f"stream_ttl_s: must be above 0 and at most 2592000, got {self.stream_ttl_s}")
            if not 0 <= self.producer_timeout_ms <= 3_600_000:
                raise ValueError(f"producer_timeout_ms: must be between 0 and 3600000, got {self.producer_timeout_ms}")
            if self.stream_maxlen < 1:
                raise ValueError(f"stream_maxlen: must be at least 1, got {self.stream_maxlen}")
            if self.maxlen < 0:
                raise ValueError(f"maxlen: must be 0 (no trimming) or positive, got {self.maxlen}")
            if self.batch_max_events < 1:
                raise ValueError(f"batch_max_events: must be at least 1, got {self.batch_max_events}")
            if not 0 <= self.batch_max_ms <= 10_000:
                raise ValueError(f"batch_max_ms: must be between 0 and 10000, got {self.batch_max_ms}")
            if self.entry_max_events < 1:
                raise ValueError(f"entry_max_events: must be at least 1, got {self.entry_max_events}")
            if self.max_attempts < 1:
                raise ValueError(f"max_attempts: must be at least 1, got {self.max_attempts}")

    overflow: ClassVar[str] = "block"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: RedisSink.Options = self.resolve_options(options, kwargs)
        self.producer_id = secrets.token_hex(6)
        """This sink instance's id on every entry it writes (entry counters are per instance)."""
        self.sent_events = 0
        """Events written to Redis so far."""
        self.sent_entries = 0
        """Stream entries written so far."""
        self.epochs: dict[str, str] = {}
        """The epoch of each key this sink wrote to, as Redis last answered."""
        self._bus: Bus | None = None
        self._counters: dict[str, int] = defaultdict(int)
        self._stamped: dict[str, float] = {}  # per_stream: when each stream key's epoch and expiry are due again
        self._keys: dict[str, str] = {}
        self._unsent: list[Event] = []
        self.retry = RetryPolicy(retries=None, backoff=0.05, max_wait=2.0)
        """How writes are retried: 50 ms doubling to 2 s, with jitter, without limit (see ``max_attempts``)."""
        self._ready = asyncio.Event()

    async def wait_ready(self) -> None:
        """Wait until the sink is connected to Redis (it connects as it starts, before the first event).

        A pipeline can hold its producers until then, so the first events do
        not wait for the connection. If Redis cannot be reached at start, the
        sink keeps retrying as it does for any dropped connection, and this
        waits on.
        """
        await self._ready.wait()

    async def setup(self, bus: Bus) -> None:
        """Remember the bus (for its origin id and the streams its sources brought in)."""
        self._bus = bus

    async def run(self, events: Subscription) -> None:
        """Send events until the subscription ends."""
        require_asyncio("the redis sink")
        opts = self.options
        local = local_state(self._bus) if self._bus is not None else None
        origin = opts.origin or (local.origin if local is not None else secrets.token_hex(8))
        foreign = local.foreign if local is not None else {}
        client = connect(opts.url, tls=opts.tls, password_env=opts.password_env, socket_timeout=10.0)
        url = redact(resolve_url(opts.url))
        log.info("redis.sink_started", url=url, stream=opts.stream, origin=origin, layout=opts.layout)
        try:
            try:
                async with anyio.create_task_group() as tg:
                    if opts.producer_timeout_ms:
                        tg.start_soon(self._heartbeat, client)
                    await self._pump(client, origin, events, foreign)
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The heartbeat never raises: what failed is the pump; the bus (and callers) see it as it was.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            with anyio.CancelScope(shield=True):
                if opts.producer_timeout_ms:
                    with anyio.move_on_after(1.0):
                        await self._forget_heartbeat(client)
                await client.aclose()

    @property
    def heartbeat_key(self) -> str:
        """The key this sink keeps alive while it runs (see ``producer_timeout_ms``)."""
        return heartbeat_key(self.options.stream, self.producer_id)

    async def _heartbeat(self, client: aioredis.Redis) -> None:
        """Keep :attr:`heartbeat_key` alive: refreshed every third of ``producer_timeout_ms``, on its own."""
        import redis.exceptions as rex

        timeout = self.options.producer_timeout_ms
        while True:
            try:
                await client.set(self.heartbeat_key, "1", px=timeout)
                wait = timeout / 3000
            except (rex.RedisError, OSError) as exc:
                # Redis is away (or refused): the writes retry on their own; try again soon, so consumers
                # that reconnect find the key before they would declare this producer lost.
                log.debug("redis.heartbeat_retry", error=f"{type(exc).__name__}: {exc}")
                wait = min(0.2, timeout / 3000)
            await anyio.sleep(wait)

    async def _forget_heartbeat(self, client: aioredis.Redis) -> None:
        import redis.exceptions as rex

        with contextlib.suppress(rex.RedisError, OSError):  # else it expires by itself
            await client.delete(self.heartbeat_key)

    async def _pump(self, client: aioredis.Redis, origin: str, events: Subscription, foreign: Any) -> None:
        opts = self.options
        limit = opts.batch_max_events
        wait = opts.batch_max_ms / 1000
        await self._connect(client)
        if self._unsent:
            # What a failed run could not send goes first, in order.
            await self._send(client, origin, self._unsent)
        while True:
            batch = await events.receive_batch(limit, linger=wait)
            if not batch:
                return
            if foreign:
                batch = [e for e in batch if e.stream not in foreign]
            if batch:
                await self._send(client, origin, batch)

    async def _connect(self, client: aioredis.Redis) -> None:
        # Connect before the first event, so it does not wait for the handshake;
        # until Redis answers, events wait in the block subscription as on any outage.
        await self._retrying(client.ping, events=0)
        self._ready.set()

    async def _retrying(self, action: Callable[[], Awaitable[Any]], *, events: int) -> None:
        """Run *action* until Redis takes it: a dropped connection is retried with backoff, forever."""
        import redis.exceptions as rex

        answered = 0

        async def attempt() -> Failure | None:
            nonlocal answered
            try:
                await action()
            except (rex.AuthenticationError, rex.AuthorizationError) as exc:
                # Retrying will not fix a wrong password: fail loudly (the bus restarts the sink).
                log.error("redis.sink_auth_failed", error=str(exc), events_held=events)
                raise
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                # Connection trouble: the entries may or may not have landed;
                # re-sending is safe (consumers drop the duplicates), losing is not.
                return Failure("connect", f"{type(exc).__name__}: {exc}", retryable=True)
            except rex.RedisError as exc:
                answered += 1
                if answered >= self.options.max_attempts:
                    log.error("redis.sink_failed", error=str(exc), events_held=events, attempts=answered)
                    raise
                return Failure("redis", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        def retrying(failure: Failure, delay: float) -> None:
            log.warning("redis.sink_retry", error=failure.message, retry_in=delay, events=events)

        await self.retry.run(attempt, on_retry=retrying)

    def _key(self, event: Event) -> str:
        tag = self.options.namespace_tag
        if tag is None:
            return self.options.stream
        if type(event) is StartEvent:
            value = event.meta.get(tag)
            key = f"{self.options.stream}:{value}" if value is not None else self.options.stream
            self._keys[event.stream] = key
            return key
        key = self._keys.get(event.stream, self.options.stream)
        if is_terminal(event):
            self._keys.pop(event.stream, None)
        return key

    def _entries(self, origin: str, batch: list[Event]) -> list[tuple[str, dict[Any, Any], int]]:
        opts = self.options
        per_key: dict[str, list[Event]] = {}
        if opts.layout == "per_stream":
            prefix = opts.stream
            marks: list[Event] = []
            for event in batch:
                per_key.setdefault(stream_key(prefix, event.stream), []).append(event)
                if type(event) is StartEvent or is_terminal(event):
                    marks.append(event)
            if marks:
                # Last in the pipeline: an edge that reads a terminal in the index finds the stream key complete.
                per_key[index_key(prefix)] = marks
        elif opts.namespace_tag is None:
            per_key[opts.stream] = batch
        else:
            for event in batch:
                per_key.setdefault(self._key(event), []).append(event)
        size = opts.entry_max_events
        beat = opts.producer_timeout_ms
        entries: list[tuple[str, dict[Any, Any], int]] = []
        for key, group in per_key.items():
            for i in range(0, len(group), size):
                chunk = group[i : i + size]
                self._counters[key] += 1
                fields = encode_entry(origin, self.producer_id, self._counters[key], chunk, heartbeat_ms=beat)
                entries.append((key, fields, len(chunk)))
        return entries

    async def _send(self, client: aioredis.Redis, origin: str, batch: list[Event]) -> None:
        self._unsent = batch
        entries = self._entries(origin, batch)
        opts = self.options
        maxlen = opts.maxlen or None
        per_stream = opts.layout == "per_stream"
        index = index_key(opts.stream)
        ttl_ms = int(opts.stream_ttl_s * 1000)
        keys = list(dict.fromkeys(key for key, _, _ in entries))
        if per_stream:
            # A stream key's epoch and expiry are stamped when this sink first writes it, when its stream
            # ends, and then every min(stream_ttl_s / 4, 60 s): not on every token (one XADD each, no more).
            now = anyio.current_time()
            ending = {stream_key(opts.stream, e.stream) for e in batch if is_terminal(e)}
            stamped = self._stamped
            keys = [k for k in keys if k == index or k in ending or stamped.get(k, 0.0) <= now]
            refresh = min(opts.stream_ttl_s / 4, 60.0)
        answers: list[Any] = []
        fresh: list[str] = []

        async def xadd() -> None:
            # The epoch goes in the same pipeline, on the same connection: if Redis
            # restarted empty, these entries land in the new key and the answer says so.
            fresh[:] = [new_epoch() for _ in keys]
            pipe = client.pipeline(transaction=False)
            for key, epoch in zip(keys, fresh, strict=True):
                pipe.set(epoch_key(key), epoch, nx=True, get=True)
            for key, fields, _ in entries:
                if per_stream and key != index:
                    pipe.xadd(key, fields, maxlen=opts.stream_maxlen, approximate=True)
                else:
                    pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
            if per_stream:
                # A stream key and its epoch live stream_ttl_s after their last stamp: the resume retention.
                for key in keys:
                    if key != index:
                        pipe.pexpire(key, ttl_ms)
                        pipe.pexpire(epoch_key(key), ttl_ms)
            answers[:] = await pipe.execute()

        await self._retrying(xadd, events=len(batch))
        self._unsent = []
        self.sent_entries += len(entries)
        self.sent_events += len(batch)
        for key, mine, answer in zip(keys, fresh, answers, strict=False):
            # No previous value: this pipeline created the epoch (a new key, or a lost one).
            self._note_epoch(key, mine if answer is None else answer.decode(errors="replace"))
        if per_stream:
            for key in keys:
                if key != index:
                    self._stamped[key] = now + refresh
            # An ended stream's key is written no more: forget its epoch, counter and stamp (bounded memory).
            for key in ending:
                self.epochs.pop(key, None)
                self._counters.pop(key, None)
                self._stamped.pop(key, None)

    def _note_epoch(self, key: str, epoch: str) -> None:
        known = self.epochs.get(key)
        self.epochs[key] = epoch
        if known is not None and epoch != known:
            log.warning(
                "redis.epoch_changed",
                key=key,
                old=known,
                new=epoch,
                note="Redis lost the key (restarted without its data, or it was deleted): "
                "entries written before that which consumers had not read are gone; "
                "consumers end the streams concerned with a redis_gap error",
            )
