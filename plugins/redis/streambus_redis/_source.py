"""The ``redis`` producer: read events from Redis streams back into a local bus."""

from __future__ import annotations

import asyncio
import contextlib
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

from streambus import DeltaEvent, ErrorEvent, Event, OverflowPolicy, PluginBase, StartEvent, encode, is_terminal
from streambus.archive import attach_archive, detach_archive, interested
from streambus.dedup import Deduplicator, Verdict
from streambus.plugins import PositiveInt, require_readable_file, require_writable_directory
from streambus.recording import iter_recording

from ._codec import decode_events, entry_header
from ._common import (
    DEFAULT_STREAM,
    ENV_PASSWORD,
    RedisGap,
    as_str,
    connect,
    epoch_key,
    heartbeat_key,
    index_key,
    local_state,
    new_epoch,
    parse_id,
    redact,
    require_asyncio,
    resolve_url,
    stream_key,
)
from ._readers import GroupReader, Hooks, InterestReader, Reader, XReadReader, last_generated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streambus import Bus

__all__ = ["RedisSource"]

log = structlog.get_logger("streambus.redis")

_MAX_PRODUCERS = 10_000
_LOST_ORIGIN = "streambus:producer_lost"

# Appends a producer_lost terminal to a stream key (and the index) only if its sender's heartbeat is
# still gone and nothing was appended since the consumer read the key's last entry: a sender that came
# back, or another consumer that declared it first, wins. KEYS: stream key, index, heartbeat key;
# ARGV: the last entry id read, the origin marker, the encoded error event.
_DECLARE_LOST = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 or last[1][1] ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[1], '*', 'o', ARGV[2], 'p', '', 'c', 0, 'e', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'o', ARGV[2], 'p', '', 'c', 0, 'e', ARGV[3])
return 1
"""


class _Doubt:
    """A live stream that may have lost events.

    Settled by its next event (or its sender's next entry, in sequence);
    ended once the reader passed ``until`` and the grace period is over.
    """

    __slots__ = ("by_sender", "deadline", "history", "last", "reason", "until")

    def __init__(self, last: int, until: dict[str, str], history: bool, reason: str, deadline: float) -> None:
        self.last = last
        self.until = until  # per key: the entry id the reader must pass before the stream is given up
        self.history = history  # a re-read event at or below ``last`` proves the key still holds the stream
        self.reason = reason
        self.deadline = deadline  # not given up before this (anyio clock): a live sender re-sends what it held
        self.by_sender = True  # False once its sender is known to have lost entries


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
    from the last id. Entries lost before they were read (trimmed, or the
    key lost with Redis's data: its epoch changed) are reported as a
    :class:`RedisGap` (log ``redis.gap``, :attr:`gaps`), and every stream
    that may have lost events ends with one ``error`` event of kind
    ``redis_gap`` naming what is missing; so does a stream first met in its
    middle. Needs asyncio. Call :meth:`stop` to end :meth:`run` cleanly.
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
        position: Literal["auto", "redis", "file", "none"] = "auto"
        """Where an XREAD position (with the key epochs and de-duplication state) is saved; ``auto``: a file when
        ``position_file`` or ``seed_recording`` is set, else Redis (which cannot survive Redis losing its data)."""
        position_file: str | None = None
        """The state file; default ``<seed_recording>.redis-position`` (beside the recording)."""
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
        gap_grace_ms: int = 5000
        """After a gap, how long a stream that may have lost events waits for its next event (or its sender's next
        entry) before it ends with a ``redis_gap`` error. Covers a sink that re-sends what it held while Redis was
        down."""
        layout: Literal["single", "per_stream"] = "single"
        """The sink's layout. ``per_stream``: read the index ``<stream>:index`` (starts and ends, ``start`` applies
        to it) and only the stream keys ``follow`` selects; the source also answers edges' resumes from Redis
        (:class:`streambus.archive.StreamArchive`)."""
        follow: Literal["interested", "all"] = "interested"
        """``per_stream``: ``interested`` reads a stream's key when a sink on the bus wants it
        (:func:`streambus.archive.interested`, e.g. a websocket client's filter matches its start) or asks for it;
        ``all`` reads every stream that starts (a recorder)."""
        fetch_max_entries: PositiveInt = 10_000
        """``per_stream``: the most entries one resume reads from a stream key; a longer stream is not recovered."""
        starts_remembered: PositiveInt = 10_000
        """``per_stream``: live streams remembered from the index (for subscribers that arrive after a start)."""
        read_linger_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
        """After a read that found entries, wait this long before the next one, so the tokens of many streams
        share a read: less CPU per token (an edge following few streams reads one entry per token otherwise),
        up to this much more latency. 0: read again at once. ``per_stream``: Redis times the wait (a blocking
        read sent with the read, so the edge wakes once per read instead of twice); a Redis with no other
        traffic times it late, so a wait that reaches twice this long is ended from the edge, which then
        times the next waits itself (up to about a second of them)."""

        def __post_init__(self) -> None:
            if not self.stream:
                raise ValueError("stream: must not be empty")
            if self.position == "file" and not self.position_file and not self.seed_recording:
                raise ValueError('position_file: required when position = "file" (or set seed_recording)')
            if self.position_file is not None and self.position in ("redis", "none"):
                raise ValueError(f'position_file: only used with position = "file" or "auto", not "{self.position}"')
            if self.count < 1:
                raise ValueError(f"count: must be at least 1, got {self.count}")
            if not 1 <= self.block_ms <= 60_000:
                raise ValueError(f"block_ms: must be between 1 and 60000, got {self.block_ms}")
            if self.commit_interval_ms < 1:
                raise ValueError(f"commit_interval_ms: must be at least 1, got {self.commit_interval_ms}")
            if self.claim_idle_ms < 1:
                raise ValueError(f"claim_idle_ms: must be at least 1, got {self.claim_idle_ms}")
            if not 0 <= self.gap_grace_ms <= 600_000:
                raise ValueError(f"gap_grace_ms: must be between 0 and 600000, got {self.gap_grace_ms}")
            if not 0 <= self.read_linger_ms <= 1000:
                raise ValueError(f"read_linger_ms: must be between 0 and 1000, got {self.read_linger_ms}")
            if self.dedup_ended < 1:
                raise ValueError(f"dedup_ended: must be at least 1, got {self.dedup_ended}")
            if self.consumer is not None and not self.consumer:
                raise ValueError("consumer: must not be empty")
            if self.group is not None and not self.group:
                raise ValueError("group: must not be empty")
            if self.layout == "per_stream" and self.group is not None:
                raise ValueError('group: not supported with layout = "per_stream" (each reader follows its streams)')
            if self.layout == "per_stream" and self.namespaces:
                raise ValueError('namespaces: not used with layout = "per_stream" (every stream has its own key)')

    def preflight(self) -> None:
        """Check that ``seed_recording`` (when it exists yet) can be read and ``position_file``'s directory written."""
        opts = self.options
        if opts.seed_recording and Path(opts.seed_recording).exists():
            require_readable_file("seed_recording", opts.seed_recording)
        if opts.position in ("auto", "file") and (opts.position_file or opts.seed_recording):
            # The position file is written beside the recording unless position_file names another.
            state_file = Path(opts.position_file or f"{opts.seed_recording}.redis-position")
            require_writable_directory("position_file", state_file.parent)

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: RedisSource.Options = self.resolve_options(options, kwargs)
        opts = self.options
        self.per_stream = opts.layout == "per_stream"
        """Whether this source reads the ``per_stream`` layout (the index and the followed streams' keys)."""
        self.index = index_key(opts.stream)
        """``per_stream``: the key of the index of starts and ends."""
        if self.per_stream:
            self.keys = [self.index]
        else:
            self.keys = [f"{opts.stream}:{ns}" for ns in opts.namespaces] or [opts.stream]
        """The Redis stream keys this source reads (``per_stream``: the index and the followed streams' keys)."""
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
        self.epochs: dict[str, str] = {}
        """The epoch (incarnation id, see :func:`epoch_key`) of each key as last read."""
        self.state_file: Path | None = None
        """Where the position is saved when it is kept in a file (``None``: in Redis, or nowhere)."""
        self.store: Literal["redis", "file", "none"] = "redis" if opts.position == "auto" else opts.position
        """Where the position is saved: ``redis``, ``file`` or ``none``."""
        if opts.position in ("auto", "file") and (opts.position_file or opts.seed_recording):
            self.store = "file"
            self.state_file = Path(opts.position_file or f"{opts.seed_recording}.redis-position")
        self._owners: dict[str, tuple[str, str]] = {}
        self._doubts: dict[str, _Doubt] = {}
        self._settled: set[tuple[str, str]] = set()  # senders whose streams were cleared since the last gap
        self._producers: OrderedDict[tuple[str, str], int] = OrderedDict()
        hooks = Hooks(restore=self._load_state, vouch=self._doubt_unvouched, entry=self._handle, gap=self._report_gap)
        self.wake_key = f"{opts.stream}:wake:{self.consumer}:{new_epoch()}"
        """``per_stream``: the private key that ends a blocked read when a stream is followed."""
        self._reader: Reader
        self._interest: InterestReader | None = None
        if self.per_stream:
            self._reader = self._interest = InterestReader(self.keys, opts, hooks, self.wake_key, self._nudge)
        elif opts.group is None:
            self._reader = XReadReader(self.keys, opts, hooks)
        else:
            self._reader = GroupReader(self.keys, opts, hooks, self.consumer)
        self.followed: dict[str, str] = {}
        """``per_stream``: the stream keys read now, with their stream ids."""
        self._to_follow: dict[str, str] = {}
        self._to_unfollow: set[str] = set()
        self._closing: dict[str, int] = {}  # followed streams whose terminal the index showed
        self._starts: OrderedDict[str, StartEvent] = OrderedDict()
        self._beats: OrderedDict[str, int] = OrderedDict()  # sender -> heartbeat timeout (ms), from entries' "h"
        self._connected_at: float | None = None
        self._epochs_due = 0.0
        self._beats_due = 0.0  # per_stream: when the heartbeat keys go with a read next (loop clock)
        self._beats_read = asyncio.Event()  # per_stream: a read brought _beats_values
        self._beats_values: tuple[list[str], list[Any]] = ([], [])
        # sender -> (when its heartbeat was first seen gone, {key: that key's head then})
        self._suspects: dict[str, tuple[float, dict[str, str]]] = {}
        self._wake = asyncio.Event()  # set: end a blocked read (an entry on the wake key), see _waker
        self._side: aioredis.Redis | None = None
        self._read_client: aioredis.Redis | None = None  # per_stream: the interest reader's (no socket_timeout)
        self.lost_producers: list[str] = []
        """Senders declared lost (heartbeat gone), the last 1000."""
        self._dirty = False
        self._busy = 0  # >0 while events are being handled: no commit then
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
    def positions(self) -> dict[str, str]:
        """The id each key is read from next: the last entry handled (a group: ``0`` while own pending entries
        are re-read, then ``>``)."""
        return self._reader.positions

    @property
    def linger_overruns(self) -> int:
        """``per_stream`` with ``read_linger_ms``: waits that Redis, idle, did not end in time, so this source did."""
        return self._interest.overruns if self._interest is not None else 0

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
        if self.per_stream:
            self._side = connect(opts.url, tls=opts.tls, password_env=opts.password_env, socket_timeout=10.0)
            self._read_client = connect(opts.url, tls=opts.tls, password_env=opts.password_env)
            attach_archive(bus, self)
        try:
            async with anyio.create_task_group() as tg:
                if self.store != "none" or not self._reader.sees_all:
                    # An edge (no position saved, nothing to acknowledge) has nothing to commit: no timer.
                    tg.start_soon(self._committer, client)
                if self._reader.sees_all:
                    # A group member sees part of each key: it cannot tell a lost sender's last entries read.
                    tg.start_soon(self._watch_producers, client)
                if self._side is not None:
                    tg.start_soon(self._waker, self._side)
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
                    read_client, self._read_client = self._read_client, None
                    with contextlib.suppress(Exception):
                        await self._reader.release(read_client or client)
                    if read_client is not None:
                        await read_client.aclose()
                    await client.aclose()
                    if self._side is not None:
                        detach_archive(bus, self)
                        with contextlib.suppress(Exception):
                            await self._side.delete(self.wake_key)
                        await self._side.aclose()

    async def _read_loop(self, client: aioredis.Redis) -> None:
        opts = self.options
        delay = 0.05
        fresh = True
        linger_ms = 0  # how long the next read waits first: read_linger_ms after a read that found entries
        while not self._stopping:
            try:
                if fresh:
                    await self._reader.prepare(client)
                    fresh = False
                    self._connected_at = anyio.current_time()
                self._ready.set()
                lingering, linger_ms = linger_ms, 0
                if await self._read(client, lingering):
                    linger_ms = opts.read_linger_ms
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
                self._connected_at = None
                self._suspects.clear()  # an absence counts only while it is seen continuously
                self._epochs_due = 0.0  # Redis may come back without its data: the first read asks the epochs
                self.reconnects += 1
                log.warning("redis.source_retry", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                fresh = True

    # -- start positions -----------------------------------------------------------
    async def _doubt_unvouched(self, client: aioredis.Redis) -> None:
        """Streams known live (seeded, restored) with no saved epoch to vouch for the key: put them in doubt.

        Without the epoch the key had when they were delivered, nothing says the
        key still holds them (Redis may have lost it while this process was
        down). Reading on settles each: its history re-read, or its next event,
        proves it; one still unsettled when the reader reaches the head ends
        with a ``redis_gap`` error.
        """
        live = self.dedup.live
        for key in self.keys:
            vouched = key in self.epochs
            head: str | None = None
            unvouched = 0
            for stream, last in live.items():
                doubt = self._doubts.get(stream)
                if (doubt is None and vouched) or not self._may_belong(stream, key, None):
                    continue
                if head is None:
                    head = await last_generated(client, key)
                if doubt is None:
                    reason = f"no saved epoch of {key} vouches that Redis still holds it"
                    self._doubts[stream] = _Doubt(last, {key: head}, True, reason, self._deadline())
                    unvouched += 1
                else:
                    doubt.until[key] = head
            if unvouched:
                log.warning("redis.unvouched", key=key, streams=unvouched, until=head, store=self.store)

    # -- epochs ------------------------------------------------------------------------
    def _epochs_to_ask(self) -> dict[str, str | None]:
        """The keys whose epoch goes with this read: each with the fresh id offered (``None``: only read).

        ``single`` layout: every key, every read (``SET <key>#epoch <fresh> NX GET``). ``per_stream``: a
        followed key's loss also shows as a hole in its stream's seqs (or its sender's entry counter), and
        the index's as starts and ends that never come, while Redis gives entries written after a loss
        higher ids than any read before it; so their epochs are asked once a second (and for a key not
        known yet), not with every read of every token. A followed key's epoch is only read (``GET``): its
        sink creates it, with the key's expiry; a reader creating one would outlive the key.
        """
        fresh: dict[str, str | None] = {}
        followed = self.followed
        due = False
        if self.per_stream:
            now = asyncio.get_running_loop().time()  # anyio.current_time() on asyncio, without its look-up per read
            due = now >= self._epochs_due
            if due:
                self._epochs_due = now + 1.0
        for key in self.keys:
            if key in followed:
                if due or key not in self.epochs:
                    fresh[key] = None
            elif not self.per_stream or due or key not in self.epochs:
                fresh[key] = new_epoch()
        return fresh

    @staticmethod
    def _epoch_commands(fresh: dict[str, str | None]) -> list[tuple[str, ...]]:
        """:meth:`_queue_epochs`'s commands, to send as they are (``per_stream``'s reads)."""
        return [
            ("GET", epoch_key(key)) if epoch is None else ("SET", epoch_key(key), epoch, "NX", "GET")
            for key, epoch in fresh.items()
        ]

    @staticmethod
    def _queue_epochs(pipe: Any, fresh: dict[str, str | None]) -> None:
        for key, epoch in fresh.items():
            if epoch is None:
                pipe.get(epoch_key(key))
            else:
                pipe.set(epoch_key(key), epoch, nx=True, get=True)

    async def _check_epochs(self, client: aioredis.Redis, fresh: dict[str, str | None], answers: list[Any]) -> set[str]:
        """Compare each key's epoch with the one known; return the keys that were lost and recreated."""
        changed: set[str] = set()
        for key, answer in zip(fresh, answers, strict=True):
            epoch = fresh[key] if answer is None else as_str(answer)
            known = self.epochs.get(key)
            if epoch is None:
                if known is None:
                    continue  # a followed key not written yet (or already expired): nothing known, nothing lost
                epoch = "(gone)"
            if known == epoch:
                continue
            if known is None:
                self.epochs[key] = epoch
                self._dirty = True
                continue
            changed.add(key)
            head = await last_generated(client, key)
            # From here to the position reset, no await: a commit sees all or none of it.
            after = self.positions.get(key, "0-0")
            how = (
                f"the key was lost and recreated, epoch {known} -> {epoch}: "
                "Redis restarted without its data, or the key was deleted"
            )
            self.epochs[key] = epoch
            self._report_gap(RedisGap(key, after, None, None, how), head)
            self._reader.restart(key)
            self._dirty = True
        return changed

    # -- reading -----------------------------------------------------------------------
    async def _read(self, client: aioredis.Redis, linger_ms: int = 0) -> bool:
        """One read of every key, *linger_ms* from now (``read_linger_ms``); return whether any key had entries.

        ``per_stream``: Redis times the linger (see :meth:`InterestReader.read`), and the epochs due
        go in the same write, after the read; a key followed just now is read at once. Otherwise a
        local timer, then a pipeline with the epochs of every key.
        """
        interest = self._interest
        followed_now = bool(self._to_follow)
        if self._to_follow or self._to_unfollow:
            self._apply_follows()  # an ended stream's key is read no more from now, even if the source stops
        if linger_ms and interest is not None and not followed_now:
            linger_ms = await interest.linger(linger_ms)  # 0 once it lingered here (after an overrun)
        elif linger_ms:
            if interest is None:
                await asyncio.sleep(linger_ms / 1000)
            linger_ms = 0
        if linger_ms == 0 and (self._to_follow or self._to_unfollow):
            self._apply_follows()  # followed while it lingered here
        # The epochs come from the same connection (the same server run) right after the
        # entries: a key lost before or while the read blocked shows as a changed epoch
        # (per_stream: at most a second later, see _epochs_to_ask).
        fresh = self._epochs_to_ask()
        answers: list[Any] = []
        if interest is not None:
            read_client = self._read_client or client
            after = self._epoch_commands(fresh)
            senders = self._heartbeats_due()
            if senders:
                after.append(("MGET", *(heartbeat_key(self.options.stream, p) for p in senders)))
            response, answers = await interest.read(read_client, linger_ms, after)
            if senders:
                self._beats_values = (senders, answers.pop())
                self._beats_read.set()
        else:
            pipe = client.pipeline(transaction=False)
            self._reader.queue_read(pipe)
            self._queue_epochs(pipe, fresh)
            response, *answers = await pipe.execute()
        self._busy += 1
        try:
            # The epochs first: handling the entries publishes them, and a reader that has all it
            # wanted may stop the source right then; a lost key must be reported before that.
            # A changed key is read again from its start (what is handled below comes back as
            # duplicates): entries of a new key may sit below the old position.
            changed = await self._check_epochs(client, fresh, answers)
            answered = await self._reader.take(response)
            for key in changed:
                self._reader.restart(key)  # taking moved the position on: back to the new key's start
            if self._doubts:
                await self._settle_doubts(set(self.keys) - answered - changed)
            if self._closing:
                await self._close_followed(answered)
            return bool(answered)
        finally:
            self._busy -= 1

    async def _handle(self, key: str, entry_id: str, fields: Any) -> None:
        """Republish the events of one entry that are new; report what it shows was lost."""
        self._dirty = True
        if not fields:
            # Pending in a group, but trimmed away before it was handled.
            self._report_gap(RedisGap(key, entry_id, entry_id, 1, "pending entry was trimmed"), entry_id)
            return
        header = entry_header(key, entry_id, fields)
        if header is None:
            return
        origin, producer, counter = header
        if self.options.skip_own and origin == self._origin:
            return
        if producer and b"h" in fields:
            self._note_heartbeat(producer, fields[b"h"])
        if self.per_stream and key == self.index:
            self._handle_index(key, entry_id, fields)
            return
        # Only a consumer that sees every entry can tell a skipped counter from entries read by another.
        if self._reader.sees_all and producer:
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
                    gap = RedisGap(key, after, entry_id, lost, f"sender {producer} skipped")
                    # This entry is the first after the hole: streams of that sender it does not settle end here.
                    self._report_gap(gap, entry_id, producer=producer)
                elif self._doubts and ident not in self._settled:
                    self._settle_sender(key, producer)
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
        accept_next = dedup.accept_next
        publish = bus.publish
        doubts = self._doubts
        # Every XREAD consumer sees every entry, so a stream met in its middle lost its beginning;
        # in a group the beginning may simply have gone to another consumer.
        whole = self._reader.sees_all
        delivered = 0
        try:
            for event in events:
                stream = event.stream
                if type(event) is DeltaEvent and accept_next(stream, event.seq):
                    # The usual case: the next delta of a known live stream.
                    if doubts:
                        doubts.pop(stream, None)  # its next event arrived: nothing of it was lost
                    if stream not in foreign:
                        local.mark_foreign(stream)
                    await publish(event)
                    delivered += 1
                    continue
                low = event.seq_range[0] if type(event) is DeltaEvent else event.seq
                if whole and low > 0 and not dedup.knows(stream):
                    await self._end_with_gap(stream, key, event)
                    continue
                verdict = dedup.check(event)
                if verdict is Verdict.NEW:
                    if doubts:
                        doubts.pop(stream, None)
                    if type(event) is StartEvent:
                        self._owners[stream] = (key, producer)
                    elif is_terminal(event):
                        self._owners.pop(stream, None)
                        if self.followed:
                            self._unfollow(stream)
                    if stream not in foreign:
                        local.mark_foreign(stream)
                    await publish(event)
                    delivered += 1
                elif verdict is Verdict.DUPLICATE:
                    self.duplicates += 1
                    doubt = doubts.get(stream) if doubts else None
                    if doubt is not None and doubt.history and event.seq <= doubt.last:
                        del doubts[stream]  # the key still holds this stream's history
                else:
                    await self._end_with_gap(stream, key, event)
        finally:
            self.delivered += delivered

    async def _end_with_gap(self, stream: str, key: str, event: Event) -> None:
        last = self.dedup.last(stream)
        seq = (last if last is not None else -1) + 1
        low = event.seq_range[0] if isinstance(event, DeltaEvent) else event.seq
        message = (
            f"events {seq}..{low - 1} of this stream never arrived from {key} after entry "
            f"{self.positions.get(key, '0-0')} (lost in Redis before this consumer read them, or undecodable: "
            "see the redis.gap / redis.bad_event logs)"
        )
        log.error("redis.stream_gap", key=key, stream=stream, missing_from=seq, resumed_at=low)
        # Everything later of this stream is dropped: it already has its terminal event here.
        await self._end_stream(stream, seq, max(event.seq, seq), message)

    async def _end_stream(
        self, stream: str, seq: int, last: int, message: str, *, kind: str = "redis_gap", retryable: bool = False
    ) -> None:
        self.dedup.end(stream, last)
        self._doubts.pop(stream, None)
        self._owners.pop(stream, None)
        if self.followed:
            self._unfollow(stream)
        bus = self._bus
        assert bus is not None
        local_state(bus).mark_foreign(stream)  # a redis sink on this bus must not send it back
        await bus.publish(
            ErrorEvent(stream=stream, seq=seq, ts=time.time(), kind=kind, message=message, retryable=retryable)
        )

    def _deadline(self) -> float:
        return anyio.current_time() + self.options.gap_grace_ms / 1000

    def _settle_sender(self, key: str, producer: str) -> None:
        """The sender's next entry came in sequence: none of its entries was lost, so none of its streams."""
        owner = (key, producer)
        settled = [s for s, d in self._doubts.items() if d.by_sender and self._owners.get(s) == owner]
        for stream in settled:
            del self._doubts[stream]
        self._settled.add(owner)  # once per sender and gap: a scan per entry would cost O(doubts) each

    def _may_belong(self, stream: str, key: str, producer: str | None) -> bool:
        owner = self._owners.get(stream)
        # A stream of unknown origin (seeded, restored from an older state) may belong to any key and sender.
        return owner is None or (owner[0] == key and (producer is None or owner[1] == producer))

    def _report_gap(self, gap: RedisGap, until: str, *, producer: str | None = None) -> None:
        """Log *gap*, keep it, and put every live stream that may have lost events in it in doubt.

        Each such stream is settled by its next event (or, unless *producer*
        is the sender that lost entries, by its sender's next entry in
        sequence), or ends with a ``redis_gap`` error once the reader has
        passed *until* on the gap's key and ``gap_grace_ms`` is over without
        meeting it (its tail, ``end`` included, was lost).
        """
        self.gaps.append(gap)
        del self.gaps[:-1000]  # the most recent ones; every gap is logged anyway
        log.error("redis.gap", key=gap.key, after=gap.after, until=gap.until, lost=gap.lost, error=str(gap))
        self._settled.clear()
        key = gap.key
        for stream, last in self.dedup.live.items():
            if not self._may_belong(stream, key, producer):
                continue
            doubt = self._doubts.get(stream)
            if doubt is None:
                doubt = self._doubts[stream] = _Doubt(last, {key: until}, False, str(gap), self._deadline())
            else:
                doubt.history = False
                doubt.deadline = self._deadline()
                if key not in doubt.until or parse_id(until) > parse_id(doubt.until[key]):
                    doubt.until[key] = until
            if producer is not None:
                doubt.by_sender = False  # that sender did lose entries: only the stream's own next event settles it

    async def _settle_doubts(self, caught_up: set[str]) -> None:
        """End the doubted streams the reader has passed the gap for without meeting their next event."""
        if not self._doubts:
            return
        live = self.dedup.live
        now = anyio.current_time()
        done = [
            stream
            for stream, doubt in self._doubts.items()
            if now >= doubt.deadline and all(self._passed(key, until, caught_up) for key, until in doubt.until.items())
        ]
        for stream in done:
            doubt = self._doubts.pop(stream)
            if stream not in live:
                continue  # ended meanwhile
            seq = live[stream] + 1
            where = ", ".join(f"{key} up to {until}" for key, until in doubt.until.items())
            message = (
                f"events from {seq} on of this stream were lost in Redis: read {where} "
                f"without finding event {seq} ({doubt.reason})"
            )
            log.error("redis.stream_gap", stream=stream, missing_from=seq, reason=doubt.reason, searched=where)
            await self._end_stream(stream, seq, seq, message)

    def _passed(self, key: str, until: str, caught_up: set[str]) -> bool:
        if key in caught_up:
            return True
        position = self.positions.get(key, "0-0")
        if position in (">", "0"):
            return False
        return parse_id(position) >= parse_id(until)

    # -- per_stream: following, the archive, the index ------------------------------------
    def follow(self, stream: str) -> None:
        """Read *stream*'s key from its first entry (``per_stream``); its events arrive through the bus.

        Part of :class:`streambus.archive.StreamArchive`. Nothing happens in
        the ``single`` layout (every event is read anyway) or when the stream
        is followed already. Following ends once its terminal event is delivered.
        """
        if not self.per_stream:
            return
        key = stream_key(self.options.stream, stream)
        if key in self.followed or key in self._to_follow:
            return
        self._to_unfollow.discard(key)
        self._to_follow[key] = stream
        self._wake.set()

    def live_starts(self) -> list[StartEvent]:
        """The ``start`` of the streams the index showed begun and not ended (newest last; ``per_stream``)."""
        return list(self._starts.values())

    async def fetch(self, stream: str) -> list[Event] | None:
        """Every event of *stream* its key retains, from its ``start`` on, gap-free; else ``None``.

        Part of :class:`streambus.archive.StreamArchive` (``per_stream`` only;
        ``None`` in the ``single`` layout). Reads the key and its epoch in one
        pipeline on a connection of its own: the key expired or never held
        the stream, its beginning was trimmed, an event is missing (Redis
        lost entries and the sender went on), or the stream is longer than
        ``fetch_max_entries``: ``None``, and the edge answers "not recovered".
        """
        side = self._side
        if side is None:
            return None
        key = stream_key(self.options.stream, stream)
        limit = self.options.fetch_max_entries
        pipe = side.pipeline(transaction=False)
        pipe.get(epoch_key(key))
        pipe.xrange(key, count=limit + 1)
        try:
            epoch, entries = await pipe.execute()
        except _connection_errors() as exc:
            log.warning("redis.fetch_failed", stream=stream, error=f"{type(exc).__name__}: {exc}")
            return None
        if not entries or epoch is None or len(entries) > limit:
            return None
        events: list[Event] = []
        expected = 0
        for entry_id_b, fields in entries:
            entry_id = as_str(entry_id_b)
            if entry_header(key, entry_id, fields) is None:
                continue
            decoded, bad = decode_events(key, entry_id, fields[b"e"])
            if bad:
                return None
            for event in decoded:
                if event.stream != stream or event.seq < expected:
                    continue  # re-sent after a dropped connection, or two consumers declared the same loss
                low = event.seq_range[0] if type(event) is DeltaEvent else event.seq
                if low != expected:
                    log.info("redis.fetch_hole", stream=stream, key=key, missing_from=expected, found=low)
                    return None
                events.append(event)
                expected = event.seq + 1
                if is_terminal(event):
                    return events
        return events

    def _unfollow(self, stream: str) -> None:
        key = stream_key(self.options.stream, stream)
        self._to_follow.pop(key, None)
        if key in self.followed:
            self._to_unfollow.add(key)

    def _apply_follows(self) -> None:
        """Between reads: add the keys asked for, drop the ones whose stream ended."""
        positions = self._reader.positions
        for key in self._to_unfollow:
            stream = self.followed.pop(key, None)
            if stream is None:
                continue
            self.keys.remove(key)
            positions.pop(key, None)
            self.epochs.pop(key, None)
            self._closing.pop(stream, None)
        self._to_unfollow.clear()
        for key, stream in self._to_follow.items():
            if key in self.followed:
                continue
            self.followed[key] = stream
            self.keys.append(key)
            positions[key] = "0-0"  # from the stream's start: what was delivered already is dropped as duplicate
        self._to_follow.clear()
        self._dirty = True

    def _handle_index(self, key: str, entry_id: str, fields: Any) -> None:
        """Starts and terminals of every stream: remember the live ones, follow the wanted ones."""
        events, _ = decode_events(key, entry_id, fields[b"e"])
        bus = self._bus
        assert bus is not None
        starts = self._starts
        follow_all = self.options.follow == "all"
        for event in events:
            stream = event.stream
            if type(event) is StartEvent:
                starts[stream] = event
                starts.move_to_end(stream)
                if len(starts) > self.options.starts_remembered:
                    starts.popitem(last=False)
                if not self.dedup.knows(stream) and (follow_all or interested(bus, event)):
                    self.follow(stream)
            elif is_terminal(event):
                starts.pop(stream, None)
                skey = stream_key(self.options.stream, stream)
                if skey in self.followed or skey in self._to_follow:
                    self._closing[stream] = event.seq

    async def _close_followed(self, answered: set[str]) -> None:
        """Followed streams the index says ended, whose key had nothing more to read: end or drop them."""
        prefix = self.options.stream
        live = self.dedup.live
        for stream in list(self._closing):
            key = stream_key(prefix, stream)
            if key in answered or key in self._to_follow or stream in self._doubts:
                continue  # more to read, not read yet, or a gap's grace period decides
            del self._closing[stream]
            if stream in live:
                # Its key ended before its terminal: expired, or lost with Redis's data.
                message = (
                    f"events from {live[stream] + 1} on of this stream are gone from {key} "
                    "(the index shows it ended; the key expired or Redis lost it)"
                )
                log.error("redis.stream_gap", key=key, stream=stream, missing_from=live[stream] + 1)
                await self._end_stream(stream, live[stream] + 1, live[stream] + 1, message)
            else:
                self._unfollow(stream)

    def _nudge(self) -> None:
        self._wake.set()

    async def _waker(self, side: aioredis.Redis) -> None:
        """End a blocked read when a stream was followed: one entry on the private wake key."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                pipe = side.pipeline(transaction=False)
                pipe.xadd(self.wake_key, {"w": 1}, maxlen=10, approximate=False)
                pipe.pexpire(self.wake_key, 600_000)
                await pipe.execute()
            except _connection_errors() as exc:
                log.debug("redis.wake_failed", error=f"{type(exc).__name__}: {exc}")

    # -- producer_lost -------------------------------------------------------------------
    def _note_heartbeat(self, producer: str, value: bytes) -> None:
        try:
            timeout = int(value)
        except ValueError:
            return
        beats = self._beats
        if beats.get(producer) != timeout:
            beats[producer] = timeout
        beats.move_to_end(producer)
        if len(beats) > _MAX_PRODUCERS:
            beats.popitem(last=False)

    def _check_interval(self) -> float:
        # A tenth of the shortest heartbeat timeout (0.2 s to 1 s): a sender is judged lost only after
        # its key stayed gone a whole timeout, so checking more often than that buys nothing.
        return min(1.0, max(0.2, min(self._beats.values(), default=2000) / 10_000))

    def _senders_to_check(self) -> list[str]:
        """The senders of live streams whose heartbeat keys are to be looked at (none while disconnected)."""
        if not self._beats or self._connected_at is None:
            return []
        live = self.dedup.live
        beats = self._beats
        return sorted({owner[1] for stream, owner in self._owners.items() if stream in live and owner[1] in beats})

    def _heartbeats_due(self) -> list[str]:
        """``per_stream``: the senders whose heartbeat keys go with this read (see :meth:`_watch_producers`)."""
        now = asyncio.get_running_loop().time()
        if now < self._beats_due:
            return []
        self._beats_due = now + self._check_interval()
        return self._senders_to_check()

    async def _watch_producers(self, client: aioredis.Redis) -> None:
        """End the live streams of senders whose heartbeat key expired with an ``error`` of kind ``producer_lost``.

        ``per_stream``: the heartbeat keys (``MGET``) go with a read (the read loop hands their values
        over), not on a timer of their own: an edge reading every few ms would wake for the timer and for
        the reply twice a second. Reads blocked longer than twice the interval (nothing to read) leave
        the check to this task again.
        """
        while True:
            interval = self._check_interval()
            names: list[str] | None = None
            if self._interest is not None:
                with anyio.move_on_after(2 * interval):
                    await self._beats_read.wait()
                if self._beats_read.is_set():
                    self._beats_read.clear()
                    names, values = self._beats_values
            else:
                await anyio.sleep(interval)
            if names is None:
                names = self._senders_to_check()
                if not names:
                    continue
                try:
                    values = await client.mget([heartbeat_key(self.options.stream, p) for p in names])
                except _connection_errors() as exc:
                    log.debug("redis.heartbeat_check_failed", error=f"{type(exc).__name__}: {exc}")
                    self._suspects.clear()  # an absence counts only while it is seen continuously
                    continue
            now = anyio.current_time()
            for producer, value in zip(names, values, strict=True):
                connected = self._connected_at
                # After (re)connecting, a sender gets its whole timeout to beat again: Redis may have
                # restarted without the key, and the sender reconnects on its own schedule.
                if value is not None or connected is None or now - connected < self._beats[producer] / 1000:
                    self._suspects.pop(producer, None)
                    continue
                suspect = self._suspects.get(producer)
                if suspect is None:
                    # Gone: note how far its keys reach now. Its streams are judged once the key has stayed
                    # gone for a whole timeout more (a sender that lost its key with Redis's data beats again
                    # within moments of Redis coming back) and this source has read that far (a lagging
                    # consumer first reads the ends the sender wrote before it stopped).
                    keys = {owner[0] for stream, owner in self._owners.items() if owner[1] == producer}
                    try:
                        heads = {key: await last_generated(client, key) for key in keys}
                    except _connection_errors():
                        continue
                    self._suspects[producer] = (now, heads)
                    continue
                since, heads = suspect
                if now - since < self._beats[producer] / 1000:
                    continue
                positions = self.positions
                if all(parse_id(positions.get(key, "0-0")) >= parse_id(head) for key, head in heads.items()):
                    del self._suspects[producer]
                    await self._producer_lost(client, producer)

    async def _producer_lost(self, client: aioredis.Redis, producer: str) -> None:
        timeout = self._beats.get(producer, 0)
        live = self.dedup.live
        streams = [s for s, owner in list(self._owners.items()) if owner[1] == producer and s in live]
        for stream in streams:
            last = self.dedup.last(stream)
            owner = self._owners.get(stream)
            if last is None or stream not in self.dedup.live or owner is None:
                continue
            seq = last + 1
            message = (
                f"the producer of this stream (sender {producer}) stopped: no heartbeat for {timeout} ms "
                f"(killed, or cut off from Redis); nothing after seq {last} will come"
            )
            if self.per_stream:
                key = owner[0]
                error = ErrorEvent(
                    stream=stream, seq=seq, ts=time.time(), kind="producer_lost", message=message, retryable=True
                )
                keys = [key, self.index, heartbeat_key(self.options.stream, producer)]
                after = self.positions.get(key, "0-0")
                try:
                    done = await client.eval(_DECLARE_LOST, 3, *keys, after, _LOST_ORIGIN, encode(error))
                except _connection_errors() as exc:
                    log.debug("redis.declare_lost_failed", error=f"{type(exc).__name__}: {exc}")
                    return
                # 1: written, read back like any entry (every edge sees the same terminal); -1: the key moved on
                # since this consumer read it (read it first); 0: the sender beats again.
                if done == 1:
                    log.error("redis.producer_lost", stream=stream, sender=producer, timeout_ms=timeout, seq=seq)
                    self._note_lost(producer)
                    self._wake.set()
            else:
                log.error("redis.producer_lost", stream=stream, sender=producer, timeout_ms=timeout, seq=seq)
                self._note_lost(producer)
                self._busy += 1
                try:
                    await self._end_stream(stream, seq, seq, message, kind="producer_lost", retryable=True)
                finally:
                    self._busy -= 1

    def _note_lost(self, producer: str) -> None:
        if producer not in self.lost_producers:
            self.lost_producers.append(producer)
            del self.lost_producers[:-1000]

    # -- positions -----------------------------------------------------------------------
    async def _committer(self, client: aioredis.Redis) -> None:
        interval = self.options.commit_interval_ms / 1000
        while True:
            await anyio.sleep(interval)
            try:
                await self._commit(client)
                await self._reader.tend(client)
            except _connection_errors() as exc:
                log.warning("redis.commit_retry", error=f"{type(exc).__name__}: {exc}")
            except _response_errors() as exc:
                log.error("redis.commit_failed", error=f"{type(exc).__name__}: {exc}")

    async def _commit(self, client: aioredis.Redis) -> bool:
        """Save positions / acknowledge entries if every lossless sink caught up; return whether it did."""
        if not self._dirty or self._busy:
            return False
        if self.store == "none" and self._reader.sees_all:
            self._dirty = False  # nothing is saved and nothing acknowledged (an edge): no state to build
            return False
        bus = self._bus
        if bus is not None and not _sinks_caught_up(bus):
            return False
        # Snapshot now, synchronously: this is exactly what the sinks have handled.
        acks = self._reader.take_acks()
        state = self._state(self._reader.saved_positions())
        self._dirty = False
        try:
            await self._reader.acknowledge(client, acks)
            await self._save_state(client, state)
        except BaseException:
            self._reader.give_back(acks)
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
        # The epochs say which incarnation of each key the positions point into;
        # owners and doubts let a restarted consumer end exactly the streams a gap concerns.
        dedup = self.dedup.snapshot()
        return {
            "positions": positions,
            "epochs": dict(self.epochs),
            "dedup": dedup,
            "owners": {s: list(self._owners[s]) for s in dedup["live"] if s in self._owners},
            "doubts": {s: d.last for s, d in self._doubts.items()},
            "producers": [[k, p, c] for (k, p), c in list(self._producers.items())[-1000:]],
            "saved": time.time(),
        }

    async def _save_state(self, client: aioredis.Redis, state: dict[str, Any]) -> None:
        data = orjson.dumps(state)
        if self.store == "redis":
            await client.set(self.position_key, data)
        elif self.state_file is not None:
            await anyio.to_thread.run_sync(_write_atomic, self.state_file, data)

    async def _load_state(self, client: aioredis.Redis) -> dict[str, str]:
        """Load the saved state; return the saved positions that the saved epoch of their key vouches for."""
        raw: bytes | None = None
        if self.store == "redis":
            raw = await client.get(self.position_key)  # type: ignore[assignment]
        elif self.state_file is not None:
            raw = await anyio.to_thread.run_sync(_read_if_exists, self.state_file)
        if not raw:
            return {}
        try:
            state = orjson.loads(raw)
            self.dedup.restore(state.get("dedup") or {})
            for key, producer, counter in state.get("producers") or ():
                self._producers[(key, producer)] = int(counter)
            positions = {str(k): str(v) for k, v in (state.get("positions") or {}).items()}
            epochs = {str(k): str(v) for k, v in (state.get("epochs") or {}).items()}
            owners = {str(s): (str(k), str(p)) for s, (k, p) in (state.get("owners") or {}).items()}
            doubts = {str(s): int(last) for s, last in (state.get("doubts") or {}).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("redis.bad_position", where=self.store, file=str(self.state_file), error=str(exc))
            return {}
        self.epochs.update(epochs)
        live = self.dedup.live
        self._owners.update((s, owner) for s, owner in owners.items() if s in live)
        for stream, last in doubts.items():
            if stream in live:
                reason = "it was in doubt when this consumer stopped"
                self._doubts[stream] = _Doubt(last, {}, False, reason, self._deadline())
        log.info("redis.resumed", consumer=self.consumer, positions=positions, epochs=epochs)
        # A position without the epoch of its key vouches for nothing: such keys start over (see _doubt_unvouched).
        return {key: position for key, position in positions.items() if key in self.epochs}


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
