"""The ``redis`` sink: publish the bus's events to a Redis stream."""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

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
    local_state,
    new_epoch,
    redact,
    require_asyncio,
    resolve_url,
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

        def __post_init__(self) -> None:
            if not self.stream:
                raise ValueError("stream: must not be empty")
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
        log.info("redis.sink_started", url=redact(resolve_url(opts.url)), stream=opts.stream, origin=origin)
        limit = opts.batch_max_events
        wait = opts.batch_max_ms / 1000
        try:
            await self._connect(client)
            if self._unsent:
                # What a failed run could not send goes first, in order.
                await self._send(client, origin, self._unsent)
            while True:
                batch = await events.receive_batch(limit)
                if not batch:
                    return
                ended = False
                if wait and len(batch) < limit:
                    with anyio.move_on_after(wait):
                        while len(batch) < limit:
                            more = await events.receive_batch(limit - len(batch))
                            if not more:
                                ended = True
                                break
                            batch.extend(more)
                if foreign:
                    batch = [e for e in batch if e.stream not in foreign]
                if batch:
                    await self._send(client, origin, batch)
                if ended:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

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
        per_key: dict[str, list[Event]] = {}
        if self.options.namespace_tag is None:
            per_key[self.options.stream] = batch
        else:
            for event in batch:
                per_key.setdefault(self._key(event), []).append(event)
        size = self.options.entry_max_events
        entries: list[tuple[str, dict[Any, Any], int]] = []
        for key, group in per_key.items():
            for i in range(0, len(group), size):
                chunk = group[i : i + size]
                self._counters[key] += 1
                entries.append((key, encode_entry(origin, self.producer_id, self._counters[key], chunk), len(chunk)))
        return entries

    async def _send(self, client: aioredis.Redis, origin: str, batch: list[Event]) -> None:
        self._unsent = batch
        entries = self._entries(origin, batch)
        keys = list(dict.fromkeys(key for key, _, _ in entries))
        maxlen = self.options.maxlen or None
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
                pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
            answers[:] = await pipe.execute()

        await self._retrying(xadd, events=len(batch))
        self._unsent = []
        self.sent_entries += len(entries)
        self.sent_events += len(batch)
        for key, mine, answer in zip(keys, fresh, answers, strict=False):
            # No previous value: this pipeline created the epoch (a new key, or a lost one).
            self._note_epoch(key, mine if answer is None else answer.decode(errors="replace"))

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
