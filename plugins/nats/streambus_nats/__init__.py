"""streambus-nats: distributed mode over NATS JetStream.

A :class:`NatsSink` on the producers' bus publishes wire-form events to
JetStream, a subject per stream (``<prefix>.ev.<stream id>``), each message
de-duplicated by JetStream through its ``Nats-Msg-Id`` (the stream and its
seqs); a :class:`NatsSource` on another process's bus reads them back from a
saved stream sequence and republishes them, de-duplicated by (``stream``,
``seq``), so its sinks see every event exactly once, in order. Lost messages
(retention, a lost stream) and lost producers end the streams concerned with
an ``error`` event (``nats_gap``, ``producer_lost``), never with silence.
A :class:`NatsControl` on every bus carries stops (:meth:`streambus.Bus.stop`)
to the host whose producer owns the stream.

nats-py is asyncio-bound: both raise :class:`AsyncioRequired` under trio.
See ``docs/plugins/nats.md``.
"""

from __future__ import annotations

try:
    import nats  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"streambus-nats needs nats-py ({exc}); install it with: pip install 'streambus-nats' 'nats-py>=2.9'"
    ) from exc

from ._codec import decode_events, encode_message, message_id
from ._common import (
    DEFAULT_PREFIX,
    DEFAULT_STREAM_NAME,
    DEFAULT_URL,
    AsyncioRequired,
    NatsAuthFailed,
    NatsGap,
    NatsHeaderParserUnsupported,
    event_subject,
    heartbeat_subject,
)
from ._control import NatsControl
from ._sink import NatsSink
from ._source import NatsSource

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_STREAM_NAME",
    "DEFAULT_URL",
    "AsyncioRequired",
    "NatsAuthFailed",
    "NatsControl",
    "NatsGap",
    "NatsHeaderParserUnsupported",
    "NatsSink",
    "NatsSource",
    "decode_events",
    "encode_message",
    "event_subject",
    "heartbeat_subject",
    "message_id",
]
