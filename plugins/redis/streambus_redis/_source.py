"""The ``redis`` producer: read events from Redis streams back into a local bus."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
import orjson
import structlog

from streambus import DeltaEvent, ErrorEvent, Event, OverflowPolicy, PluginBase, StartEvent
from streambus.plugins import PositiveInt, require_readable_file, require_writable_directory
from streambus.recording import iter_recording

from ._codec import decode_events, entry_header
from ._common import (
    DEFAULT_STREAM,
    ENV_PASSWORD,
    RedisGap,
    connect,
    local_state,
    parse_id,
    redact,
    require_asyncio,
    resolve_url,
)
from ._dedup import Deduplicator, Verdict

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streambus import Bus

__all__ = ["RedisSource"]

log = structlog.get_logger("streambus.redis")

_MAX_PRODUCERS = 10_000


def _connection_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    return (rex.ConnectionError, rex.TimeoutError, OSError)


def _auth_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    return (rex.AuthenticationError, rex.AuthorizationError)


def _response_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    return (rex.ResponseError,)


def _sinks_caught_up(bus: Bus) -> bool:
    """Whether every lossless (``block``) subscriber handled all it was given.

    True when each such subscription's buffer is empty *and* its reader is
    parked waiting for more, i.e. it came back after handling its last batch.
    Only then may a position be committed without risking loss at a crash.
    """
    for sub in bus.subscriptions:
        if sub.closed or sub.overflow is not OverflowPolicy.BLOCK:
            continue
        if not sub.idle:
            return False
    return True


class RedisSource(PluginBase):
    """Republish the events found in Redis streams on the local bus (config type ``redis``).

    Two ways to read:

    * **XREAD** (``group`` unset) -- every source sees every entry, from a
      position saved under ``consumer`` (in Redis, a file, or nowhere):
      broadcasters, each recorder with its own position.
    * **Consumer group** (``group`` set) -- entries are shared among the
      group's consumers, acknowledged with ``XACK`` once local sinks handled
      them; entries a dead consumer left pending are claimed (``XAUTOCLAIM``)
      after ``claim_idle_ms``: a recorder with a standby.

    Either way events keep their ``stream``/``seq``; a de-duplicator drops
    what was already delivered, so sinks see every event once and in order.
    A position is committed only when every ``block`` sink handled all events
    before it. Connection loss is retried with backoff and reading resumes
    from the last id; entries trimmed before they were read are reported as
    a :class:`RedisGap` (log ``redis.gap``, :attr:`gaps`, and an ``error``
    event of kind ``redis_gap`` ending each stream that lost events).
    Needs asyncio. Call :meth:`stop` to end :meth:`run` cleanly.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``redis`` producer."""

        url: str | None = None
        """Redis URL; default ``$STREAMBUS_REDIS_URL`` or ``redis://127.0.0.1:6379/0``. ``rediss://`` for TLS."""
        stream: str = DEFAULT_STREAM
        """The Redis stream key."""
        namespaces: list[str] = msgspec.field(default_factory=list)
        """Read ``<stream>:<namespace>`` for each (the sink's ``namespace_tag`` keys) instead of ``stream``."""
        group: str | None = None
        """Consumer group name; unset reads with plain ``XREAD``."""
        consumer: str | None = None
        """This consumer's name (positions and pending entries are kept under it); default: host name."""
        start: Literal["last", "$", "0"] = "last"
        """``last``: resume from the saved position (else from the oldest retained entry); ``$``: new entries only;
        ``0``: everything retained."""
        position: Literal["redis", "file", "none"] = "redis"
        """Where an XREAD position (and de-duplication state) is saved."""
        position_file: str | None = None
        """The file for ``position = "file"``."""
        count: PositiveInt = 500
        """Entries per read."""
        block_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1000
        """How long one read waits for new entries."""
        commit_interval_ms: PositiveInt = 100
        """How often the position is saved / entries acknowledged."""
        claim_idle_ms: PositiveInt = 30_000
        """Group mode: claim entries another consumer left pending this long."""
        dedup_ended: PositiveInt = 100_000
        """Ended streams remembered for de-duplication."""
        seed_recording: str | None = None
        """A recording this process wrote before: its events count as delivered (a restarted recorder)."""
        tls: bool | None = None
        """Force TLS even for a ``redis://`` URL."""
        password_env: str = ENV_PASSWORD
        """The environment variable holding the password."""
        origin: str | None = None
        """Skip entries with this origin id; default: the bus's own (what its redis sinks wrote)."""
        skip_own: bool = True
        """Skip entries this bus's own sinks wrote."""

        def __post_init__(self) -> None:
            if not self.stream:
                raise ValueError("stream: must not be empty")
            if self.position == "file" and not self.position_file:
                raise ValueError('position_file: required when position = "file"')
            if self.count < 1:
                raise ValueError(f"count: must be at least 1, got {self.count}")
            if not 1 <= self.block_ms <= 60_000:
                raise ValueError(f"block_ms: must be between 1 and 60000, got {self.block_ms}")
            if self.commit_interval_ms < 1:
                raise ValueError(f"commit_interval_ms: must be at least 1, got {self.commit_interval_ms}")
            if self.claim_idle_ms < 1:
                raise ValueError(f"claim_idle_ms: must be at least 1, got {self.claim_idle_ms}")
            if self.dedup_ended < 1:
                raise ValueError(f"dedup_ended: must be at least 1, got {self.dedup_ended}")
            if self.consumer is not None and not self.consumer:
                raise ValueError("consumer: must not be empty")
            if self.group is not None and not self.group:
                raise ValueError("group: must not be empty")

    def preflight(self) -> None:
        """Check that ``seed_recording`` (when it exists yet) can be read and ``position_file``'s directory written."""
        opts = self.options
        if opts.seed_recording and Path(opts.seed_recording).exists():
            require_readable_file("seed_recording", opts.seed_recording)
        if opts.position == "file" and opts.position_file:
            require_writable_directory("position_file", Path(opts.position_file).parent)

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: RedisSource.Options = self.resolve_options(options, kwargs)
        opts = self.options
        self.keys = [f"{opts.stream}:{ns}" for ns in opts.namespaces] or [opts.stream]
        """The Redis stream keys this source reads."""
        self.consumer = opts.consumer or socket.gethostname()
        """This consumer's name."""
        self.dedup = Deduplicator(max_ended=opts.dedup_ended)
        """The (stream, seq) de-duplicator; seed it before :meth:`run` to skip what was delivered before."""
        self.gaps: list[RedisGap] = []
        """Gaps found (entries trimmed before this source read them), the last 1000."""
        self.delivered = 0
        """Events published on the local bus."""
        self.duplicates = 0
        """Events dropped as already delivered."""
        self.reconnects = 0
        """How many times the connection was lost and re-established."""
        self.positions: dict[str, str] = {}
        """The last entry id handled per key."""
        self._producers: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._unacked: dict[str, list[str]] = {}
        self._dirty = False
        self._in_entry = False
        self._gapped: set[str] = set()
        self._stopping = False
        self._read_scope: anyio.CancelScope | None = None
        self._ready = asyncio.Event()
        self._bus: Bus | None = None
        self._origin = ""
        if opts.seed_recording and Path(opts.seed_recording).exists():
            seeded = self.dedup.seed(iter_recording(opts.seed_recording, lenient=True))
            log.info("redis.seeded", recording=opts.seed_recording, events=seeded)

    # -- public control ----------------------------------------------------------
    def stop(self) -> None:
        """End :meth:`run`: stop reading, commit the final position, return."""
        self._stopping = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def wait_ready(self) -> None:
        """Wait until the start position is resolved and the first read is under way.

        With ``start = "$"``, events published after this are guaranteed to be read.
        """
        await self._ready.wait()

    @property
    def position_key(self) -> str:
        """The Redis hash holding this consumer's saved position."""
        return f"{self.options.stream}:consumer:{self.consumer}"

    # -- the producer --------------------------------------------------------------
    async def run(self, bus: Bus) -> None:
        """Read until :meth:`stop` (or cancellation), republishing on *bus*."""
        require_asyncio("the redis source")
        opts = self.options
        self._bus = bus
        self._origin = opts.origin or local_state(bus).origin
        client = connect(
            opts.url, tls=opts.tls, password_env=opts.password_env, socket_timeout=opts.block_ms / 1000 + 10
        )
        log.info(
            "redis.source_started",
            url=redact(resolve_url(opts.url)),
            keys=self.keys,
            group=opts.group,
            consumer=self.consumer,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._committer, client)
                try:
                    with anyio.CancelScope() as self._read_scope:
                        if self._stopping:
                            self._read_scope.cancel()
                        await self._read_loop(client)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True) as shield:
                shield.deadline = anyio.current_time() + 5.0
                try:
                    await self._final_commit(client)
                finally:
                    await client.aclose()

    async def _read_loop(self, client: aioredis.Redis) -> None:
        opts = self.options
        delay = 0.05
        fresh = True
        while not self._stopping:
            try:
                if fresh:
                    await self._prepare(client)
                    fresh = False
                self._ready.set()
                if opts.group is None:
                    await self._xread(client)
                else:
                    await self._xreadgroup(client)
                delay = 0.05
            except _auth_errors() as exc:
                log.error("redis.source_auth_failed", error=str(exc))
                raise
            except _response_errors() as exc:
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                # The key or the group was deleted while we read (or Redis restarted empty):
                # Redis answers NOGROUP, or UNBLOCKED to a read blocked on the deleted key. Recreate.
                log.warning("redis.group_missing", error=str(exc), group=opts.group)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                fresh = True
            except _connection_errors() as exc:
                self.reconnects += 1
                log.warning("redis.source_retry", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                fresh = True

    # -- start positions -----------------------------------------------------------
    async def _prepare(self, client: aioredis.Redis) -> None:
        """(Re)connect: resolve start positions, check for trimmed entries, create the group."""
        import redis.exceptions as rex

        opts = self.options
        if opts.group is not None:
            for key in self.keys:
                start = "$" if opts.start == "$" else "0"
                try:
                    await client.xgroup_create(key, opts.group, id=start, mkstream=True)
                except rex.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._unacked.setdefault(key, [])
            if not self.positions:
                await self._load_state(client)
            # Own pending entries first (after a restart or a dropped reply): read
            # but never acknowledged. Duplicates among them are dropped by the dedup.
            self.positions = dict.fromkeys(self.keys, "0")
            await self._check_group_trim(client)
            return
        if not self.positions:
            saved = await self._load_state(client)
            for key in self.keys:
                if opts.start == "0":
                    self.positions[key] = "0-0"
                elif opts.start == "last" and key in saved:
                    self.positions[key] = saved[key]
                elif opts.start == "last":
                    self.positions[key] = "0-0"
                else:
                    self.positions[key] = await self._last_generated(client, key)
        for key, pos in self.positions.items():
            if pos != "0-0":
                await self._check_trim(client, key, pos)

    async def _last_generated(self, client: aioredis.Redis, key: str) -> str:
        import redis.exceptions as rex

        try:
            info = await client.xinfo_stream(key)
        except rex.ResponseError:
            return "0-0"  # no such key yet: everything that comes is new
        return _s(info["last-generated-id"])

    async def _check_trim(self, client: aioredis.Redis, key: str, after: str) -> None:
        import redis.exceptions as rex

        try:
            info = await client.xinfo_stream(key)
        except rex.ResponseError:
            return
        deleted = _s(info.get("max-deleted-entry-id", "0-0"))
        if parse_id(deleted) > parse_id(after):
            first = info.get("first-entry")
            until = deleted
            log_first = _s(first[0]) if first else None
            self._report_gap(key, RedisGap(key, after, until, None, f"oldest retained entry is {log_first}"))

    async def _check_group_trim(self, client: aioredis.Redis) -> None:
        import redis.exceptions as rex

        for key in self.keys:
            try:
                info = await client.xinfo_stream(key)
                groups = await client.xinfo_groups(key)
            except rex.ResponseError:
                continue
            deleted = _s(info.get("max-deleted-entry-id", "0-0"))
            for group in groups:
                if _s(group["name"]) != self.options.group:
                    continue
                delivered = _s(group["last-delivered-id"])
                if parse_id(deleted) > parse_id(delivered) and delivered != "0-0":
                    self._report_gap(key, RedisGap(key, delivered, deleted, None, "group fell behind trimming"))

    # -- reading -----------------------------------------------------------------------
    async def _xread(self, client: aioredis.Redis) -> None:
        opts = self.options
        response: Any = await client.xread(self.positions, count=opts.count, block=opts.block_ms)  # type: ignore[arg-type]
        for key_b, entries in response or ():
            key = _s(key_b)
            for entry_id_b, fields in entries:
                entry_id = _s(entry_id_b)
                self._in_entry = True
                try:
                    await self._handle(key, entry_id, fields, check_counter=True)
                finally:
                    self._in_entry = False
                self.positions[key] = entry_id
                self._dirty = True

    async def _xreadgroup(self, client: aioredis.Redis) -> None:
        opts = self.options
        assert opts.group is not None
        response: Any = await client.xreadgroup(
            opts.group,
            self.consumer,
            self.positions,  # type: ignore[arg-type]
            count=opts.count,
            block=opts.block_ms,
        )
        for key_b, entries in response or ():
            key = _s(key_b)
            if not entries and self.positions.get(key) != ">":
                self.positions[key] = ">"  # own pending entries done: now new ones
                continue
            for entry_id_b, fields in entries:
                entry_id = _s(entry_id_b)
                if self.positions.get(key) != ">":
                    self.positions[key] = entry_id
                await self._handle_group_entry(key, entry_id, fields)

    async def _handle_group_entry(self, key: str, entry_id: str, fields: Any) -> None:
        self._in_entry = True
        try:
            if not fields:
                # Pending, but trimmed away before it was handled.
                self._report_gap(key, RedisGap(key, entry_id, entry_id, 1, "pending entry was trimmed"))
            else:
                await self._handle(key, entry_id, fields, check_counter=False)
        finally:
            self._in_entry = False
        self._unacked[key].append(entry_id)
        self._dirty = True

    async def _claim(self, client: aioredis.Redis) -> None:
        opts = self.options
        assert opts.group is not None
        for key in self.keys:
            start = "0-0"
            for _ in range(100):  # bounded sweep of the pending list
                reply: Any = await client.xautoclaim(
                    key, opts.group, self.consumer, opts.claim_idle_ms, start_id=start, count=opts.count
                )
                start = _s(reply[0])
                claimed = reply[1]
                deleted = reply[2] if len(reply) > 2 else []
                for entry_id_b, fields in claimed:
                    entry_id = _s(entry_id_b)
                    log.info("redis.claimed", key=key, id=entry_id)
                    await self._handle_group_entry(key, entry_id, fields)
                for entry_id_b in deleted:
                    entry_id = _s(entry_id_b)
                    self._report_gap(key, RedisGap(key, entry_id, entry_id, 1, "pending entry was trimmed"))
                if start == "0-0":
                    break

    async def _handle(self, key: str, entry_id: str, fields: Any, *, check_counter: bool) -> None:
        header = entry_header(key, entry_id, fields)
        if header is None:
            return
        origin, producer, counter = header
        if self.options.skip_own and origin == self._origin:
            return
        if check_counter and producer:
            ident = (key, producer)
            last = self._producers.get(ident)
            if last is not None:
                if counter <= last:
                    # The sink re-sent it after a dropped connection: skip it undecoded.
                    self.duplicates += fields[b"e"].count(b"\n")
                    return
                if counter > last + 1:
                    lost = counter - last - 1
                    after = self.positions.get(key, "0-0")
                    self._report_gap(key, RedisGap(key, after, entry_id, lost, f"sender {producer} skipped"))
            self._producers[ident] = counter
            self._producers.move_to_end(ident)
            if len(self._producers) > _MAX_PRODUCERS:
                self._producers.popitem(last=False)
        events, _ = decode_events(key, entry_id, fields[b"e"])
        bus = self._bus
        assert bus is not None
        local = local_state(bus)
        foreign = local.foreign
        dedup = self.dedup
        check = dedup.check
        publish = bus.publish
        new = Verdict.NEW
        gapped = key in self._gapped
        delivered = 0
        live = dedup._last
        try:
            for event in events:
                stream = event.stream
                if type(event) is DeltaEvent and live.get(stream, -2) == event.seq - 1:
                    # The common case, inlined: the next delta of a known live stream.
                    live[stream] = event.seq
                    if stream not in foreign:
                        local.mark_foreign(stream)
                    await publish(event)
                    delivered += 1
                    continue
                if gapped and event.seq > 0 and type(event) is not StartEvent and not dedup.knows(event.stream):
                    # After a gap, a stream first met in its middle lost its beginning.
                    await self._end_with_gap(event.stream, key, event)
                    continue
                verdict = check(event)
                if verdict is new:
                    if event.stream not in foreign:
                        local.mark_foreign(event.stream)
                    await publish(event)
                    delivered += 1
                elif verdict is Verdict.DUPLICATE:
                    self.duplicates += 1
                else:
                    await self._end_with_gap(event.stream, key, event)
        finally:
            self.delivered += delivered

    async def _end_with_gap(self, stream: str, key: str, event: Event) -> None:
        last = self.dedup.last(stream)
        seq = (last if last is not None else -1) + 1
        low = event.seq_range[0] if isinstance(event, DeltaEvent) else event.seq
        message = (
            f"events {seq}..{low - 1} of this stream never arrived from Redis "
            "(trimmed before this consumer read them, or undecodable: see the redis.gap / redis.bad_event logs)"
        )
        log.error("redis.stream_gap", key=key, stream=stream, missing_from=seq, resumed_at=low)
        # Everything later of this stream is dropped: it already has its terminal event here.
        self.dedup.end(stream, max(event.seq, seq))
        bus = self._bus
        assert bus is not None
        await bus.publish(
            ErrorEvent(stream=stream, seq=seq, ts=time.time(), kind="redis_gap", message=message, retryable=False)
        )

    def _report_gap(self, key: str, gap: RedisGap) -> None:
        self.gaps.append(gap)
        del self.gaps[:-1000]  # the most recent ones; every gap is logged anyway
        self._gapped.add(key)
        log.error("redis.gap", key=key, after=gap.after, until=gap.until, lost=gap.lost, error=str(gap))

    # -- positions -----------------------------------------------------------------------
    async def _committer(self, client: aioredis.Redis) -> None:
        opts = self.options
        interval = opts.commit_interval_ms / 1000
        next_claim = anyio.current_time() + opts.claim_idle_ms / 2000
        while True:
            await anyio.sleep(interval)
            try:
                await self._commit(client)
                if opts.group is not None and anyio.current_time() >= next_claim:
                    next_claim = anyio.current_time() + opts.claim_idle_ms / 2000
                    await self._claim(client)
            except _connection_errors() as exc:
                log.warning("redis.commit_retry", error=f"{type(exc).__name__}: {exc}")
            except _response_errors() as exc:
                if "NOGROUP" in str(exc):
                    # The group went away with its pending list: nothing left to acknowledge.
                    for ids in self._unacked.values():
                        ids.clear()
                    log.warning("redis.group_missing", error=str(exc), group=opts.group)
                else:
                    log.error("redis.commit_failed", error=f"{type(exc).__name__}: {exc}")

    async def _commit(self, client: aioredis.Redis) -> bool:
        """Save positions / acknowledge entries if every lossless sink caught up; return whether it did."""
        if not self._dirty or self._in_entry:
            return False
        bus = self._bus
        if bus is not None and not _sinks_caught_up(bus):
            return False
        # Snapshot now, synchronously: this is exactly what the sinks have handled.
        positions = dict(self.positions)
        unacked = {key: ids for key, ids in self._unacked.items() if ids}
        for key in unacked:
            self._unacked[key] = []
        state = self._state(positions)
        self._dirty = False
        try:
            if unacked:
                assert self.options.group is not None
                pipe = client.pipeline(transaction=False)
                for key, ids in unacked.items():
                    pipe.xack(key, self.options.group, *ids)
                await pipe.execute()
            await self._save_state(client, state)
        except BaseException:
            for key, ids in unacked.items():
                self._unacked[key] = ids + self._unacked[key]
            self._dirty = True
            raise
        return True

    async def _final_commit(self, client: aioredis.Redis) -> None:
        # Let lossless sinks finish what they were given, then commit once more.
        bus = self._bus
        while bus is not None and self._dirty and not _sinks_caught_up(bus):  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.01)
        try:
            await self._commit(client)
        except _connection_errors() as exc:
            log.warning("redis.final_commit_failed", error=f"{type(exc).__name__}: {exc}")

    def _state(self, positions: dict[str, str]) -> dict[str, Any]:
        return {
            "positions": positions if self.options.group is None else {},
            "dedup": self.dedup.snapshot(),
            "producers": [[k, p, c] for (k, p), c in list(self._producers.items())[-1000:]],
            "saved": time.time(),
        }

    async def _save_state(self, client: aioredis.Redis, state: dict[str, Any]) -> None:
        opts = self.options
        data = orjson.dumps(state)
        if opts.position == "redis":
            await client.set(self.position_key, data)
        elif opts.position == "file":
            assert opts.position_file is not None
            await anyio.to_thread.run_sync(_write_atomic, Path(opts.position_file), data)

    async def _load_state(self, client: aioredis.Redis) -> dict[str, str]:
        opts = self.options
        raw: bytes | None = None
        if opts.position == "redis":
            raw = await client.get(self.position_key)  # type: ignore[assignment]
        elif opts.position == "file":
            assert opts.position_file is not None
            raw = await anyio.to_thread.run_sync(_read_if_exists, Path(opts.position_file))
        if not raw:
            return {}
        try:
            state = orjson.loads(raw)
            self.dedup.restore(state.get("dedup") or {})
            for key, producer, counter in state.get("producers") or ():
                self._producers[(key, producer)] = int(counter)
            positions = {str(k): str(v) for k, v in (state.get("positions") or {}).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("redis.bad_position", where=opts.position, error=str(exc))
            return {}
        log.info("redis.resumed", consumer=self.consumer, positions=positions)
        return positions


def _read_if_exists(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
