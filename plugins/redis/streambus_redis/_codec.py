"""How events sit in a Redis stream entry (entry format v1).

One entry carries one or more events of one sink::

    o   origin: the id of the bus that wrote it (its own sources skip it)
    p   the writing sink instance (random per sink run)
    c   that instance's entry counter: 1, 2, 3, ... (a jump reveals lost entries)
    e   the events, wire form, as JSON Lines (``streambus.encode_many``)

Packing many events into one entry is what makes the throughput: Redis's
cost is per entry, the JSON is the same either way (see ``bench/bench_redis.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import structlog

from streambus import DecodeError, Event, decode, encode_many

__all__ = ["Entry", "decode_entry", "encode_entry"]

log = structlog.get_logger("streambus.redis")

_lines_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


class Entry(msgspec.Struct, frozen=True):
    """A decoded stream entry."""

    origin: str
    producer: str
    counter: int
    events: list[Event]
    bad_lines: int = 0


def encode_entry(origin: str, producer: str, counter: int, events: list[Event]) -> dict[str | bytes, bytes | str | int]:
    """The fields of one entry carrying *events*."""
    return {"o": origin, "p": producer, "c": counter, "e": encode_many(events)}


def decode_entry(key: str, entry_id: str, fields: Mapping[bytes, bytes] | None) -> Entry | None:
    """Decode one entry's fields; ``None`` for an entry that is not ours (logged).

    A line that is not a valid event is logged with its entry id and line
    number and skipped; every valid event of the entry is kept.
    """
    if not fields or b"e" not in fields:
        log.warning(
            "redis.foreign_entry", key=key, id=entry_id, fields=sorted(f.decode(errors="replace") for f in fields or {})
        )
        return None
    payload = fields[b"e"]
    try:
        counter = int(fields.get(b"c", b"0"))
    except ValueError:
        counter = 0
    origin = fields.get(b"o", b"").decode(errors="replace")
    producer = fields.get(b"p", b"").decode(errors="replace")
    try:
        events = _lines_decoder.decode_lines(payload)
        return Entry(origin, producer, counter, events)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    # Slow path: find the bad lines, keep the good ones.
    events = []
    bad = 0
    for number, line in enumerate(payload.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            events.append(decode(line))
        except DecodeError as exc:
            bad += 1
            log.error("redis.bad_event", key=key, id=entry_id, line=number, error=str(exc), field=exc.field)
    return Entry(origin, producer, counter, events, bad)
