"""How events sit in a JetStream message (message format v1).

One message carries consecutive events of **one** stream, on that stream's
subject (``<prefix>.ev.<stream id>``)::

    Nats-Msg-Id   <stream>:<first seq>-<last seq>   JetStream drops a re-sent copy within its duplicate window
    Sb-Origin     the id of the bus that wrote it (its own sources skip it)
    Sb-Producer   the writing sink instance (random per sink): whose heartbeat vouches for the stream
    payload       the events, wire form, as JSON Lines (``streambus.encode_many``)

A line that is not a valid event is logged with the message's stream
sequence and line number and skipped; every valid event is kept (its stream
then has a hole in ``seq``, which the source reports rather than hides).
"""

from __future__ import annotations

import structlog

from streambus import DeltaEvent, Event, encode_many
from streambus.events import decode_many

__all__ = ["HEADER_ORIGIN", "HEADER_PRODUCER", "decode_events", "encode_message", "message_id"]

log = structlog.get_logger("streambus.nats")

HEADER_ORIGIN = "Sb-Origin"
"""The header naming the bus that wrote a message."""

HEADER_PRODUCER = "Sb-Producer"
"""The header naming the sink instance that wrote a message."""


def message_id(events: list[Event]) -> str:
    """The ``Nats-Msg-Id`` of a message carrying *events* (one stream, consecutive seqs).

    The stream and the seqs it carries: a sink re-sending the same message
    after a lost acknowledgement sends the same id, which JetStream drops.
    """
    first, last = events[0], events[-1]
    low = first.seq_range[0] if isinstance(first, DeltaEvent) else first.seq
    return f"{first.stream}:{low}-{last.seq}"


def encode_message(origin: str, producer: str, events: list[Event]) -> tuple[dict[str, str], bytes]:
    """The headers and payload of one message carrying *events* of one stream."""
    headers = {"Nats-Msg-Id": message_id(events), HEADER_ORIGIN: origin, HEADER_PRODUCER: producer}
    return headers, encode_many(events)


def decode_events(where: str, payload: bytes) -> tuple[list[Event], int]:
    """The events of a message's payload and how many lines were bad.

    A line that is not a valid event is logged (``nats.bad_event``) with
    *where* (the message's stream sequence) and its line number, and skipped.
    """
    events, refused = decode_many(payload)
    for number, exc in refused:
        log.error("nats.bad_event", message=where, line=number, error=str(exc), field=exc.field)
    return events, len(refused)
