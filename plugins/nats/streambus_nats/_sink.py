"""The ``nats`` sink: publish the bus's events to NATS JetStream, a subject per stream."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import anyio
import msgspec
import orjson
import structlog

from streambus import Event, PluginBase, StartEvent, Subscription, encode_many, is_terminal
from streambus.plugins import NonNegativeInt, PositiveFloat, PositiveInt
from streambus.producing import Failure, RetryPolicy

from ._codec import encode_message
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_STREAM_NAME,
    NatsAuthFailed,
    NatsHeaderParserUnsupported,
    check_prefix,
    connect,
    event_subject,
    events_wildcard,
    heartbeat_subject,
    index_stream_name,
    index_subject,
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

__all__ = ["NatsSink"]

log = structlog.get_logger("streambus.nats")

_STATUS = "Status"
_NO_RESPONDERS = "503"


class NatsSink(PluginBase):
    """Publish every event to NATS JetStream (config type ``nats``).

    Each stream has its own subject, ``<prefix>.ev.<stream id>``, stored in
    one JetStream stream (``stream_name``) that the sink creates with the
    retention it is given (``max_age_s``, ``max_bytes``) unless it exists.
    Events are batched for at most ``batch_max_ms``; consecutive events of
    one stream travel in one message (up to ``message_max_events``) whose
    ``Nats-Msg-Id`` names the stream and its seqs, so a message re-sent after
    a lost acknowledgement is dropped by JetStream (within
    ``duplicate_window_s``) and, past that, by the consumers' de-duplicator.
    Up to ``batches_in_flight`` batches are sent before their acknowledgements
    come, a stream in one of them at most; a batch is re-sent whole, in order,
    until every message is acknowledged: nothing accepted is lost, and a
    stream's events stay in ``seq`` order.
    Meanwhile the sink's ``block`` subscription slows producers down. Every
    ``heartbeat_ms`` the sink says it is alive on ``<prefix>.hb.<producer>``
    (core NATS, not stored); a consumer ends the live streams of a sink it
    has not heard from for its ``producer_timeout_ms`` with an ``error`` of
    kind ``producer_lost``. With ``index = true`` each stream's ``start`` and
    terminal event are also written to ``<prefix>.idx.<stream id>`` in the
    JetStream stream ``<stream_name>_INDEX`` (same retention): what an edge
    with ``follow = "interested"`` reads to route new streams. Needs asyncio.

    ::

        bus.add_sink(NatsSink(url="nats://nats:4222", prefix="llm", max_age_s=3600))
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``nats`` sink."""

        url: str | None = None
        """Server URL(s), comma-separated; default ``$STREAMBUS_NATS_URL`` or ``nats://127.0.0.1:4222``."""
        prefix: str = DEFAULT_PREFIX
        """Subject prefix: a stream's events go to ``<prefix>.ev.<stream id>``."""
        stream_name: str = DEFAULT_STREAM_NAME
        """The JetStream stream holding ``<prefix>.ev.>``."""
        create_stream: bool = True
        """Create the JetStream stream (with the retention below) when it does not exist."""
        max_age_s: NonNegativeInt = 86_400
        """Retention by age: messages older than this are removed (0: no age limit)."""
        max_bytes: int = 1 << 30
        """Retention by size: the oldest messages are removed past this many bytes (-1: no size limit)."""
        duplicate_window_s: PositiveFloat = 120.0
        """How long JetStream remembers a ``Nats-Msg-Id`` to drop a re-sent copy."""
        storage: Literal["file", "memory"] = "file"
        """JetStream storage: ``file`` survives a server restart, ``memory`` does not."""
        replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
        """JetStream replicas (a cluster)."""
        batch_max_events: PositiveInt = 1000
        """Send as soon as this many events wait."""
        batch_max_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 2.0
        """Longest an event waits for others to share its flush; 0 sends what is buffered at once."""
        message_max_events: PositiveInt = 128
        """Consecutive events of one stream packed into one message."""
        batches_in_flight: PositiveInt = 16
        """Batches sent and not yet acknowledged at once (a stream is in one of them at most: its later events wait,
        so a re-sent batch never lands after a later one of the same stream); 1: each batch waits for the
        previous one's acknowledgements."""
        ack_timeout_s: PositiveFloat = 5.0
        """How long a batch waits for JetStream's acknowledgements before it is sent again."""
        heartbeat_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 1000
        """How often the sink says it is alive (consumers' ``producer_timeout_ms`` must be well above it)."""
        origin: str | None = None
        """Origin id written on each message; default: the bus's own (its sources skip it)."""
        max_attempts: PositiveInt = 5
        """Attempts for an error JetStream *answered* (stream full, wrong stream); lost connections retry forever."""
        reconnect_wait_s: Annotated[float, msgspec.Meta(ge=0.01, le=60)] = 0.25
        """nats-py's wait between reconnect attempts (plus its jitter)."""
        index: bool = False
        """Also write each stream's ``start`` and terminal event to ``<prefix>.idx.<stream id>`` (JetStream stream
        ``<stream_name>_INDEX``), for edges reading with ``follow = "interested"``."""

        def __post_init__(self) -> None:
            check_prefix(self.prefix)
            if not self.stream_name or any(c in self.stream_name for c in ".*> \t"):
                raise ValueError(
                    f"stream_name: must be a non-empty name without '.', '*', '>' or spaces, got {self.stream_name!r}"
                )
            if self.max_age_s and self.duplicate_window_s > self.max_age_s:
                raise ValueError(
                    f"duplicate_window_s: must not exceed max_age_s ({self.max_age_s}), got {self.duplicate_window_s:g}"
                )
            if self.max_bytes == 0 or self.max_bytes < -1:
                raise ValueError(f"max_bytes: must be -1 (no limit) or positive, got {self.max_bytes}")

    overflow: ClassVar[str] = "block"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: NatsSink.Options = self.resolve_options(options, kwargs)
        self.producer_id = secrets.token_hex(6)
        """This sink instance's id on every message and heartbeat it sends."""
        self.sent_events = 0
        """Events acknowledged by JetStream so far."""
        self.sent_messages = 0
        """Messages acknowledged by JetStream so far (re-sent duplicates included once)."""
        self.duplicates = 0
        """Messages JetStream acknowledged as duplicates (a re-sent batch whose first copy landed)."""
        self.too_large = 0
        """Events not sent because one alone exceeds the server's ``max_payload`` (logged ``nats.event_too_large``)."""
        self.retry = RetryPolicy(retries=None, backoff=0.05, max_wait=2.0)
        """How sends are retried: 50 ms doubling to 2 s, with jitter, without limit (see ``max_attempts``)."""
        self._bus: Bus | None = None
        self._unsent: list[Event] = []
        self._ready = asyncio.Event()
        self._stream_ok = False
        self._stream_known = False
        self._closing = False
        self._client: nats.aio.client.Client | None = None
        self._acks: dict[str, _Answers] = {}  # send attempt -> the answers to its messages
        self._acks_prefix = ""
        self._sends = 0

    async def wait_ready(self) -> None:
        """Wait until the sink is connected and the JetStream stream exists.

        If NATS cannot be reached at start, the sink keeps retrying and this waits on.
        """
        await self._ready.wait()

    async def setup(self, bus: Bus) -> None:
        """Remember the bus (for its origin id and the streams its sources brought in)."""
        self._bus = bus

    async def run(self, events: Subscription) -> None:
        """Send events until the subscription ends."""
        require_asyncio("the nats sink")
        opts = self.options
        local = local_state(self._bus) if self._bus is not None else None
        origin = opts.origin or (local.origin if local is not None else secrets.token_hex(8))
        foreign = local.foreign if local is not None else {}
        self._closing = False
        client = self._client = await self._connect()
        js = client.jetstream()
        self._acks_prefix = f"{client.new_inbox()}."
        await client.subscribe(f"{self._acks_prefix}>", cb=self._on_ack)
        log.info("nats.sink_started", url=redact(resolve_url(opts.url)), prefix=opts.prefix, producer=self.producer_id)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, client)
                await self._retrying(lambda: self._ensure_stream(js), events=0)
                self._ready.set()
                await self._pump(js, origin, foreign, events)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failure (JetStream's answer after max_attempts, say) is raised as itself, not in task groups.
            only = _only_exception(group)
            if only is None:
                raise
            raise only from None
        finally:
            self._closing = True
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await client.close()

    async def _pump(
        self, js: nats.js.JetStreamContext, origin: str, foreign: Mapping[str, object], events: Subscription
    ) -> None:
        """Send batches without waiting for the previous ones' acknowledgements; a stream has one in flight.

        Up to ``batches_in_flight`` batches are sent and unacknowledged at once
        (an acknowledgement's round trip no longer holds every event behind
        it). A stream's events wait while an earlier batch holding that
        stream is unacknowledged: a batch re-sent after a lost connection can
        then never land after a later batch of the same stream, so each
        stream stays in ``seq`` order in JetStream whatever is re-sent.
        """
        opts = self.options
        limit = opts.batch_max_events
        wait = opts.batch_max_ms / 1000
        window = opts.batches_in_flight
        # Every event received and not acknowledged is in `waiting` (not sent yet, in arrival order) or in
        # `in_flight` (sent, keyed by send order): what a failed run leaves becomes `_unsent`, sent first next time.
        waiting, self._unsent = self._unsent, []
        in_flight: dict[int, list[Event]] = {}
        busy: set[str] = set()  # the streams of the batches in flight
        freed = asyncio.Event()
        wake: list[anyio.CancelScope] = []  # the receive a finished batch interrupts (its held streams are free)
        number = 0
        ended = False

        async def send(key: int, batch: list[Event], streams: set[str]) -> None:
            await self._send(js, origin, batch)
            del in_flight[key]
            busy.difference_update(streams)
            freed.set()
            for scope in wake:
                scope.cancel()

        try:
            async with anyio.create_task_group() as sends:
                while True:
                    if len(in_flight) >= window or (waiting and (ended or len(waiting) >= limit)):
                        if not in_flight:
                            if not waiting:
                                break
                        else:
                            freed.clear()
                            await freed.wait()  # a batch was acknowledged: its streams may go on
                    elif ended:
                        break
                    else:
                        received: list[Event] = []
                        with anyio.CancelScope() as scope:
                            if waiting:
                                wake.append(scope)  # held events: go on as soon as their stream is free
                            try:
                                # A wake-up during the linger puts what it gathered back: read again at once.
                                received = await events.receive_batch(limit - len(waiting), linger=wait)
                            finally:
                                if wake:
                                    wake.clear()
                        if not received and not scope.cancelled_caught:
                            ended = True
                        waiting.extend(received)
                    if foreign:
                        waiting = [e for e in waiting if e.stream not in foreign]
                    if not waiting or len(in_flight) >= window:
                        continue
                    if busy:
                        ready = [e for e in waiting if e.stream not in busy]
                        if not ready:
                            continue
                        waiting = [e for e in waiting if e.stream in busy]
                    else:
                        ready, waiting = waiting, []
                    streams = {e.stream for e in ready}
                    busy |= streams
                    number += 1
                    in_flight[number] = ready
                    sends.start_soon(send, number, ready, streams)
        finally:
            self._unsent = [event for batch in in_flight.values() for event in batch] + waiting

    async def _connect(self) -> nats.aio.client.Client:
        opts = self.options
        clients: list[nats.aio.client.Client] = []

        async def attempt() -> Failure | None:
            try:
                clients.append(
                    await connect(
                        opts.url,
                        name=f"streambus-sink-{self.producer_id}",
                        reconnect_wait=opts.reconnect_wait_s,
                        on_disconnect=self._disconnected,
                        on_reconnect=self._reconnected,
                    )
                )
            except NatsAuthFailed as exc:
                # Retrying will not fix a wrong secret: fail loudly (the bus restarts the sink).
                log.error("nats.sink_auth_failed", error=str(exc))
                raise
            except NatsHeaderParserUnsupported as exc:
                log.error("nats.sink_cannot_read_headers", error=str(exc))
                raise
            except Exception as exc:  # nats-py raises several unrelated types for "could not connect"
                return Failure("connect", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        await self.retry.run(attempt, on_retry=lambda f, d: log.warning("nats.sink_retry", error=f.message, retry_in=d))
        return clients[-1]

    async def _disconnected(self) -> None:
        if self._closing:
            return
        log.warning("nats.sink_disconnected", producer=self.producer_id)

    async def _reconnected(self) -> None:
        log.info("nats.sink_reconnected", producer=self.producer_id)

    async def _heartbeat(self, client: nats.aio.client.Client) -> None:
        import nats.errors

        subject = heartbeat_subject(self.options.prefix, self.producer_id)
        while True:
            if client.is_connected:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await client.publish(subject, b"")
            await anyio.sleep(self.options.heartbeat_ms / 1000)

    async def _ensure_stream(self, js: nats.js.JetStreamContext) -> None:
        """Make sure the JetStream stream (and with ``index``, the index stream) exists, with our retention."""
        opts = self.options
        await self._ensure_one(js, opts.stream_name, events_wildcard(opts.prefix))
        if opts.index:
            await self._ensure_one(js, index_stream_name(opts.stream_name), index_wildcard(opts.prefix))
        self._stream_ok = self._stream_known = True

    async def _ensure_one(self, js: nats.js.JetStreamContext, name: str, subject: str) -> None:
        """Create the JetStream stream *name* holding *subject* unless it exists."""
        import nats.js.api as api
        import nats.js.errors as jserr

        opts = self.options
        try:
            await js.stream_info(name)
            return
        except jserr.NotFoundError:
            if not opts.create_stream:
                raise
        config = api.StreamConfig(
            name=name,
            subjects=[subject],
            max_age=float(opts.max_age_s) if opts.max_age_s else None,
            max_bytes=opts.max_bytes,
            duplicate_window=opts.duplicate_window_s,
            storage=api.StorageType.FILE if opts.storage == "file" else api.StorageType.MEMORY,
            num_replicas=opts.replicas,
            discard=api.DiscardPolicy.OLD,
        )
        try:
            await js.add_stream(config)
        except jserr.BadRequestError as exc:
            # Another sink created it meanwhile (with other settings): use it as it is.
            log.warning("nats.stream_exists", stream=name, error=str(exc))
        log.info(
            "nats.stream_created",
            stream=name,
            subjects=config.subjects,
            max_age_s=opts.max_age_s,
            max_bytes=opts.max_bytes,
        )
        if self._stream_known:
            log.warning(
                "nats.stream_recreated",
                stream=name,
                note="the JetStream stream was lost (server storage lost, or deleted): messages consumers had "
                "not read are gone; consumers end the streams concerned with a nats_gap error",
            )

    async def _retrying(self, action: Any, *, events: int) -> None:
        """Run *action* until it succeeds: lost connections and timeouts retry forever, with backoff."""
        import nats.errors
        import nats.js.errors as jserr

        answered = 0

        async def attempt() -> Failure | None:
            nonlocal answered
            try:
                await action()
            except (jserr.NoStreamResponseError, jserr.NotFoundError) as exc:
                # The stream is gone (the server lost its storage, or it was deleted): create it again.
                self._stream_ok = False
                return Failure("no_stream", f"{type(exc).__name__}: {exc}", retryable=True)
            except jserr.APIError as exc:
                answered += 1
                if answered >= self.options.max_attempts:
                    log.error("nats.sink_failed", error=f"{type(exc).__name__}: {exc}", events_held=events)
                    raise
                return Failure("jetstream", f"{type(exc).__name__}: {exc}", retryable=True)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                # Connection trouble: the messages may or may not have landed; re-sending is safe
                # (JetStream and the consumers drop the duplicates), losing is not.
                return Failure("connect", f"{type(exc).__name__}: {exc}", retryable=True)
            return None

        def retrying(failure: Failure, delay: float) -> None:
            log.warning("nats.sink_retry", error=failure.message, retry_in=delay, events=events)

        await self.retry.run(attempt, on_retry=retrying)

    def _messages(
        self, origin: str, batch: list[Event], max_payload: int
    ) -> list[tuple[str, dict[str, str], bytes, int]]:
        per_stream: dict[str, list[Event]] = {}
        for event in batch:
            group = per_stream.get(event.stream)
            if group is None:
                per_stream[event.stream] = [event]
            else:
                group.append(event)
        size = self.options.message_max_events
        prefix = self.options.prefix
        out: list[tuple[str, dict[str, str], bytes, int]] = []
        for stream, group in per_stream.items():
            subject = event_subject(prefix, stream)
            for i in range(0, len(group), size):
                self._pack(out, subject, origin, group[i : i + size], max_payload)
            if self.options.index:
                for event in group:
                    if type(event) is StartEvent or is_terminal(event):
                        # No headers: every edge parses every index message, and nats-py's header parsing costs
                        # more than the rest of it (measured: half the index edge's CPU in bench_nats.py edges).
                        # A re-sent copy is harmless: a start is followed once, an end forgotten once.
                        out.append((index_subject(prefix, stream), {}, encode_many([event]), 0))
        return out

    def _pack(
        self,
        out: list[tuple[str, dict[str, str], bytes, int]],
        subject: str,
        origin: str,
        chunk: list[Event],
        max_payload: int,
    ) -> None:
        headers, payload = encode_message(origin, self.producer_id, chunk)
        if len(payload) + 200 <= max_payload:  # headers travel in the same frame; theirs is well under 200 bytes
            out.append((subject, headers, payload, len(chunk)))
        elif len(chunk) > 1:
            half = len(chunk) // 2
            self._pack(out, subject, origin, chunk[:half], max_payload)
            self._pack(out, subject, origin, chunk[half:], max_payload)
        else:
            # One event larger than the server takes: it cannot be stored. Its stream's consumers see the hole
            # in seq and end it with a nats_gap error, never silent text with a hole in it.
            event = chunk[0]
            self.too_large += 1
            log.error(
                "nats.event_too_large",
                stream=event.stream,
                seq=event.seq,
                size=len(payload),
                max_payload=max_payload,
                note="raise the server's max_payload; this event is not sent",
            )

    async def _on_ack(self, msg: nats.aio.msg.Msg) -> None:
        """JetStream's answer to one message the sink published (reply subject ``<prefix><send>.<index>``)."""
        import nats.js.errors as jserr

        send, _, index = msg.subject[len(self._acks_prefix) :].partition(".")
        waiter = self._acks.get(send)
        if waiter is None:
            return  # a late answer to an attempt given up on (it is re-sent, and dropped by its Nats-Msg-Id)
        headers = msg.headers
        answer: dict[str, Any] | BaseException
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            answer = jserr.NoStreamResponseError()  # no JetStream stream takes the subject
        else:
            try:
                decoded = orjson.loads(msg.data)
            except orjson.JSONDecodeError as exc:
                decoded = {"error": {"code": None, "description": f"unreadable acknowledgement: {exc}"}}
            error = decoded.get("error") if type(decoded) is dict else None
            answer = decoded if error is None else _answered_error(error)
        waiter.settle(int(index), answer)

    async def _send(self, js: nats.js.JetStreamContext, origin: str, batch: list[Event]) -> None:
        client = self._client
        assert client is not None
        max_payload = client.max_payload
        messages = self._messages(origin, batch, max_payload)
        timeout = self.options.ack_timeout_s
        answers: list[Any] = []

        async def publish() -> None:
            if not self._stream_ok:
                await self._ensure_stream(js)
            # Plain publishes with a reply subject of the sink's own: JetStream answers each on it (the same
            # protocol as nats-py's publish_async, at about half its CPU per message; see docs/decisions.md).
            self._sends += 1
            send = str(self._sends)
            base = f"{self._acks_prefix}{send}."
            waiter = self._acks[send] = _Answers(len(messages))
            try:
                for i, (subject, headers, payload, _) in enumerate(messages):
                    await client.publish(subject, payload, reply=f"{base}{i}", headers=headers or None)
                with anyio.move_on_after(timeout):
                    await waiter.done.wait()
            finally:
                del self._acks[send]
            if not waiter.done.is_set():
                raise TimeoutError(
                    f"JetStream did not acknowledge {waiter.left} of {len(messages)} messages within {timeout:g} s"
                )
            for result in waiter.answers:
                if isinstance(result, BaseException):
                    raise result
            answers[:] = waiter.answers

        await self._retrying(publish, events=len(batch))
        self.sent_events += sum(count for _, _, _, count in messages)
        self.sent_messages += len(messages)
        self.duplicates += sum(1 for answer in answers if answer.get("duplicate"))


class _Answers:
    """JetStream's answers to the messages of one send attempt, in message order; ``done`` once all came."""

    __slots__ = ("answers", "done", "left")

    def __init__(self, count: int) -> None:
        self.answers: list[Any] = [None] * count
        self.left = count
        self.done = asyncio.Event()
        if not count:
            self.done.set()

    def settle(self, index: int, answer: Any) -> None:
        if 0 <= index < len(self.answers) and self.answers[index] is None:
            self.answers[index] = answer
            self.left -= 1
            if not self.left:
                self.done.set()


def _answered_error(error: Any) -> BaseException:
    """The nats-py ``APIError`` (subclass by code) for JetStream's ``error`` answer."""
    import nats.js.errors as jserr

    try:
        jserr.APIError.from_error(error)  # raises the APIError subclass the code stands for
    except jserr.APIError as exc:
        return exc
    except Exception as exc:  # an answer without the usual fields
        return jserr.APIError(description=f"{error!r} ({type(exc).__name__})")
    return jserr.APIError(description=repr(error))


def _only_exception(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The one exception *group* holds, however deeply nested; ``None`` when it holds several or a non-Exception."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    if len(leaves) == 1 and isinstance(leaves[0], Exception):
        return leaves[0]
    return None
