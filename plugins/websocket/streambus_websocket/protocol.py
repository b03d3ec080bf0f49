"""The broadcaster's wire protocol (version 1), without any I/O.

Every frame is one JSON text frame. Control frames carry ``op``; events are
sent in their wire form (they carry ``type`` instead). The full description,
with examples, is ``docs/websocket-protocol.md``.

Client to server: ``subscribe``, ``unsubscribe``, ``ping``, ``abort``.
Server to client: ``hello``, ``subscribed``, ``unsubscribed``, ``pong``,
``aborted``, ``error``, and events.

:func:`parse_client_message` turns one inbound frame into a typed message or
raises :class:`ProtocolError` carrying the error code to answer with.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec

from streambus import Filter, StreamBusError
from streambus.validation import validation_problem

__all__ = [
    "MAX_REASON",
    "MAX_STREAM_ID",
    "PROTOCOL_VERSION",
    "Abort",
    "ClientMessage",
    "CloseCode",
    "ErrorCode",
    "Ping",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "control_frame",
    "error_frame",
    "parse_client_message",
]

PROTOCOL_VERSION: Final = 1
"""Sent in ``hello``; bumped on any incompatible change."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broadcaster uses (4000-4999 are its own)."""

    NORMAL = 1000
    """The client or the server ended the session normally."""
    GOING_AWAY = 1001
    """The server is shutting down; reconnect later and resume with ``since``."""
    MESSAGE_TOO_BIG = 1009
    """An inbound frame exceeded ``max_message_bytes`` (sent by the WebSocket layer)."""
    INTERNAL_ERROR = 1011
    """The server hit a bug; details are in its log, never in the frame."""
    SERVICE_RESTART = 1012
    """The server asked clients to reconnect (for example after a deploy)."""
    UNAUTHORIZED = 4001
    """No token or a wrong token; do not retry without a new token."""
    TOO_MANY_CLIENTS = 4002
    """The server holds ``max_clients`` connections; retry later with backoff."""
    LAGGED = 4003
    """The client read too slowly and its buffer passed ``client_buffer_bytes``; reconnect with ``since``."""
    RATE_LIMITED = 4004
    """The client kept sending faster than ``max_message_rate`` after being warned."""
    TOKEN_EXPIRED = 4005
    """The scoped token the client connected with reached its ``exp``; reconnect with a new token and ``since``."""


class ErrorCode(enum.StrEnum):
    """Codes of ``error`` frames. The connection stays open unless a close follows."""

    BAD_JSON = "bad_json"
    """The frame is not valid JSON (or not a JSON object)."""
    BAD_MESSAGE = "bad_message"
    """Valid JSON, but a field is missing, unknown or of the wrong type (``field`` names it)."""
    UNKNOWN_OP = "unknown_op"
    """``op`` names no operation of this protocol version."""
    BINARY_FRAME = "binary_frame"
    """The protocol uses text frames only."""
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    """The client already holds ``max_subscriptions`` subscriptions."""
    TOO_MANY_STREAMS = "too_many_streams"
    """A ``subscribe`` named more than ``max_subscribe_streams`` streams (``streams`` and ``since`` together)."""
    DUPLICATE_SUBSCRIPTION = "duplicate_subscription"
    """A subscription with this ``id`` exists; unsubscribe it first."""
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    """``unsubscribe`` named an ``id`` that is not subscribed."""
    RATE_LIMITED = "rate_limited"
    """The message was dropped: the client sends faster than ``max_message_rate``."""
    UNAUTHORIZED = "unauthorized"
    """Sent just before closing with :attr:`CloseCode.UNAUTHORIZED`; the message says what was wrong with the token."""
    FORBIDDEN = "forbidden"
    """Outside what this connection may do: a ``subscribe`` beyond the token's scope (nothing was subscribed),
    or an ``abort`` without the stop right, of a stream outside the scope, or with ``allow_stop = false``."""
    TOKEN_EXPIRED = "token_expired"
    """Sent just before closing with :attr:`CloseCode.TOKEN_EXPIRED`."""
    TOO_MANY_CLIENTS = "too_many_clients"
    """Sent just before closing with :attr:`CloseCode.TOO_MANY_CLIENTS`."""
    LAGGED = "lagged"
    """Sent (when the socket still takes it) before closing with :attr:`CloseCode.LAGGED`."""
    INTERNAL = "internal"
    """The server failed handling this message; the message carries no internals."""
    UNKNOWN_STREAM = "unknown_stream"
    """``abort`` named a stream that no producer (here or behind the engine) owns."""
    STOP_FAILED = "stop_failed"
    """The stop could not reach the host that owns the stream (its engine is unreachable); retry later."""


class ProtocolError(StreamBusError):
    """An inbound frame was rejected; answer with :func:`error_frame` built from it."""

    def __init__(self, code: ErrorCode, message: str, *, field: str | None = None, id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.id = id


# A ``meta`` filter value: a JSON scalar.
_Scalar = str | int | float | bool | None


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """``subscribe``: receive the streams matching the filters (all streams when none is given).

    ``since`` maps stream ids to the last ``seq`` the client saw: missed events
    are replayed from history, all or nothing. ``snapshot`` asks for the text
    so far of every live stream as one coalesced delta per channel. ``recent``
    asks for up to that many recently ended streams, whole, from history.
    """

    id: str | int = 0
    streams: list[str] | None = None
    models: list[str] | None = None
    providers: list[str] | None = None
    # A value, or a list of accepted values (what Filter.matches compares): nothing nested.
    meta: dict[str, _Scalar | list[_Scalar]] | None = None
    since: dict[str, int] | None = None
    snapshot: bool = False
    recent: Annotated[int, msgspec.Meta(ge=0)] = 0

    def to_filter(self) -> Filter:
        """The bus :class:`~streambus.Filter` this subscription describes."""
        return Filter.of(streams=self.streams, models=self.models, providers=self.providers, meta=self.meta)


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """``unsubscribe``: stop receiving the streams of subscription ``id``."""

    id: str | int = 0


class Ping(msgspec.Struct, tag="ping", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """``ping``: the server answers ``pong`` (an application-level liveness check for browsers)."""

    id: str | int | None = None


MAX_STREAM_ID: Final = 256
"""Longest stream id an ``abort`` may name, in characters."""
MAX_REASON: Final = 200
"""Longest ``reason`` an ``abort`` may carry, in characters."""


class Abort(msgspec.Struct, tag="abort", tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """``abort``: stop stream ``stream`` wherever its producer runs.

    The server answers ``aborted`` with the ``outcome`` (``stopped``,
    ``forwarded`` or ``ended``), or an ``error`` (``unknown_stream``,
    ``forbidden``, ``stop_failed``). Subscribers of the stream then receive
    its one ``abort`` event (``by = "client"``).
    """

    stream: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STREAM_ID)]
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON)] = ""
    id: str | int | None = None


ClientMessage = Subscribe | Unsubscribe | Ping | Abort
"""Any message a client may send."""

_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()
_OPS = "subscribe, unsubscribe, ping, abort"


class _Id(msgspec.Struct):
    """Just the ``id`` of a frame that failed validation, so the error can echo it."""

    id: str | int | None = None


_id_decoder = msgspec.json.Decoder(_Id)
_MAX_ECHOED_ID = 256


def _echoed_id(data: str | bytes) -> str | int | None:
    try:
        found = _id_decoder.decode(data).id
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(found, str) and len(found) > _MAX_ECHOED_ID:
        return None
    return found


def parse_client_message(data: str | bytes) -> ClientMessage:
    """Decode one inbound text frame.

    Raises :class:`ProtocolError` with ``bad_json``, ``unknown_op`` or
    ``bad_message`` (naming the offending field) for anything else; a
    ``bad_message`` or ``unknown_op`` echoes the frame's ``id`` when it has a
    valid one, so a client can match the error with its request.
    """
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        error = _invalid(exc)
        if error.code is not ErrorCode.BAD_JSON:
            error.id = _echoed_id(data)
        raise error from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"invalid JSON: {exc}") from None
    except RecursionError:
        # msgspec recurses into values it skips (an unknown field before "op"); ~1000 levels run out.
        raise ProtocolError(ErrorCode.BAD_JSON, "JSON nested too deeply") from None


def _invalid(exc: msgspec.ValidationError) -> ProtocolError:
    """The :class:`ProtocolError` for a frame that is JSON but not a valid message."""
    found = validation_problem(exc)
    field, problem = found.path, found.message
    if field == "$.op":
        return ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op (expected one of: {_OPS})", field="op")
    if found.missing == "op":
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"missing field 'op' (one of: {_OPS})", field="op")
    if problem.startswith("Expected `object`") and field is None:
        return ProtocolError(ErrorCode.BAD_JSON, "a frame must be one JSON object")
    if found.missing is not None:
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"missing field {found.missing!r}", field=found.missing)
    if found.unknown is not None:
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown field {found.unknown!r}", field=found.unknown)
    path = field[2:] if field and field.startswith("$.") else field
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{path}: {problem}" if path else problem, field=path)


def control_frame(op: str, **fields: Any) -> bytes:
    """Encode a server control frame ``{"op": op, **fields}`` (``None`` values are left out)."""
    return _encoder.encode({"op": op, **{k: v for k, v in fields.items() if v is not None}})


def error_frame(code: ErrorCode, message: str, *, field: str | None = None, id: str | int | None = None) -> bytes:
    """Encode an ``error`` frame; ``message`` must never contain internals (tracebacks, paths)."""
    return control_frame("error", code=code.value, message=message, field=field, id=id)
