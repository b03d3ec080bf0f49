"""The redis source's two ways of reading: plain ``XREAD``, and a consumer group.

A reader only moves entries: it decides where to start, queues the read
command, walks the reply, and (in a group) acknowledges and claims. Every
entry goes to the source through :class:`Hooks`; the source owns
de-duplication, gap handling, republishing and when to commit.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import redis.exceptions as rex
import structlog

from ._common import RedisGap, as_str, parse_id

try:  # redis[hiredis], a dependency of this plugin; redis-py's own packer otherwise
    from hiredis import pack_command
except ImportError:  # pragma: no cover - hiredis is installed with the plugin
    pack_command = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._source import RedisSource

__all__ = ["GroupReader", "Hooks", "InterestReader", "Reader", "XReadReader", "last_generated"]

log = structlog.get_logger("streambus.redis")

_MAX_LOCAL = 64  # the most reads in a row that linger locally after overruns (see InterestReader.linger)


@dataclasses.dataclass(frozen=True, slots=True)
class Hooks:
    """What the source does for its reader."""

    restore: Callable[[aioredis.Redis], Awaitable[dict[str, str]]]
    """Load the saved state; returns the saved positions that a saved epoch vouches for."""
    vouch: Callable[[aioredis.Redis], Awaitable[None]]
    """Put in doubt the live streams no saved epoch vouches for."""
    entry: Callable[[str, str, Any], Awaitable[None]]
    """Handle one entry ``(key, entry id, fields)``: de-duplicate and republish its events."""
    gap: Callable[[RedisGap, str], None]
    """Report a gap; the id is how far the reader must get before giving up the streams it concerns."""


async def last_generated(client: aioredis.Redis, key: str) -> str:
    """The id of the newest entry ever added to *key* (``0-0`` when there is no such key)."""
    try:
        info = await client.xinfo_stream(key)
    except rex.ResponseError:
        return "0-0"  # no such key yet: everything that comes is new
    return as_str(info["last-generated-id"])


class Reader(abc.ABC):
    """One way of reading the source's keys; see :class:`XReadReader` and :class:`GroupReader`."""

    sees_all: ClassVar[bool]
    """Whether this consumer sees every entry of its keys: then a sender's entry counter jumping, or a
    stream met in its middle, means entries were lost (in a group they may have gone to another consumer)."""

    def __init__(self, keys: list[str], options: RedisSource.Options, hooks: Hooks) -> None:
        self.keys = keys
        self.options = options
        self.hooks = hooks
        self.positions: dict[str, str] = {}
        """The id each key is read from next."""

    @abc.abstractmethod
    async def prepare(self, client: aioredis.Redis) -> None:
        """(Re)connected: resolve the start positions and report what was lost meanwhile."""

    @abc.abstractmethod
    def queue_read(self, pipe: Any) -> None:
        """Queue one blocking read of every key on *pipe*."""

    @abc.abstractmethod
    async def take(self, response: Any) -> set[str]:
        """Hand the entries of a read's *response* to the source; return the keys that answered."""

    @abc.abstractmethod
    def restart(self, key: str) -> None:
        """*key* was lost and recreated: read it again from its start."""

    @abc.abstractmethod
    def saved_positions(self) -> dict[str, str]:
        """The positions to save with the source's state (a copy)."""

    def take_acks(self) -> dict[str, list[str]]:
        """The entry ids handled since the last commit, per key; they are the caller's to acknowledge."""
        return {}

    async def acknowledge(self, client: aioredis.Redis, acks: dict[str, list[str]]) -> None:
        """Acknowledge *acks* (from :meth:`take_acks`)."""
        return  # nothing to acknowledge outside a group

    def give_back(self, acks: dict[str, list[str]]) -> None:
        """Acknowledging *acks* failed: keep them for the next commit."""
        return

    async def tend(self, client: aioredis.Redis) -> None:
        """Periodic upkeep, between commits."""
        return

    async def release(self, client: aioredis.Redis) -> None:
        """Give back what the reader holds of *client* (the source stops)."""
        return


class XReadReader(Reader):
    """Plain ``XREAD`` from a saved position: every source sees every entry."""

    sees_all = True

    async def prepare(self, client: aioredis.Redis) -> None:
        """Resolve the start positions once (``start``, the saved state), then look for trimmed entries."""
        opts = self.options
        if not self.positions:
            saved = await self.hooks.restore(client)
            positions = {}
            for key in self.keys:
                if opts.start == "0":
                    positions[key] = "0-0"
                elif opts.start == "last":
                    positions[key] = saved.get(key, "0-0")  # without a vouched position: all that is retained
                else:
                    positions[key] = await last_generated(client, key)
            await self.hooks.vouch(client)
            # Only now: if the connection dropped above, the next attempt starts over.
            self.positions = positions
        for key, pos in self.positions.items():
            if pos != "0-0":
                await self._check_trim(client, key, pos)

    def read_positions(self) -> dict[str, str]:
        """Where the next ``XREAD`` reads each key from."""
        return self.positions

    def queue_read(self, pipe: Any) -> None:
        """Queue ``XREAD`` from the positions."""
        pipe.xread(self.read_positions(), count=self.options.count, block=self.options.block_ms)

    async def take(self, response: Any) -> set[str]:
        """Hand over each entry, then move its key's position past it."""
        answered: set[str] = set()
        for key_b, entries in response or ():
            key = as_str(key_b)
            if entries:
                answered.add(key)
            for entry_id_b, fields in entries:
                entry_id = as_str(entry_id_b)
                await self.hooks.entry(key, entry_id, fields)
                self.positions[key] = entry_id
        return answered

    def restart(self, key: str) -> None:
        """Read *key* from ``0-0``: the new key's entries may have ids below the old position."""
        self.positions[key] = "0-0"

    def saved_positions(self) -> dict[str, str]:
        """The positions themselves: XREAD keeps no state in Redis."""
        return dict(self.positions)

    async def _check_trim(self, client: aioredis.Redis, key: str, after: str) -> None:
        try:
            info = await client.xinfo_stream(key)
        except rex.ResponseError:
            return
        deleted = as_str(info.get("max-deleted-entry-id", "0-0"))
        head = as_str(info["last-generated-id"])
        if parse_id(deleted) > parse_id(after):
            first = info.get("first-entry")
            log_first = as_str(first[0]) if first else None
            self.hooks.gap(RedisGap(key, after, deleted, None, f"trimmed; oldest retained entry is {log_first}"), head)
        elif parse_id(head) < parse_id(after):
            # Same epoch, but the key is behind what this consumer read: Redis restarted from an
            # older save (RDB interval, AOF everysec); what followed that save is gone.
            how = f"the key went back to {head}: Redis restarted from a save older than its last writes"
            self.hooks.gap(RedisGap(key, head, None, None, how), head)


class InterestReader(XReadReader):
    """``XREAD`` of a changing set of keys (the index and the followed streams) plus a private wake key.

    The source adds and removes keys between reads; a read already blocked
    returns as soon as :attr:`wake_key` gets an entry, so a stream followed
    meanwhile is read at once instead of after ``block_ms``.
    """

    def __init__(
        self, keys: list[str], options: RedisSource.Options, hooks: Hooks, wake_key: str, nudge: Callable[[], None]
    ) -> None:
        super().__init__(keys, options, hooks)
        self.wake_key = wake_key
        self.wake_position = "0-0"
        self.nudge = nudge
        """Ends a blocked read from outside (an entry on :attr:`wake_key`); the source's follows use it too."""
        self.overruns = 0
        """Lingers that Redis did not end in time (it was idle), so this side ended them (see :meth:`read`)."""
        self._backoff = 0  # overruns in a row (doubling the reads that linger locally, up to _MAX_LOCAL)
        self._local_reads = 0  # reads left that linger on a local timer
        self._conn: Any = None  # the connection reads go to (see read)

    async def linger(self, linger_ms: int) -> int:
        """Before a read *linger_ms* from now: how long Redis is to wait first (:meth:`read`'s *linger_ms*).

        After an overrun the next read lingers here on a local timer instead (then this returns 0), after
        each further overrun in a row twice as many (up to 64, about a second at 20 ms): a Redis with no
        other traffic costs a nudge about once a second, one late once (descheduled on a busy host) a read.
        """
        if self._local_reads:
            self._local_reads -= 1
            await asyncio.sleep(linger_ms / 1000)
            return 0
        return linger_ms

    def read_positions(self) -> dict[str, str]:
        """The positions, the wake key included."""
        positions = dict(self.positions)
        positions[self.wake_key] = self.wake_position
        return positions

    async def read(
        self, client: aioredis.Redis, linger_ms: int = 0, after: list[tuple[str, ...]] | None = None
    ) -> tuple[Any, list[Any]]:
        """``XREAD`` of every key on a connection this reader keeps (see :meth:`release`), *linger_ms* from now.

        Returns the entries and the replies to the commands *after* (the
        source's epochs), sent in the same write right after the read.

        An edge reads about once per ``read_linger_ms`` for as long as its
        clients' streams run, so the client's per-command work (taking a pooled
        connection, retries, reply callbacks) would cost more CPU than the read
        itself: the command goes straight to the connection, and the reply is
        shaped as redis-py's ``xread`` shapes it. *client* is best made without
        a ``socket_timeout``: one timer (``block_ms`` + 10 s) bounds the send
        and the reply together, where redis-py would run the send as a task of
        its own under ``wait_for``. A failed, timed-out or cancelled read leaves
        the connection disconnected (redis-py does that, and this method for an
        error reply); the next read connects it again.

        With *linger_ms*, Redis times the linger: the read goes after an
        ``XREAD BLOCK linger_ms`` of the wake key alone, in the same write, and
        Redis runs it as soon as that wait ends (the linger is over, or a
        follow woke it). The edge then wakes once per read instead of twice
        (its own timer, then the reply). Redis ends blocking waits on time
        while it serves any traffic, but an idle Redis only on its ``hz`` timer
        (up to 100 ms late by default): a wait still running at twice the
        linger is ended from here (:attr:`nudge`), and if it was really still
        blocked then (one of :attr:`overruns`), the next reads linger on a
        local timer (:meth:`linger`).
        """
        conn = self._conn
        if conn is None:
            conn = self._conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        positions = self.read_positions()
        opts = self.options
        args: Any = ("XREAD", "COUNT", opts.count, "BLOCK", opts.block_ms, "STREAMS", *positions, *positions.values())
        packed = _pack(conn, args)
        if linger_ms:
            packed = _pack(conn, ("XREAD", "BLOCK", linger_ms, "STREAMS", self.wake_key, self.wake_position)) + packed
        for command in after or ():
            packed += _pack(conn, command)
        async with asyncio.timeout((opts.block_ms + linger_ms) / 1000 + 10):  # TimeoutError (OSError): reconnect
            await conn.send_packed_command(packed)
            try:
                if linger_ms:
                    await self._linger(conn, linger_ms)
                reply = await conn.read_response(timeout=math.inf)  # bounded by the timer above
                answers = [await conn.read_response(timeout=math.inf) for _ in after or ()]
            except rex.ResponseError:
                await conn.disconnect()  # a reply may be left unread: the next read starts on a new connection
                raise
        return _xread_entries(reply), answers

    async def _linger(self, conn: Any, linger_ms: int) -> None:
        """Wait for the end of the linger Redis times (the answer to its ``XREAD BLOCK`` of the wake key)."""
        loop = asyncio.get_running_loop()
        nudged = False

        def end_it() -> None:
            nonlocal nudged
            nudged = True
            self.nudge()

        late = loop.call_later(2 * linger_ms / 1000, end_it)
        try:
            woken = await conn.read_response(timeout=math.inf)
        finally:
            late.cancel()
        if nudged and woken:
            # The nudge's entry on the wake key ended the wait, not Redis's timeout. (One that came after
            # Redis's own answer, this process being slow to run, only cuts the next linger short.)
            self.overruns += 1
            self._backoff = self._local_reads = min(2 * self._backoff or 1, _MAX_LOCAL)
        else:
            self._backoff = 0

    async def release(self, client: aioredis.Redis) -> None:
        """Give the reading connection back to *client*'s pool (the source stops)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await client.connection_pool.release(conn)

    async def take(self, response: Any) -> set[str]:
        """Skip the wake key's entries (they only ended the wait), hand over the rest."""
        kept = []
        for key_b, entries in response or ():
            if as_str(key_b) == self.wake_key:
                if entries:
                    self.wake_position = as_str(entries[-1][0])
                continue
            kept.append((key_b, entries))
        return await super().take(kept)


def _pack(conn: Any, args: Any) -> list[bytes]:
    """One command in RESP: hiredis packs the ~30 arguments of a read in C, redis-py's packer in Python."""
    return [pack_command(args)] if pack_command is not None else list(conn.pack_command(*args))


def _xread_entries(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any] | None]]]]:
    """A raw ``XREAD`` reply (RESP2: pairs; RESP3: a map) as ``[(key, [(entry id, fields), ...]), ...]``."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out = []
    for key, entries in pairs:
        shaped: list[tuple[Any, dict[Any, Any] | None]] = []
        for entry_id, raw in entries:
            if raw is None:
                shaped.append((entry_id, None))
            else:
                it = iter(raw)
                shaped.append((entry_id, dict(zip(it, it, strict=False))))
        out.append((key, shaped))
    return out


class GroupReader(Reader):
    """A consumer group: entries shared among its consumers, acknowledged with ``XACK`` once handled.

    Entries a dead consumer left pending are claimed (``XAUTOCLAIM``) after ``claim_idle_ms``.
    """

    sees_all = False

    def __init__(self, keys: list[str], options: RedisSource.Options, hooks: Hooks, consumer: str) -> None:
        super().__init__(keys, options, hooks)
        assert options.group is not None
        self.group = options.group
        self.consumer = consumer
        self.unacked: dict[str, list[str]] = {key: [] for key in keys}
        self._next_claim: float | None = None

    async def prepare(self, client: aioredis.Redis) -> None:
        """Create the group where missing, restore the saved state once, re-read own pending entries first."""
        start = "$" if self.options.start == "$" else "0"
        for key in self.keys:
            try:
                await client.xgroup_create(key, self.group, id=start, mkstream=True)
            except rex.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        if not self.positions:
            await self.hooks.restore(client)
        # Own pending entries first (after a restart or a dropped reply): read
        # but never acknowledged. Duplicates among them are dropped by the dedup.
        self.positions = dict.fromkeys(self.keys, "0")
        await self._check_trim(client)

    def queue_read(self, pipe: Any) -> None:
        """Queue ``XREADGROUP`` from the positions (``0``: own pending entries, ``>``: new ones)."""
        opts = self.options
        pipe.xreadgroup(self.group, self.consumer, self.positions, count=opts.count, block=opts.block_ms)

    async def take(self, response: Any) -> set[str]:
        """Hand over each entry and keep its id to acknowledge; an empty pending list switches to ``>``."""
        answered: set[str] = set()
        for key_b, entries in response or ():
            key = as_str(key_b)
            if not entries and self.positions.get(key) != ">":
                self.positions[key] = ">"  # own pending entries done: now new ones
                answered.add(key)
                continue
            if entries:
                answered.add(key)
            for entry_id_b, fields in entries:
                entry_id = as_str(entry_id_b)
                if self.positions.get(key) != ">":
                    self.positions[key] = entry_id
                await self._take(key, entry_id, fields)
        return answered

    async def _take(self, key: str, entry_id: str, fields: Any) -> None:
        await self.hooks.entry(key, entry_id, fields)
        self.unacked[key].append(entry_id)

    def restart(self, key: str) -> None:
        """Re-read *key*'s pending entries; the old ones went with the old key."""
        self.positions[key] = "0"
        self.unacked[key].clear()

    def saved_positions(self) -> dict[str, str]:
        """Nothing: the group keeps its position in Redis."""
        return {}

    def take_acks(self) -> dict[str, list[str]]:
        """The ids handled since the last commit, per key (cleared here)."""
        acks = {key: ids for key, ids in self.unacked.items() if ids}
        for key in acks:
            self.unacked[key] = []
        return acks

    async def acknowledge(self, client: aioredis.Redis, acks: dict[str, list[str]]) -> None:
        """``XACK`` *acks* in one pipeline."""
        if not acks:
            return
        pipe = client.pipeline(transaction=False)
        for key, ids in acks.items():
            pipe.xack(key, self.group, *ids)
        with self._group_may_vanish():
            await pipe.execute()

    def give_back(self, acks: dict[str, list[str]]) -> None:
        """Put *acks* back in front of what was handled since."""
        for key, ids in acks.items():
            self.unacked[key] = ids + self.unacked[key]

    async def tend(self, client: aioredis.Redis) -> None:
        """Claim what other consumers left pending, every ``claim_idle_ms / 2``."""
        interval = self.options.claim_idle_ms / 2000
        now = anyio.current_time()
        if self._next_claim is None:
            self._next_claim = now + interval
        if now < self._next_claim:
            return
        self._next_claim = now + interval
        with self._group_may_vanish():
            await self._claim(client)

    @contextlib.contextmanager
    def _group_may_vanish(self) -> Iterator[None]:
        try:
            yield
        except rex.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group went away with its pending list: nothing left to acknowledge.
            for ids in self.unacked.values():
                ids.clear()
            log.warning("redis.group_missing", error=str(exc), group=self.group)

    async def _claim(self, client: aioredis.Redis) -> None:
        opts = self.options
        for key in self.keys:
            start = "0-0"
            for _ in range(100):  # bounded sweep of the pending list
                reply: Any = await client.xautoclaim(
                    key, self.group, self.consumer, opts.claim_idle_ms, start_id=start, count=opts.count
                )
                start = as_str(reply[0])
                for entry_id_b, fields in reply[1]:
                    entry_id = as_str(entry_id_b)
                    log.info("redis.claimed", key=key, id=entry_id)
                    await self._take(key, entry_id, fields)
                for entry_id_b in reply[2] if len(reply) > 2 else []:
                    entry_id = as_str(entry_id_b)
                    self.hooks.gap(RedisGap(key, entry_id, entry_id, 1, "pending entry was trimmed"), entry_id)
                if start == "0-0":
                    break

    async def _check_trim(self, client: aioredis.Redis) -> None:
        for key in self.keys:
            try:
                info = await client.xinfo_stream(key)
                groups = await client.xinfo_groups(key)
            except rex.ResponseError:
                continue
            deleted = as_str(info.get("max-deleted-entry-id", "0-0"))
            for group in groups:
                if as_str(group["name"]) != self.group:
                    continue
                delivered = as_str(group["last-delivered-id"])
                if parse_id(deleted) > parse_id(delivered) and delivered != "0-0":
                    gap = RedisGap(key, delivered, deleted, None, "group fell behind trimming")
                    self.hooks.gap(gap, as_str(info["last-generated-id"]))
