"""The ``nats`` producer: read events from NATS JetStream back into a local bus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
import orjson
import structlog

from streambus import DeltaEvent, ErrorEvent, Event, OverflowPolicy, PluginBase, StartEvent, is_terminal
from streambus.archive import attach_archive, detach_archive, interested
from streambus.dedup import Deduplicator, Verdict
from streambus.plugins import NonNegativeInt, PositiveInt, require_readable_file, require_writable_directory
from streambus.producing import Failure, RetryPolicy
from streambus.recording import iter_recording

from ._codec import HEADER_ORIGIN, HEADER_PRODUCER, decode_events
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_STREAM_NAME,
    NatsAuthFailed,
    NatsGap,
    NatsHeaderParserUnsupported,
    check_prefix,
    connect,
    event_subject,
    events_wildcard,
    index_stream_name,
    index_wildcard,
    local_state,
    redact,
    require_asyncio,
    resolve_url,
)

if TYPE_CHECKING:
    import nats.aio.client
    import nats.aio.msg
    import nats.js

    from streambus import Bus

__all__ = ["NatsSource"]

log = structlog.get_logger("streambus.nats")

_MAX_PRODUCERS = 10_000
_STATUS = "Status"
_CONTROL = "100"
_PENDING_BYTES = 64 << 20  # bytes the source holds before it drops more (they are read again from JetStream)
_NO_STREAM_POLL = 0.2  # seconds between two looks for a JetStream stream that does not exist (yet)


class _Doubt(msgspec.Struct):
    """A live stream that may have lost events in a gap: settled by its next event, else ended."""

    until: int  # the stream sequence the reader must pass before the stream is given up
    deadline: float  # not given up before this (anyio clock): a live sink re-sends what it held
    reason: str


def _sinks_caught_up(bus: Bus) -> bool:
    """Whether every lossless (``block``) subscriber handled all it was given (then a position may be committed)."""
    for sub in bus.subscriptions:
        if sub.closed or sub.overflow is not OverflowPolicy.BLOCK:
            continue
        if not sub.idle:
            return False
    return True


def _retryable_errors() -> tuple[type[BaseException], ...]:
    import nats.errors

    return (nats.errors.Error, TimeoutError, OSError)


# deliver_linger_ms: a followed token arriving this long after the oldest held one publishes them all at once
# (it came in a later wake-up than they did), so the linger's timer fires only when no token follows within it.
_EARLY_FLUSH_S = 0.002


class NatsSource(PluginBase):
    """Republish the events found in NATS JetStream on the local bus (config type ``nats``).

    The source reads every subject under ``<prefix>.ev.>`` of the JetStream
    stream ``stream_name`` through an ephemeral push consumer (flow control,
    idle heartbeats, no acknowledgements) that it creates from its own
    position: the stream sequence of the last message it handled, saved in a
    file (``position = "file"``) only when every ``block`` sink on its bus has
    handled everything before it. After a lost connection, a server restart
    or a silent consumer it creates a new consumer from that position.

    A de-duplicator keyed by (``stream``, ``seq``) drops what was already
    delivered, so sinks see each event exactly once, in order. Messages lost
    before they were read -- removed by retention, or the whole JetStream
    stream lost and recreated (its creation time, the *epoch*, changed) --
    are reported as a :class:`NatsGap` (log ``nats.gap``, :attr:`gaps`), and
    every stream that may have lost events ends with one ``error`` event of
    kind ``nats_gap``; so does a stream first met in its middle, or one with a
    hole in its ``seq``. A stream whose sink stops sending heartbeats for
    ``producer_timeout_ms`` (the producer process was killed) ends with an
    ``error`` of kind ``producer_lost``. Needs asyncio. Call :meth:`stop` to
    end :meth:`run` cleanly.

    With ``follow = "interested"`` (an edge) the source reads instead the
    index its sinks write with ``index = true`` (``<prefix>.idx.>``: starts and
    terminals) and, for each stream a sink on its bus wants
    (:func:`streambus.archive.interested`) or asks for, that stream's subject
    alone through an ordered consumer from its first message. It is then the
    bus's :class:`streambus.archive.StreamArchive`: :meth:`fetch` reads one
    stream's retained messages, all or nothing.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``nats`` producer."""

        url: str | None = None
        """Server URL(s), comma-separated; default ``$STREAMBUS_NATS_URL`` or ``nats://127.0.0.1:4222``."""
        prefix: str = DEFAULT_PREFIX
        """Subject prefix: the sinks' ``prefix``."""
        stream_name: str = DEFAULT_STREAM_NAME
        """The JetStream stream to read."""
        consumer: str | None = None
        """This consumer's name (logs, consumer description); default: the host name."""
        start: Literal["last", "$", "0"] = "last"
        """``last``: the saved position, else the oldest retained message; ``$``: only messages published from now
        on; ``0``: everything retained."""
        position: Literal["auto", "file", "none"] = "auto"
        """Where the position (with the epoch and de-duplication state) is saved; ``auto``: a file when
        ``position_file`` or ``seed_recording`` is set, else nowhere."""
        position_file: str | None = None
        """The state file; default ``<seed_recording>.nats-position`` (beside the recording)."""
        commit_interval_ms: PositiveInt = 100
        """How often the position is saved (and doubts and producers checked; without a position to save, every
        tenth of the shorter of ``gap_grace_ms`` and ``producer_timeout_ms``, between this and 1 s)."""
        dedup_ended: PositiveInt = 100_000
        """Ended streams remembered for de-duplication."""
        gap_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 5000
        """After a gap, how long a stream that may have lost events waits for its next event before it ends with a
        ``nats_gap`` error (covers a sink re-sending what it held while NATS was down)."""
        producer_timeout_ms: NonNegativeInt = 30_000
        """A live stream whose sink was not heard from (message or heartbeat) this long, while this source is
        connected and caught up, ends with a ``producer_lost`` error; 0 never."""
        heartbeat_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 1000
        """The consumer's idle heartbeat; three missed ones make the source re-create its consumer."""
        max_pending_messages: PositiveInt = 20_000
        """Messages the source holds before handling them (and at most 64 MiB); more are dropped on arrival and read
        again from JetStream, so a slow bus bounds this process's memory without losing anything."""
        seed_recording: str | None = None
        """A recording this process wrote before: its events count as delivered (a restarted recorder)."""
        origin: str | None = None
        """Skip messages with this origin id; default: the bus's own (what its nats sinks wrote)."""
        skip_own: bool = True
        """Skip messages this bus's own sinks wrote."""
        reconnect_wait_s: Annotated[float, msgspec.Meta(ge=0.01, le=60)] = 0.25
        """nats-py's wait between reconnect attempts (plus its jitter)."""
        follow: Literal["all", "interested"] = "all"
        """``all``: read every stream's subject (a recorder, the default). ``interested``: an edge; read the index
        (the sinks' ``index = true``) and only the streams a sink on the bus wants or asks for; answer
        :meth:`~NatsSource.fetch` for resumes (no position file; ``start`` is not used)."""
        starts_remembered: PositiveInt = 10_000
        """``interested``: live streams' ``start`` events kept for :meth:`~NatsSource.live_starts`."""
        fetch_max_messages: PositiveInt = 10_000
        """``interested``: a stream with more messages than this is not fetched (answered "not recovered")."""
        deliver_linger_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
        """``interested``: hold the followed streams' events at most this long after the first arrives and publish
        them together (up to that much more latency); a followed message arriving 2 ms or more after the oldest
        held one publishes them at once (no wake-up for the timer then); 0: at once."""

        def __post_init__(self) -> None:
            check_prefix(self.prefix)
            if self.follow == "interested" and (self.position == "file" or self.position_file or self.seed_recording):
                raise ValueError(
                    'follow: "interested" keeps no position (an edge is stateless); '
                    'drop position_file / seed_recording or use follow = "all"'
                )
            if not self.stream_name or any(c in self.stream_name for c in ".*> \t"):
                raise ValueError(
                    f"stream_name: must be a non-empty name without '.', '*', '>' or spaces, got {self.stream_name!r}"
                )
            if self.position == "file" and not self.position_file and not self.seed_recording:
                raise ValueError('position_file: required when position = "file" (or set seed_recording)')
            if self.position_file is not None and self.position == "none":
                raise ValueError('position_file: only used with position = "file" or "auto", not "none"')
            if self.consumer is not None and not self.consumer:
                raise ValueError("consumer: must not be empty")
            if self.producer_timeout_ms and self.producer_timeout_ms < 3 * 100:
                raise ValueError(
                    f"producer_timeout_ms: must be 0 (never) or at least 300, got {self.producer_timeout_ms}"
                )

    def preflight(self) -> None:
        """Check that ``seed_recording`` (when it exists yet) can be read and ``position_file``'s directory written."""
        opts = self.options
        if opts.seed_recording and Path(opts.seed_recording).exists():
            require_readable_file("seed_recording", opts.seed_recording)
        if self.state_file is not None:
            require_writable_directory("position_file", self.state_file.parent)

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: NatsSource.Options = self.resolve_options(options, kwargs)
        opts = self.options
        self.consumer = opts.consumer or socket.gethostname()
        """This consumer's name."""
        self.dedup = Deduplicator(max_ended=opts.dedup_ended)
        """The (stream, seq) de-duplicator; seed it before :meth:`run` to skip what was delivered before."""
        self.gaps: list[NatsGap] = []
        """Gaps found (messages lost before this source read them), the last 1000."""
        self.delivered = 0
        """Events published on the local bus."""
        self.duplicates = 0
        """Events dropped as already delivered."""
        self.reconnects = 0
        """How many times the connection was lost and re-established."""
        self.resyncs = 0
        """How many times the consumer was created again (reconnects, silent consumers, sequence jumps)."""
        self.producers_lost = 0
        """Streams ended with a ``producer_lost`` error."""
        self.dropped = 0
        """Messages dropped because the source's bounded inbox was full (read again from JetStream)."""
        self.epoch: str | None = None
        """The JetStream stream's epoch (its creation time) as last seen."""
        self.state_file: Path | None = None
        """Where the position is saved (``None``: nowhere)."""
        if opts.position in ("auto", "file") and (opts.position_file or opts.seed_recording):
            self.state_file = Path(opts.position_file or f"{opts.seed_recording}.nats-position")
        self.retry = RetryPolicy(retries=None, backoff=0.05, max_wait=2.0)
        """How (re)connecting and re-creating the consumer are retried: 50 ms doubling to 2 s, with jitter."""
        self._position = 0
        self._placed = False
        self._restored = False
        self._pending = -1
        self._caught_up_at = -1.0  # anyio clock: the last time nothing was pending for this source
        self.followed: dict[str, Any] = {}
        """``interested``: the streams read now (stream id -> their subscription)."""
        self._to_follow: dict[str, None] = {}
        self._to_unfollow: set[str] = set()
        self._follow_wake = asyncio.Event()
        self._behind: set[str] = set()
        self._starts: OrderedDict[str, StartEvent] = OrderedDict()
        self._js: nats.js.JetStreamContext | None = None
        self._held: list[tuple[list[Event], str, int]] = []
        self._held_wake = asyncio.Event()  # set: the held events are due (their linger passed, or flushed early)
        self._held_since = 0.0  # when the oldest held event arrived (loop time)
        self._held_timer: asyncio.TimerHandle | None = None  # sets _held_wake once the oldest held lingered
        self._drained = asyncio.Event()
        self._owners: dict[str, str] = {}
        self._heard: OrderedDict[str, float] = OrderedDict()
        self._since = 0.0
        self._connected = False
        self._doubts: dict[str, _Doubt] = {}
        self._resync = False
        self._exclusive = True
        self._delivered = 0
        self._missing_logged = False
        self._dirty = False
        self._busy = 0
        self._stopping = False
        self._read_scope: anyio.CancelScope | None = None
        self._wake: asyncio.Event | None = None
        self._ready = asyncio.Event()
        self._bus: Bus | None = None
        self._origin = ""
        if opts.seed_recording and Path(opts.seed_recording).exists():
            seeded = self.dedup.seed(iter_recording(opts.seed_recording, lenient=True))
            log.info("nats.seeded", recording=opts.seed_recording, events=seeded)

    # -- public control ----------------------------------------------------------------
    def stop(self) -> None:
        """End :meth:`run`: stop reading, commit the final position, return."""
        self._stopping = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def wait_ready(self) -> None:
        """Wait until the start position is resolved (with ``start = "$"``, what is published after this is read)."""
        await self._ready.wait()

    @property
    def position(self) -> int:
        """The stream sequence of the last message handled (the next consumer starts after it)."""
        return self._position

    # -- the producer ------------------------------------------------------------------
    async def run(self, bus: Bus) -> None:
        """Read until :meth:`stop` (or cancellation), republishing on *bus*."""
        require_asyncio("the nats source")
        opts = self.options
        self._bus = bus
        self._origin = opts.origin or local_state(bus).origin
        if self.state_file is not None:
            await self._load_state()
        log.info(
            "nats.source_started",
            url=redact(resolve_url(opts.url)),
            stream=opts.stream_name,
            prefix=opts.prefix,
            consumer=self.consumer,
        )
        client = await self._connect()
        try:
            await client.subscribe(f"{opts.prefix}.hb.*", cb=self._on_heartbeat)
            self._connected = True
            self._since = anyio.current_time()
            if opts.follow == "interested":
                self._js = client.jetstream()
                attach_archive(bus, self)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._committer)
                if opts.follow == "interested" and opts.deliver_linger_ms:
                    tg.start_soon(self._flusher)
                try:
                    with anyio.CancelScope() as self._read_scope:
                        if self._stopping:
                            self._read_scope.cancel()
                        if opts.follow == "interested":
                            await self._interest_loop(client)
                        else:
                            await self._read_loop(client)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if opts.follow == "interested":
                detach_archive(bus, self)
                self._js = None
            with anyio.CancelScope(shield=True) as shield:
                shield.deadline = anyio.current_time() + 5.0
                try:
                    await self._final_commit()
                finally:
                    self._stopping = True  # closing the client is not a lost connection
                    with contextlib.suppress(Exception):
                        await client.close()

    async def _connect(self) -> nats.aio.client.Client:
        clients: list[nats.aio.client.Client] = []

        async def attempt() -> Failure | None:
            try:
                clients.append(
                    await connect(
                        self.options.url,
                        name=f"streambus-source-{self.consumer}",
                        reconnect_wait=self.options.reconnect_wait_s,
                        on_disconnect=self._disconnected,
                        on_reconnect=self._reconnected,
                    )
                )
            except NatsAuthFailed as exc:
                log.error("nats.source_auth_failed", error=str(exc))
                raise
            except NatsHeaderParserUnsupported as exc:
                log.error("nats.source_cannot_read_headers", error=str(exc))
                raise
            except Exception as exc:  # nats-py raises several unrelated types for "could not connect"
                return Failure("connect", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        await self.retry.run(
            attempt, on_retry=lambda f, d: log.warning("nats.source_retry", error=f.message, retry_in=d)
        )
        return clients[-1]

    async def _disconnected(self) -> None:
        self._connected = False
        if self._stopping:
            return
        log.warning("nats.source_disconnected", consumer=self.consumer, position=self._position)
        self._resync = True
        if self._wake is not None:
            self._wake.set()

    async def _reconnected(self) -> None:
        self.reconnects += 1
        self._connected = True
        # Every producer gets a fresh timeout: nobody could be heard while we were away.
        self._since = anyio.current_time()
        log.info("nats.source_reconnected", consumer=self.consumer, position=self._position)
        self._resync = True
        if self._wake is not None:
            self._wake.set()

    async def _on_heartbeat(self, msg: nats.aio.msg.Msg) -> None:
        producer = msg.subject.rpartition(".")[2]
        heard = self._heard
        now = anyio.current_time()
        if self.options.follow == "interested" and not self._behind:
            # An interest edge's ordered consumers report no idle heartbeats to it: nothing pending on any
            # followed stream when the producer's heartbeat arrives is its "caught up". Without this, a producer
            # killed right after a heartbeat that came later than its last message would never be declared lost.
            self._caught_up_at = now
        heard[producer] = now
        heard.move_to_end(producer)
        if len(heard) > _MAX_PRODUCERS:
            heard.popitem(last=False)

    async def _read_loop(self, client: nats.aio.client.Client) -> None:
        js = client.jetstream()

        import nats.js.errors as jserr

        async def cycle() -> Failure | None:
            try:
                await self._place(js)
                await self._consume(client, js)
            except jserr.NotFoundError as exc:
                # No stream yet (no sink has started) or gone: look again soon, at a steady pace.
                return Failure("no_stream", f"{type(exc).__name__}: {exc}", retryable=True, retry_after=_NO_STREAM_POLL)
            except _retryable_errors() as exc:
                return Failure("nats", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        def retrying(failure: Failure, delay: float) -> None:
            if failure.kind == "no_stream":
                if not self._missing_logged:
                    self._missing_logged = True
                    log.info("nats.stream_missing", stream=self.options.stream_name, poll_s=delay)
                return
            log.warning("nats.source_retry", error=failure.message, retry_in=delay, position=self._position)

        while not self._stopping:
            await self.retry.run(cycle, on_retry=retrying)

    # -- where to read from ---------------------------------------------------------------
    async def _place(self, js: nats.js.JetStreamContext) -> None:
        """Compare the JetStream stream with what this source knows; report what was lost; set the position."""
        import nats.js.errors as jserr

        name = self.options.stream_name
        try:
            info = await js.stream_info(name)
        except jserr.NotFoundError:
            if self.epoch is not None:
                self._report_gap(NatsGap(name, self._position, None, None, "the JetStream stream is gone"), 0)
                self.epoch = None
                self._dirty = True
            self._position = 0
            self._placed = True
            self._ready.set()  # nothing retained: everything published from now on will be read
            raise
        self._missing_logged = False
        exclusive = list(info.config.subjects or ()) == [events_wildcard(self.options.prefix)]
        if not exclusive and self._exclusive:
            log.warning(
                "nats.shared_stream",
                stream=name,
                subjects=info.config.subjects,
                note="the stream holds other subjects too: messages lost to retention while this source reads are "
                "found by each stream's seq, not by the stream's sequence numbers",
            )
        self._exclusive = exclusive
        epoch = info.created.isoformat() if info.created is not None else "unknown"
        # A stream that never held a message reports first = last = 0; otherwise first = last + 1 when empty.
        first, last = max(1, info.state.first_seq), info.state.last_seq
        position = self._position
        resuming = self._placed or (self.options.start == "last" and self._restored)
        if not resuming:
            # A fresh start: from the head ("$") or from the oldest message retained.
            self._placed = True
            if self.dedup.live and (self.epoch is None or epoch != self.epoch):
                # Seeded or restored live streams, but no saved epoch vouches that this stream still holds them.
                how = "no saved epoch of this stream vouches for the live streams this consumer knows"
                self._report_gap(NatsGap(name, 0, None, None, how), last)
            self._finish_place(epoch, last if self.options.start == "$" else first - 1, last)
            return
        self._placed = True
        if self.epoch is not None and epoch != self.epoch:
            how = f"the JetStream stream was lost and recreated (epoch {self.epoch} -> {epoch})"
            self._report_gap(NatsGap(name, position, None, None, how), last)
            position = first - 1
        elif self.epoch is not None and last < position:
            how = f"the stream went back in time: its last sequence is {last}, this consumer had read up to {position}"
            self._report_gap(NatsGap(name, position, None, None, how), last)
            position = first - 1  # new messages may reuse the lost sequences: read all again, de-duplicated
        elif first > position + 1:
            if self.epoch is not None:
                how = "removed by retention (max_age / max_bytes) before this consumer read them"
                self._report_gap(NatsGap(name, position, first - 1, first - 1 - position, how), last)
            position = first - 1
        self._finish_place(epoch, position, last)

    def _finish_place(self, epoch: str, position: int, last: int) -> None:
        if epoch != self.epoch or position != self._position:
            self._dirty = True
        self.epoch = epoch
        self._position = position
        self._pending = max(0, last - position)
        if not self._pending:
            self._caught_up_at = anyio.current_time()

    async def _consume(self, client: nats.aio.client.Client, js: nats.js.JetStreamContext) -> None:
        """Create a consumer from the position and handle its messages until a resync is due."""
        import nats.js.api as api

        opts = self.options
        queue: deque[nats.aio.msg.Msg] = deque()
        held = [0]  # bytes in the queue
        limit = opts.max_pending_messages
        wake = self._wake = asyncio.Event()

        async def deliver(msg: nats.aio.msg.Msg) -> None:
            # Bounded: past these limits a message is dropped here; JetStream still holds it, and the
            # sequence check reads it again from the position (flow control keeps this rare).
            if (len(queue) >= limit or held[0] >= _PENDING_BYTES) and not (msg.headers and _STATUS in msg.headers):
                self.dropped += 1
                return
            queue.append(msg)
            held[0] += len(msg.data)
            wake.set()

        inbox = client.new_inbox()
        sub = await client.subscribe(inbox, cb=deliver)
        consumer_name: str | None = None
        self._resync = False
        try:
            heartbeat = opts.heartbeat_ms / 1000
            config = api.ConsumerConfig(
                description=f"streambus source {self.consumer}",
                deliver_subject=inbox,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._position + 1,
                ack_policy=api.AckPolicy.NONE,
                filter_subject=events_wildcard(opts.prefix),
                flow_control=True,
                idle_heartbeat=heartbeat,
                inactive_threshold=max(10.0, 5 * heartbeat),
                mem_storage=True,
                num_replicas=1,
            )
            info = await js.add_consumer(opts.stream_name, config)
            consumer_name = info.name
            self._delivered = 0
            self.resyncs += 1
            self._ready.set()
            while not self._stopping and not self._resync:
                if not queue:
                    wake.clear()
                    with anyio.move_on_after(3 * heartbeat) as scope:
                        await wake.wait()
                    if scope.cancelled_caught:
                        log.warning("nats.consumer_silent", consumer=consumer_name, position=self._position)
                        return
                    continue
                self._busy += 1
                try:
                    while queue and not self._resync:
                        msg = queue.popleft()
                        held[0] -= len(msg.data)
                        await self._on_message(client, msg)
                finally:
                    self._busy -= 1
        finally:
            self._wake = None
            with anyio.CancelScope(shield=True) as shield:
                shield.deadline = anyio.current_time() + 1.0
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                if consumer_name is not None and client.is_connected:
                    with contextlib.suppress(Exception):
                        await js.delete_consumer(opts.stream_name, consumer_name)

    # -- follow = "interested": the index, followed streams, the archive ----------------------
    def follow(self, stream: str) -> None:
        """Read *stream*'s subject from its first retained message; its events arrive through the bus.

        Part of :class:`streambus.archive.StreamArchive` (``follow =
        "interested"``; nothing in ``all``, which reads everything). Events
        already delivered are dropped as duplicates. Following ends once the
        stream's terminal event was delivered.
        """
        if self.options.follow != "interested" or stream in self.followed or stream in self._to_follow:
            return
        self._to_unfollow.discard(stream)
        self._to_follow[stream] = None
        self._follow_wake.set()

    def live_starts(self) -> list[StartEvent]:
        """The ``start`` of the streams the index showed begun and not ended (newest last; ``interested``)."""
        return list(self._starts.values())

    async def fetch(self, stream: str) -> list[Event] | None:
        """Every event of *stream* JetStream retains, from its ``start`` on, gap-free; else ``None``.

        Part of :class:`streambus.archive.StreamArchive` (``follow =
        "interested"``). Reads the stream's subject with a short-lived
        consumer up to its last message as it was when asked. ``None`` when
        the subject holds nothing (never written, expired, purged), its
        beginning is gone (retention), a ``seq`` is missing, the JetStream
        stream was recreated meanwhile (its epoch changed), or the stream has
        more than ``fetch_max_messages`` messages: the edge answers "not
        recovered", never a text with a hole.
        """
        js = self._js
        if js is None:
            return None
        import nats.js.api as api
        import nats.js.errors as jserr

        opts = self.options
        subject = event_subject(opts.prefix, stream)
        try:
            info = await js.stream_info(opts.stream_name)
            last = await js.get_last_msg(opts.stream_name, subject)
        except jserr.NotFoundError:
            return None
        except _retryable_errors() as exc:
            log.warning("nats.fetch_failed", stream=stream, error=f"{type(exc).__name__}: {exc}")
            return None
        until = last.seq or 0
        events: list[Event] = []
        expected = 0
        count = 0
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=subject,
            inactive_threshold=10.0,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            sub = await js.pull_subscribe(subject, stream=opts.stream_name, config=config)
            try:
                while True:
                    msgs = await sub.fetch(batch=256, timeout=5.0)
                    for msg in msgs:
                        count += 1
                        if count > opts.fetch_max_messages:
                            log.info("nats.fetch_too_long", stream=stream, limit=opts.fetch_max_messages)
                            return None
                        seq = msg.metadata.sequence.stream
                        decoded, bad = decode_events(str(seq), msg.data)
                        if bad:
                            return None
                        for event in decoded:
                            if event.stream != stream or event.seq < expected:
                                continue  # a re-sent copy past the duplicate window
                            low = event.seq_range[0] if type(event) is DeltaEvent else event.seq
                            if low != expected:
                                log.info("nats.fetch_hole", stream=stream, missing_from=expected, found=low)
                                return None
                            events.append(event)
                            expected = event.seq + 1
                            if is_terminal(event):
                                return await self._same_epoch(js, info, events)
                        if seq >= until:
                            return await self._same_epoch(js, info, events)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except jserr.NotFoundError:
            return None
        except _retryable_errors() as exc:
            log.warning("nats.fetch_failed", stream=stream, error=f"{type(exc).__name__}: {exc}")
            return None

    async def _same_epoch(self, js: nats.js.JetStreamContext, before: Any, events: list[Event]) -> list[Event] | None:
        """*events* if the JetStream stream is still the one *before* describes (not lost and recreated), else None."""
        after = await js.stream_info(self.options.stream_name)
        if after.created != before.created or not events:
            log.info("nats.fetch_epoch_changed", stream=self.options.stream_name)
            return None
        return events

    async def _interest_loop(self, client: nats.aio.client.Client) -> None:
        """Read the index (starts, terminals) and the followed streams until stopped."""
        import nats.js.api as api
        import nats.js.errors as jserr

        js = self._js
        assert js is not None
        opts = self.options
        index_name = index_stream_name(opts.stream_name)
        index_sub = None
        # The last index message of each stream (its start while live) tells which streams are live now. An
        # index created after this edge started holds only what came since: read it all (ends after starts).
        policy = api.DeliverPolicy.LAST_PER_SUBJECT

        async def subscribe_index() -> Failure | None:
            nonlocal index_sub, policy
            try:
                index_sub = await js.subscribe(
                    index_wildcard(opts.prefix),
                    stream=index_name,
                    cb=self._on_index,
                    ordered_consumer=True,
                    idle_heartbeat=opts.heartbeat_ms / 1000,
                    deliver_policy=policy,
                )
            except jserr.NotFoundError as exc:
                policy = api.DeliverPolicy.ALL
                # No sink wrote an index yet: nothing to route. Its first start will be read once it exists.
                self._ready.set()
                return Failure("no_stream", f"{type(exc).__name__}: {exc}", retryable=True, retry_after=_NO_STREAM_POLL)
            except _retryable_errors() as exc:
                return Failure("nats", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        def retrying(failure: Failure, delay: float) -> None:
            if failure.kind == "no_stream" and self._missing_logged:
                return
            self._missing_logged = True
            log.info("nats.index_missing", stream=index_name, error=failure.message, retry_in=delay)

        await self.retry.run(subscribe_index, on_retry=retrying)
        self._placed = True
        self._ready.set()
        try:
            while not self._stopping:
                self._follow_wake.clear()
                for stream in list(self._to_unfollow):
                    self._to_unfollow.discard(stream)
                    self._behind.discard(stream)
                    sub = self.followed.pop(stream, None)
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                for stream in list(self._to_follow):
                    if stream in self.followed:
                        self._to_follow.pop(stream, None)
                        continue
                    try:
                        self.followed[stream] = await js.subscribe(
                            event_subject(opts.prefix, stream),
                            stream=opts.stream_name,
                            cb=self._on_followed,
                            ordered_consumer=True,
                            idle_heartbeat=opts.heartbeat_ms / 1000,
                            deliver_policy=api.DeliverPolicy.ALL,
                        )
                    except _retryable_errors() as exc:
                        log.warning("nats.follow_failed", stream=stream, error=f"{type(exc).__name__}: {exc}")
                        break  # tried again on the next wake-up
                    self._to_follow.pop(stream, None)
                    self._behind.add(stream)
                if self._to_follow:
                    with anyio.move_on_after(0.25):
                        await self._follow_wake.wait()
                else:
                    await self._follow_wake.wait()
        finally:
            with anyio.CancelScope(shield=True) as shield:
                shield.deadline = anyio.current_time() + 1.0
                for sub in [index_sub, *self.followed.values()]:
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                self.followed.clear()

    async def _on_index(self, msg: nats.aio.msg.Msg) -> None:
        """An index message: remember a live stream's start, follow it if wanted; forget an ended one."""
        try:
            self._index_message(msg)
        except Exception as exc:  # a callback's error would only reach nats-py's error callback
            log.error("nats.index_message_failed", subject=msg.subject, error=f"{type(exc).__name__}: {exc}")

    def _index_message(self, msg: nats.aio.msg.Msg) -> None:
        bus = self._bus
        if bus is None:
            return
        events, _ = decode_events(f"index {msg.subject}", msg.data)
        starts = self._starts
        for event in events:
            stream = event.stream
            if type(event) is StartEvent:
                starts[stream] = event
                starts.move_to_end(stream)
                if len(starts) > self.options.starts_remembered:
                    starts.popitem(last=False)
                if not self.dedup.knows(stream) and interested(bus, event):
                    self.follow(stream)
            elif is_terminal(event):
                starts.pop(stream, None)
        if not msg.metadata.num_pending and not self._behind:
            self._caught_up_at = anyio.current_time()

    async def _on_followed(self, msg: nats.aio.msg.Msg) -> None:
        """A followed stream's message: deliver its new events; stop following once it ended."""
        try:
            headers = msg.headers
            origin = producer = ""
            if headers is not None:
                origin = headers.get(HEADER_ORIGIN, "")
                producer = headers.get(HEADER_PRODUCER, "")
            meta = msg.metadata
            seq = meta.sequence.stream
            events, _ = decode_events(str(seq), msg.data)
            if not events:
                return
            stream = events[0].stream
            now = asyncio.get_running_loop().time()  # anyio.current_time() on asyncio, without its look-up per call
            if not meta.num_pending:
                self._behind.discard(stream)
                if not self._behind:
                    self._caught_up_at = now
            if self.options.skip_own and origin == self._origin:
                return
            if producer:
                heard = self._heard
                heard[producer] = now
                heard.move_to_end(producer)
                if len(heard) > _MAX_PRODUCERS:
                    heard.popitem(last=False)
            if self.options.deliver_linger_ms:
                while len(self._held) >= self.options.max_pending_messages:
                    self._drained.clear()
                    await self._drained.wait()  # bounded: the bus is slower than the followed streams
                held = self._held
                if not held:
                    # The first held event: due when it has lingered, unless a later arrival flushes it sooner.
                    loop = asyncio.get_running_loop()
                    self._held_since = now = loop.time()  # again: waiting for the flusher above took time
                    self._held_timer = loop.call_at(now + self.options.deliver_linger_ms / 1000, self._held_wake.set)
                held.append((events, producer, seq))
                if now - self._held_since >= _EARLY_FLUSH_S:
                    # Awake for this message anyway: publish what is held now (it lingered at least half the
                    # linger) instead of waking once more for the timer. While followed tokens come densely
                    # the timer never fires, so the linger adds no wake-up of its own (it did: each was ~150 µs
                    # of CPU on a loaded host, more than the publishing it batched saved).
                    self._held_wake.set()
                return
            await self._deliver(events, producer, seq)
            self._unfollow_ended(stream)
        except Exception as exc:  # a callback's error would only reach nats-py's error callback
            log.error("nats.follow_message_failed", subject=msg.subject, error=f"{type(exc).__name__}: {exc}")

    def _unfollow_ended(self, stream: str) -> None:
        if self.dedup.knows(stream) and stream not in self.dedup.live:
            self._to_unfollow.add(stream)
            self._follow_wake.set()

    async def _flusher(self) -> None:
        """``deliver_linger_ms``: publish the held events of the followed streams, in arrival order, together.

        They are due when the oldest lingered ``deliver_linger_ms`` (a timer), or sooner when a followed
        message arrives after it lingered half of that (see :meth:`_on_followed`): never later than the linger.
        """
        try:
            while True:
                await self._flush_held()
        finally:
            if self._held_timer is not None:
                self._held_timer.cancel()
                self._held_timer = None

    async def _flush_held(self) -> None:
        """Wait until the held events are due; publish them."""
        await self._held_wake.wait()
        self._held_wake.clear()
        if self._held_timer is not None:
            self._held_timer.cancel()  # a cancelled timer does not wake the loop
            self._held_timer = None
        held, self._held = self._held, []
        self._drained.set()
        for events, producer, seq in held:
            try:
                await self._deliver(events, producer, seq)
                self._unfollow_ended(events[0].stream)
            except Exception as exc:
                log.error("nats.follow_message_failed", message=seq, error=f"{type(exc).__name__}: {exc}")

    # -- messages ---------------------------------------------------------------------------
    async def _on_message(self, client: nats.aio.client.Client, msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers
        if headers is not None and _STATUS in headers:
            await self._on_status(client, msg, headers)
            return
        meta = msg.metadata
        seq = meta.sequence.stream
        position = self._position
        if seq <= position:
            return  # delivered again by a consumer created from an older position
        delivered = meta.sequence.consumer
        # Our subjects alone: stream sequences have no holes. Shared with other subjects: the consumer's own count.
        if (seq != position + 1) if self._exclusive else (delivered != self._delivered + 1):
            # Something between was not delivered: JetStream removed it, or it was dropped on the way.
            # A new consumer from the position tells the two apart (see _place).
            log.info("nats.sequence_jump", expected=position + 1, got=seq)
            self._resync = True
            return
        self._delivered = delivered
        self._position = seq
        self._pending = meta.num_pending
        if not self._pending:
            self._caught_up_at = anyio.current_time()
        self._dirty = True
        origin = producer = ""
        if headers is not None:
            origin = headers.get(HEADER_ORIGIN, "")
            producer = headers.get(HEADER_PRODUCER, "")
        if self.options.skip_own and origin == self._origin:
            return
        if producer:
            heard = self._heard
            heard[producer] = anyio.current_time()
            heard.move_to_end(producer)
            if len(heard) > _MAX_PRODUCERS:
                heard.popitem(last=False)
        events, _ = decode_events(str(seq), msg.data)
        await self._deliver(events, producer, seq)

    async def _on_status(self, client: nats.aio.client.Client, msg: nats.aio.msg.Msg, headers: dict[str, str]) -> None:
        if headers.get(_STATUS) != _CONTROL:
            log.warning("nats.consumer_status", status=headers.get(_STATUS), description=headers.get("Description"))
            self._resync = True
            return
        if msg.reply:
            await client.publish(msg.reply, b"")  # flow control: we have handled everything before it
        if stalled := headers.get("Nats-Consumer-Stalled"):
            await client.publish(stalled, b"")
        last = headers.get("Nats-Last-Stream")
        if last is not None and last.isdigit() and int(last) > self._position:
            # The server delivered messages this source never got: read them again.
            log.info("nats.missed_delivery", last_delivered=int(last), position=self._position)
            self._resync = True
        elif not msg.reply and last is not None and last.isdigit() and int(last) == self._position:
            # An idle heartbeat: nothing is pending for this consumer.
            self._pending = 0
            self._caught_up_at = anyio.current_time()

    async def _deliver(self, events: list[Event], producer: str, seq: int) -> None:
        bus = self._bus
        assert bus is not None
        local = local_state(bus)
        foreign = local.foreign
        dedup = self.dedup
        offer = bus.offer  # publish without a coroutine per event; await only when a block sink is full
        doubts = self._doubts
        owners = self._owners
        delivered = 0
        try:
            for event in events:
                stream = event.stream
                if type(event) is DeltaEvent and dedup.accept_next(stream, event.seq):
                    if doubts:
                        doubts.pop(stream, None)  # its next event arrived: nothing of it was lost
                    if stream not in foreign:
                        local.mark_foreign(stream)
                    if (wait := offer(event)) is not None:
                        await wait
                    delivered += 1
                    continue
                low = event.seq_range[0] if type(event) is DeltaEvent else event.seq
                if low > 0 and not dedup.knows(stream):
                    await self._end_with_gap(stream, event, seq)
                    continue
                verdict = dedup.check(event)
                if verdict is Verdict.NEW:
                    if doubts:
                        doubts.pop(stream, None)
                    if type(event) is StartEvent:
                        owners[stream] = producer
                    elif is_terminal(event):
                        owners.pop(stream, None)
                    elif producer and stream not in owners:
                        owners[stream] = producer
                    if stream not in foreign:
                        local.mark_foreign(stream)
                    if (wait := offer(event)) is not None:
                        await wait
                    delivered += 1
                elif verdict is Verdict.DUPLICATE:
                    self.duplicates += 1
                else:
                    await self._end_with_gap(stream, event, seq)
        finally:
            self.delivered += delivered

    async def _end_with_gap(self, stream: str, event: Event, seq: int) -> None:
        last = self.dedup.last(stream)
        first = (last if last is not None else -1) + 1
        low = event.seq_range[0] if isinstance(event, DeltaEvent) else event.seq
        message = (
            f"events {first}..{low - 1} of this stream never arrived from JetStream stream "
            f"{self.options.stream_name} before message {seq} (lost before this consumer read them, or "
            "undecodable: see the nats.gap / nats.bad_event logs)"
        )
        log.error("nats.stream_gap", stream=stream, missing_from=first, resumed_at=low)
        await self._end_stream(stream, first, max(event.seq, first), "nats_gap", message, retryable=False)

    async def _end_stream(self, stream: str, seq: int, last: int, kind: str, message: str, *, retryable: bool) -> None:
        self.dedup.end(stream, last)
        if stream in self.followed or stream in self._to_follow:
            self._to_follow.pop(stream, None)
            self._to_unfollow.add(stream)  # an interest edge stops reading a stream it ended (producer_lost, gap)
            self._follow_wake.set()
        self._doubts.pop(stream, None)
        self._owners.pop(stream, None)
        self._dirty = True
        bus = self._bus
        assert bus is not None
        local_state(bus).mark_foreign(stream)  # a nats sink on this bus must not send it back
        await bus.publish(
            ErrorEvent(stream=stream, seq=seq, ts=time.time(), kind=kind, message=message, retryable=retryable)
        )

    # -- gaps, doubts, lost producers ------------------------------------------------------------
    def _report_gap(self, gap: NatsGap, until: int) -> None:
        """Log *gap*, keep it, and put every live stream in doubt until the reader passed *until*."""
        self.gaps.append(gap)
        del self.gaps[:-1000]
        log.error("nats.gap", stream=gap.stream, after=gap.after, until=gap.until, lost=gap.lost, error=str(gap))
        deadline = anyio.current_time() + self.options.gap_grace_ms / 1000
        for stream in self.dedup.live:
            self._doubts[stream] = _Doubt(until, deadline, str(gap))

    async def _settle(self) -> None:
        """End the doubted streams the reader passed the gap for, and the streams whose producer is lost."""
        now = anyio.current_time()
        if self._doubts:
            live = self.dedup.live
            done = [s for s, d in self._doubts.items() if now >= d.deadline and self._position >= d.until]
            for stream in done:
                doubt = self._doubts.pop(stream)
                if stream not in live:
                    continue
                seq = live[stream] + 1
                message = (
                    f"events from {seq} on of this stream were lost in NATS: read {self.options.stream_name} up to "
                    f"{self._position} without finding event {seq} ({doubt.reason})"
                )
                log.error("nats.stream_gap", stream=stream, missing_from=seq, reason=doubt.reason)
                await self._end_stream(stream, seq, seq, "nats_gap", message, retryable=False)
        timeout = self.options.producer_timeout_ms / 1000
        if not timeout or not self._connected or self._resync:
            return
        since = self._since
        if now - since < timeout:
            return
        heard = self._heard
        for stream, last in list(self.dedup.live.items()):
            owner = self._owners.get(stream, "")
            last_heard = max(heard.get(owner, since), since)
            silent = now - last_heard
            # Silence means something only once this source has read everything published before it began:
            # it was caught up (nothing pending) after it last heard from the producer.
            if silent < timeout or self._caught_up_at < last_heard:
                continue
            self.producers_lost += 1
            message = (
                f"the producer of this stream (sink {owner or 'unknown'}) was not heard from for {silent:.1f} s "
                f"(producer_timeout_ms = {self.options.producer_timeout_ms}): it was killed or cut off from NATS; "
                f"events after seq {last} will not come"
            )
            log.error("nats.producer_lost", stream=stream, producer=owner, silent_s=round(silent, 1), last_seq=last)
            await self._end_stream(stream, last + 1, last + 1, "producer_lost", message, retryable=True)

    # -- positions ----------------------------------------------------------------------------------
    def _tick(self) -> float:
        """Seconds between two rounds of the committer (commit, doubts, lost producers).

        ``commit_interval_ms`` when there is a position to save. Without one
        (an edge) the round only judges doubts and producers, whose limits
        (``gap_grace_ms``, ``producer_timeout_ms``) are seconds: a tenth of the
        shorter, at most a second, so an idle edge is not woken ten times a
        second for nothing.
        """
        opts = self.options
        interval = opts.commit_interval_ms / 1000
        if self.state_file is not None:
            return interval
        limits = [ms for ms in (opts.gap_grace_ms, opts.producer_timeout_ms) if ms]
        return max(interval, min(1.0, min(limits, default=10_000) / 10_000))

    async def _committer(self) -> None:
        interval = self._tick()
        while True:
            await anyio.sleep(interval)
            if not self._busy:
                await self._settle()
            try:
                await self._commit()
            except OSError as exc:
                log.error("nats.commit_failed", file=str(self.state_file), error=f"{type(exc).__name__}: {exc}")

    async def _commit(self) -> bool:
        """Save the position if every lossless sink caught up; return whether it did."""
        if not self._dirty or self._busy or self.state_file is None or not self._placed:
            return False
        bus = self._bus
        if bus is not None and not _sinks_caught_up(bus):
            return False
        state = self._state()
        self._dirty = False
        try:
            await anyio.to_thread.run_sync(_write_atomic, self.state_file, orjson.dumps(state))
        except BaseException:
            self._dirty = True
            raise
        return True

    async def _final_commit(self) -> None:
        bus = self._bus
        while bus is not None and self._dirty and not _sinks_caught_up(bus):  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.01)
        try:
            await self._commit()
        except OSError as exc:
            log.warning("nats.final_commit_failed", error=f"{type(exc).__name__}: {exc}")

    def _state(self) -> dict[str, Any]:
        dedup = self.dedup.snapshot()
        return {
            "stream_name": self.options.stream_name,
            "epoch": self.epoch,
            "position": self._position,
            "dedup": dedup,
            "owners": {s: self._owners[s] for s in dedup["live"] if s in self._owners},
            "doubts": {s: d.until for s, d in self._doubts.items()},
            "saved": time.time(),
        }

    async def _load_state(self) -> None:
        assert self.state_file is not None
        raw = await anyio.to_thread.run_sync(_read_if_exists, self.state_file)
        if not raw:
            return
        try:
            state = orjson.loads(raw)
            if state.get("stream_name") != self.options.stream_name:
                raise ValueError(f"it is for JetStream stream {state.get('stream_name')!r}")
            self.dedup.restore(state.get("dedup") or {})
            position = int(state.get("position") or 0)
            epoch = state.get("epoch")
            owners = {str(s): str(p) for s, p in (state.get("owners") or {}).items()}
            doubts = {str(s): int(u) for s, u in (state.get("doubts") or {}).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("nats.bad_position", file=str(self.state_file), error=str(exc))
            return
        live = self.dedup.live
        self._owners.update((s, p) for s, p in owners.items() if s in live)
        deadline = anyio.current_time() + self.options.gap_grace_ms / 1000
        for stream, until in doubts.items():
            if stream in live:
                self._doubts[stream] = _Doubt(until, deadline, "it was in doubt when this consumer stopped")
        if epoch is not None:
            self.epoch = str(epoch)
            if self.options.start == "last":
                self._position = position
                self._restored = True
        log.info("nats.resumed", consumer=self.consumer, position=position, epoch=epoch)


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
