"""How events sit in a Redis stream entry (entry format v1).

One entry carries one or more events of one sink::

    o   origin: the id of the bus that wrote it (its own sources skip it)
    p   the writing sink instance (random per sink run)
    c   that instance's entry counter: 1, 2, 3, ... (a jump reveals lost entries)
    e   the events, wire form, as JSON Lines (``streambus.encode_many``)
    h   (optional) the sender's heartbeat timeout in ms: it keeps
        ``<prefix>:producer:<p>`` alive, and a consumer ends its streams with
        ``producer_lost`` once that key is gone

Packing many events into one entry is what makes the throughput: Redis's
cost is per entry, the JSON is the same either way (see ``bench/bench_redis.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import structlog

from streambus import Event, encode_many
from streambus.events import decode_many

__all__ = ["Entry", "decode_entry", "decode_events", "encode_entry", "entry_header"]

log = structlog.get_logger("streambus.redis")


class Entry(msgspec.Struct, frozen=True):
    """A decoded stream entry."""

    origin: str
    producer: str
    counter: int
    events: list[Event]
    bad_lines: int = 0


def encode_entry(
    origin: str, producer: str, counter: int, events: list[Event], *, heartbeat_ms: int = 0
) -> dict[str | bytes, bytes | str | int]:
    """The fields of one entry carrying *events* (with ``h`` when the sender keeps a heartbeat)."""
    fields: dict[str | bytes, bytes | str | int] = {"o": origin, "p": producer, "c": counter, "e": encode_many(events)}
    if heartbeat_ms:
        fields["h"] = heartbeat_ms
    return fields


def entry_header(key: str, entry_id: str, fields: Mapping[bytes, bytes] | None) -> tuple[str, str, int] | None:
    """``(origin, producer, counter)`` of an entry, without decoding its events.

    ``None`` (logged) for an entry that is not ours.
    """
    if not fields or b"e" not in fields:
        names = sorted(f.decode(errors="replace") for f in fields or {})
        log.warning("redis.foreign_entry", key=key, id=entry_id, fields=names)
        return None
    try:
        counter = int(fields.get(b"c", b"0"))
    except ValueError:
        counter = 0
    return fields.get(b"o", b"").decode(errors="replace"), fields.get(b"p", b"").decode(errors="replace"), counter


def decode_events(key: str, entry_id: str, payload: bytes) -> tuple[list[Event], int]:
    """The events of an entry's ``e`` field and how many lines were bad.

    A line that is not a valid event is logged with its entry id and line
    number and skipped; every valid event of the entry is kept.
    """
    events, refused = decode_many(payload)
    for number, exc in refused:
        log.error("redis.bad_event", key=key, id=entry_id, line=number, error=str(exc), field=exc.field)
    return events, len(refused)


def decode_entry(key: str, entry_id: str, fields: Mapping[bytes, bytes] | None) -> Entry | None:
    """Decode one entry's fields; ``None`` for an entry that is not ours (logged).

    Bad lines are logged and skipped (see :func:`decode_events`).
    """
    header = entry_header(key, entry_id, fields)
    if header is None or fields is None:
        return None
    events, bad = decode_events(key, entry_id, fields[b"e"])
    return Entry(header[0], header[1], header[2], events, bad)
