"""The ``nats-control`` sink: carry stop requests between hosts over NATS (core request/reply).

Every host of a distributed deployment (producer hosts and edges alike) adds
one. It does two things on its bus:

- it is the bus's stop route (:meth:`streambus.Bus.add_stop_route`): a stop
  for a stream whose producer runs elsewhere is published on
  ``<prefix>.control.stop`` as a :class:`streambus.stopping.StopRequest` whose
  ``reply`` is a fresh inbox, and the answers
  (:class:`~streambus.stopping.StopReply`) are collected there;
- it listens on ``<prefix>.control.stop``: a request from another host is
  handed to ``bus.stop(..., forward=False)``, so the host whose producer owns
  the stream cancels it (closing the upstream HTTP request) and its ``abort``
  event travels to every edge like any other event. Every listening host
  answers once: ``stopped``, ``ended`` or ``unknown``.

NATS does not say how many subscribers a message reached (Redis's
``PUBLISH`` does), so each control sink announces itself every second on
``<prefix>.control.here.<origin>``: the asking host waits for the first
``stopped``, or an answer from every host it heard from in the last three
seconds, or ``reply_timeout``, whichever comes first. The messages are the
engine-neutral ones of :mod:`streambus.stopping`; the contract is in
``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import anyio
import msgspec
import structlog

from streambus import DecodeError, StopFailed, StopOutcome, Subscription
from streambus.engines import ControlSink
from streambus.stopping import CONTROL_VERSION, StopReply, StopRequest, decode_stop, encode_stop

from ._common import DEFAULT_PREFIX, check_prefix, connect, redact, require_asyncio, resolve_url

if TYPE_CHECKING:
    import nats.aio.client
    import nats.aio.msg


__all__ = ["NatsControl"]

log = structlog.get_logger("streambus.nats")

_MAX_PENDING_REPLIES = 1024  # answers buffered per request: one per listening host (more are dropped)
_HERE_EVERY = 1.0  # seconds between two announcements of a control sink
_HERE_FOR = 3.0  # a host not heard from this long is not waited for


class NatsControl(ControlSink):
    """Carry stops between hosts over NATS (config type ``nats-control``).

    Add it to every bus of the deployment, producer hosts and edges::

        [[sinks]]
        type = "nats-control"
        url = "nats://nats:4222"

    It reads no events (its subscription is drained and dropped). Needs asyncio.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``nats-control`` sink."""

        url: str | None = None
        """Server URL(s), comma-separated; default ``$STREAMBUS_NATS_URL`` or ``nats://127.0.0.1:4222``."""
        prefix: str = DEFAULT_PREFIX
        """Subject prefix: requests travel on ``<prefix>.control.stop``."""
        reply_timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
        """Seconds a forwarded stop waits for the hosts' answers (then ``ended`` or ``unknown``)."""
        reconnect_wait_s: Annotated[float, msgspec.Meta(ge=0.01, le=60)] = 0.25
        """nats-py's wait between reconnect attempts (plus its jitter)."""

        def __post_init__(self) -> None:
            check_prefix(self.prefix)

    engine: ClassVar[str] = "nats"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: NatsControl.Options = self.resolve_options(options, kwargs)
        super().__init__()
        self._client: nats.aio.client.Client | None = None
        self._peers: dict[str, float] = {}

    @property
    def subject(self) -> str:
        """Where stop requests travel."""
        return f"{self.options.prefix}.control.stop"

    async def run(self, events: Subscription) -> None:
        """Listen on the control subject until the bus closes the subscription."""
        require_asyncio("the nats-control sink")
        opts = self.options
        client = await connect(opts.url, name=f"streambus-control-{self.origin}", reconnect_wait=opts.reconnect_wait_s)
        try:
            await client.subscribe(self.subject, cb=self._on_request)
            await client.subscribe(f"{opts.prefix}.control.here.*", cb=self._on_here)
            await client.flush()
            self._client = client
            self.mark_ready()
            log.info("nats.control_started", url=redact(resolve_url(opts.url)), subject=self.subject)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._announce, client)
                while await events.receive_batch():
                    pass  # no events needed: the subscription only tells when the bus closes
                tg.cancel_scope.cancel()
        finally:
            self._client = None
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await client.close()

    async def _announce(self, client: nats.aio.client.Client) -> None:
        import nats.errors

        subject = f"{self.options.prefix}.control.here.{self.origin}"
        while True:
            if client.is_connected:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await client.publish(subject, b"")
            await anyio.sleep(_HERE_EVERY)

    async def _on_here(self, msg: nats.aio.msg.Msg) -> None:
        origin = msg.subject.rpartition(".")[2]
        if origin != self.origin:
            self._peers[origin] = anyio.current_time()
            if len(self._peers) > 10_000:
                now = anyio.current_time()
                self._peers = {o: t for o, t in self._peers.items() if now - t < _HERE_FOR}

    async def _on_request(self, msg: nats.aio.msg.Msg) -> None:
        try:
            decoded = decode_stop(msg.data)
        except DecodeError as exc:
            log.warning("nats.control_bad_message", error=str(exc))
            return
        if decoded.v != CONTROL_VERSION or not isinstance(decoded, StopRequest) or decoded.origin == self.origin:
            return
        await self._answer(decoded)

    async def _answer(self, request: StopRequest) -> None:
        import nats.errors

        reply = await self.answer(request)
        if reply.outcome == StopOutcome.STOPPED:
            log.info("nats.control_stopped", stream=request.stream, requested_by=request.origin)
        client = self._client
        if client is None:
            return
        try:
            # Shielded: stopping the last stream may end this bus at once, and the asking host must still hear.
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self.options.reply_timeout
                await client.publish(request.reply, encode_stop(reply))
                await client.flush()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            log.warning("nats.control_reply_failed", stream=request.stream, error=f"{type(exc).__name__}: {exc}")

    def _live_peers(self) -> int:
        now = anyio.current_time()
        return sum(1 for seen in self._peers.values() if now - seen < _HERE_FOR)

    async def forward_stop(self, stream: str, *, reason: str, by: str) -> StopOutcome:
        """Ask every host on the control subject to stop *stream*; return what the owner answered.

        :attr:`~streambus.StopOutcome.FORWARDED` as soon as a host stopped it,
        :attr:`~streambus.StopOutcome.ENDED` when none did and one reports it ended,
        :attr:`~streambus.StopOutcome.UNKNOWN` when every host heard from answered
        ``unknown`` or ``reply_timeout`` passed. Raises
        :class:`~streambus.StopFailed` when NATS cannot be reached.
        """
        import nats.errors

        client = self._client
        if client is None or not client.is_connected:
            raise StopFailed("nats-control: not connected to NATS")
        inbox = client.new_inbox()
        request = StopRequest(
            id=secrets.token_hex(8), stream=stream, origin=self.origin, reply=inbox, reason=reason, by=by
        )
        send, receive = anyio.create_memory_object_stream[StopReply](_MAX_PENDING_REPLIES)

        async def on_reply(msg: nats.aio.msg.Msg) -> None:
            try:
                decoded = decode_stop(msg.data)
            except DecodeError as exc:
                log.warning("nats.control_bad_message", error=str(exc))
                return
            if isinstance(decoded, StopReply) and decoded.id == request.id:
                with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                    send.send_nowait(decoded)

        try:
            sub = await client.subscribe(inbox, cb=on_reply)
        except (nats.errors.Error, OSError) as exc:
            raise StopFailed(f"nats-control: cannot listen for answers: {type(exc).__name__}") from exc
        try:
            try:
                await client.publish(self.subject, encode_stop(request))
                await client.flush(timeout=math.ceil(self.options.reply_timeout))
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise StopFailed(f"nats-control: cannot publish the stop: {type(exc).__name__}") from exc
            expected = self._live_peers()
            answered = 0
            ended = False
            with anyio.move_on_after(self.options.reply_timeout):
                while answered < expected or not expected:
                    reply = await receive.receive()
                    answered += 1
                    if reply.outcome == StopOutcome.STOPPED:
                        return StopOutcome.FORWARDED
                    # An edge that already saw this very stop's abort says "ended" too:
                    # the owner's "stopped" is the better answer, so wait for every host.
                    ended = ended or reply.outcome == StopOutcome.ENDED
            if answered < expected:
                log.warning("nats.control_timeout", stream=stream, answered=answered, expected=expected)
            return StopOutcome.ENDED if ended else StopOutcome.UNKNOWN
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            send.close()
            receive.close()
