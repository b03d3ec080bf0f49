"""Stopping a stream from anywhere: the outcome of a stop, and the contract of a stop route.

A user presses Stop at an edge (an HTTP route, a WebSocket ``abort``
operation, the CLI). The edge calls :meth:`Bus.stop <streambus.Bus.stop>`::

    outcome = await bus.stop(stream_id, reason="user pressed stop")
    if outcome is StopOutcome.UNKNOWN:
        ...  # 404: no producer here or behind a route owns that stream

The bus answers by itself when the stream's producer runs in this process
(:attr:`StopOutcome.STOPPED`: its writer is cancelled, which closes the
upstream HTTP response and publishes the one ``abort`` event) or when the
stream already ended here (:attr:`StopOutcome.ENDED`, a clean no-op).
Otherwise it asks its *stop routes* in turn: an engine that links this bus
to other processes (``redis-control`` in ``streambus-redis``) registers one
with :meth:`Bus.add_stop_route <streambus.Bus.add_stop_route>` and carries
the request to the host whose producer owns the stream.

A route speaks :class:`StopRequest` / :class:`StopReply` (one JSON object
each, :func:`encode_stop` and :func:`decode_stop`), so every engine carries
the same messages; the contract is in ``docs/distributed.md``.
"""

from __future__ import annotations

import enum
from typing import Final, Protocol, runtime_checkable

import msgspec

from .errors import DecodeError, StopFailed
from .validation import validation_problem

__all__ = [
    "CONTROL_VERSION",
    "StopFailed",
    "StopOutcome",
    "StopReply",
    "StopRequest",
    "StopRoute",
    "decode_stop",
    "encode_stop",
]

CONTROL_VERSION: Final = 1
"""The ``v`` of every control message; a receiver ignores messages of another version."""


class StopOutcome(enum.StrEnum):
    """What became of a stop request (the answer of :meth:`Bus.stop <streambus.Bus.stop>`)."""

    STOPPED = "stopped"
    """The stream's producer runs on this bus and was cancelled; its ``abort`` event follows."""
    FORWARDED = "forwarded"
    """A stop route carried the request to the host that owns the stream, which stopped it."""
    ENDED = "ended"
    """The stream had already ended (``end``, ``error`` or ``abort``): nothing to do."""
    UNKNOWN = "unknown"
    """Neither this bus nor any route knows a live stream with that id."""


@runtime_checkable
class StopRoute(Protocol):
    """Carries a stop to the host that owns a stream (see :meth:`Bus.add_stop_route <streambus.Bus.add_stop_route>`).

    ``forward_stop`` returns :attr:`StopOutcome.FORWARDED` when the owner
    stopped the stream, :attr:`StopOutcome.ENDED` when the owner reports it
    already ended, and :attr:`StopOutcome.UNKNOWN` when no host behind the
    route owns it. It raises :class:`StopFailed` when its engine cannot be
    reached, and bounds its own wait.
    """

    async def forward_stop(self, stream: str, *, reason: str, by: str) -> StopOutcome:
        """Ask the owner of *stream* to stop it with ``abort(reason, by)``."""


class StopRequest(msgspec.Struct, tag="stop", tag_field="op", forbid_unknown_fields=False, kw_only=True):
    """A stop carried by an engine: ``{"op": "stop", "v": 1, "id", "stream", "reason", "by", "origin", "reply"}``.

    *id* pairs replies with the request; *origin* names the sending bus (so it
    ignores its own request); *reply* is where answers go (a Redis channel, a
    NATS inbox...).
    """

    id: str
    stream: str
    origin: str
    reply: str
    reason: str = ""
    by: str = "client"
    v: int = CONTROL_VERSION


class StopReply(msgspec.Struct, tag="stopped", tag_field="op", forbid_unknown_fields=False, kw_only=True):
    """One host's answer: ``{"op": "stopped", "v": 1, "id", "stream", "outcome", "origin"}``.

    *outcome* is ``stopped`` (this host owned the stream and cancelled it),
    ``ended`` or ``unknown``. Every host that received the request answers once.
    """

    id: str
    stream: str
    origin: str
    outcome: str
    v: int = CONTROL_VERSION


_decoder: msgspec.json.Decoder[StopRequest | StopReply] = msgspec.json.Decoder(StopRequest | StopReply)
_encoder = msgspec.json.Encoder()


def encode_stop(message: StopRequest | StopReply) -> bytes:
    """The JSON form of a control message."""
    return _encoder.encode(message)


def decode_stop(data: bytes | str) -> StopRequest | StopReply:
    """Read a control message; raise :class:`~streambus.DecodeError` naming the field that is wrong."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        found = validation_problem(exc)
        raise DecodeError(f"control message: {found.describe()}", field=found.field) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"control message is not JSON: {exc}") from None
