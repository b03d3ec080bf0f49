"""The ``redis-control`` sink: carry stop requests between hosts over a Redis pub/sub channel.

Every host of a distributed deployment (producer hosts and edges alike) adds
one. It does two things on its bus:

- it is the bus's stop route (:meth:`streambus.Bus.add_stop_route`): a stop
  for a stream whose producer runs elsewhere is published on the control
  channel as a :class:`streambus.stopping.StopRequest`, and the answers
  (:class:`~streambus.stopping.StopReply`) are awaited on this host's reply
  channel;
- it listens on the control channel: a request from another host is handed to
  ``bus.stop(..., forward=False)``, so the host whose producer owns the stream
  cancels it (closing the upstream HTTP request) and its ``abort`` event
  travels to every edge like any other event. Every listening host answers
  once: ``stopped``, ``ended`` or ``unknown``.

``PUBLISH`` answers how many hosts received the request, so the asking host
waits for exactly that many answers (less itself), or the first ``stopped``,
or ``reply_timeout``, whichever comes first. The messages are
the engine-neutral ones of :mod:`streambus.stopping`; the contract is in
``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from streambus import DecodeError, StopFailed, StopOutcome, Subscription
from streambus.engines import ControlSink
from streambus.stopping import CONTROL_VERSION, StopReply, StopRequest, decode_stop, encode_stop

from ._common import ENV_PASSWORD, connect, redact, require_asyncio, resolve_url

if TYPE_CHECKING:
    import redis.asyncio as aioredis


__all__ = ["DEFAULT_CONTROL_CHANNEL", "RedisControl"]

log = structlog.get_logger("streambus.redis")

DEFAULT_CONTROL_CHANNEL = "streambus:control"
"""The Redis pub/sub channel stop requests travel on when the ``channel`` option is not set."""

_MAX_PENDING_REPLIES = 1024  # answers buffered per request: one per listening host


class RedisControl(ControlSink):
    """Carry stops between hosts over Redis pub/sub (config type ``redis-control``).

    Add it to every bus of the deployment, producer hosts and edges::

        [[sinks]]
        type = "redis-control"
        url = "redis://cache:6379/0"

    It reads no events (its subscription is drained and dropped). Needs asyncio.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``redis-control`` sink."""

        url: str | None = None
        """Redis URL; default ``$STREAMBUS_REDIS_URL`` or ``redis://127.0.0.1:6379/0``. ``rediss://`` for TLS."""
        channel: str = DEFAULT_CONTROL_CHANNEL
        """The pub/sub channel of stop requests; answers go to ``<channel>:reply:<origin>``."""
        reply_timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
        """Seconds a forwarded stop waits for the hosts' answers (then ``unknown``)."""
        tls: bool | None = None
        """Force TLS even for a ``redis://`` URL (CA and client cert from ``STREAMBUS_REDIS_TLS_*_FILE``)."""
        password_env: str = ENV_PASSWORD
        """The environment variable holding the password."""

        def __post_init__(self) -> None:
            if not self.channel:
                raise ValueError("channel: must not be empty")
            if not 0 < self.reply_timeout <= 60:
                raise ValueError(f"reply_timeout: must be within (0, 60] seconds, got {self.reply_timeout}")

    engine: ClassVar[str] = "redis"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: RedisControl.Options = self.resolve_options(options, kwargs)
        super().__init__()
        self._client: aioredis.Redis | None = None
        self._pending: dict[str, MemoryObjectSendStream[StopReply]] = {}

    @property
    def reply_channel(self) -> str:
        """Where this host's requests are answered."""
        return f"{self.options.channel}:reply:{self.origin}"

    async def run(self, events: Subscription) -> None:
        """Listen on the control channel until the bus closes the subscription."""
        require_asyncio("the redis-control sink")
        opts = self.options
        client = connect(opts.url, tls=opts.tls, password_env=opts.password_env, socket_timeout=None)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(opts.channel, self.reply_channel)
            self._client = client
            self.mark_ready()
            log.info("redis.control_started", url=redact(resolve_url(opts.url)), channel=opts.channel)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen, pubsub, client)
                while await events.receive_batch():
                    pass  # no events needed: the subscription only tells when the bus closes
                tg.cancel_scope.cancel()
        finally:
            self._client = None
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()
                await client.aclose()

    async def _listen(self, pubsub: Any, client: aioredis.Redis) -> None:
        import redis.exceptions as rex

        delay = 0.05
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                # redis-py reconnects and subscribes again on the next read.
                log.warning("redis.control_retry", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if message is None or message.get("type") != "message":
                continue
            try:
                decoded = decode_stop(message["data"])
            except DecodeError as exc:
                log.warning("redis.control_bad_message", error=str(exc))
                continue
            if decoded.v != CONTROL_VERSION:
                continue
            if isinstance(decoded, StopReply):
                waiter = self._pending.get(decoded.id)
                if waiter is not None:
                    with contextlib.suppress(anyio.WouldBlock):  # more answers than hosts: ignore the extra
                        waiter.send_nowait(decoded)
            elif decoded.origin != self.origin:
                await self._answer(client, decoded)

    async def _answer(self, client: aioredis.Redis, request: StopRequest) -> None:
        import redis.exceptions as rex

        reply = await self.answer(request)
        if reply.outcome == StopOutcome.STOPPED:
            log.info("redis.control_stopped", stream=request.stream, requested_by=request.origin)
        try:
            # Shielded: stopping the last stream may end this bus at once (a worker whose
            # producers finished), and the asking host must still get its answer.
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self.options.reply_timeout
                await client.publish(request.reply, encode_stop(reply))
        except (rex.RedisError, OSError) as exc:
            log.warning("redis.control_reply_failed", stream=request.stream, error=f"{type(exc).__name__}: {exc}")

    async def forward_stop(self, stream: str, *, reason: str, by: str) -> StopOutcome:
        """Ask every host on the control channel to stop *stream*; return what the owner answered.

        :attr:`~streambus.StopOutcome.FORWARDED` as soon as a host stopped it,
        :attr:`~streambus.StopOutcome.ENDED` when none did and one reports it ended,
        :attr:`~streambus.StopOutcome.UNKNOWN` when every host answered
        ``unknown`` or ``reply_timeout`` passed. Raises
        :class:`~streambus.StopFailed` when Redis cannot be reached.
        """
        import redis.exceptions as rex

        client = self._client
        if client is None:
            raise StopFailed("redis-control: not connected to Redis yet")
        request = StopRequest(
            id=secrets.token_hex(8), stream=stream, origin=self.origin, reply=self.reply_channel, reason=reason, by=by
        )
        send, receive = anyio.create_memory_object_stream[StopReply](_MAX_PENDING_REPLIES)
        self._pending[request.id] = send
        try:
            try:
                receivers = int(await client.publish(self.options.channel, encode_stop(request)))
            except (rex.RedisError, OSError) as exc:
                raise StopFailed(f"redis-control: cannot publish the stop: {type(exc).__name__}") from exc
            expected = receivers - 1  # this host hears its own request and ignores it
            answered = 0
            ended = False
            with anyio.move_on_after(self.options.reply_timeout):
                while answered < expected:
                    reply = await receive.receive()
                    answered += 1
                    if reply.outcome == StopOutcome.STOPPED:
                        return StopOutcome.FORWARDED
                    # An edge that already saw this very stop's abort says "ended" too:
                    # the owner's "stopped" is the better answer, so wait for every host.
                    ended = ended or reply.outcome == StopOutcome.ENDED
            if answered < expected:
                log.warning("redis.control_timeout", stream=stream, answered=answered, expected=expected)
            return StopOutcome.ENDED if ended else StopOutcome.UNKNOWN
        finally:
            del self._pending[request.id]
            send.close()
            receive.close()
