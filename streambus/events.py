"""Typed, immutable events and their JSON wire codec (wire format v1).

Every event is a frozen :mod:`msgspec` ``Struct``; on the wire it is one JSON
object whose ``type`` field names the kind (``start``, ``delta``, ``end``,
``error``, ``abort``, ``moderation``). The representation was chosen by
measurement (see ``docs/events.md``): msgspec encodes these structs as fast as
orjson encodes plain dicts, and decodes *with validation* of the tagged union.

Use :func:`encode` / :func:`decode` for single events,
:func:`encode_each` for a batch as one payload per event, and
:func:`encode_many` for a newline-joined batch. Decoding ignores unknown
fields (so newer producers can talk to older consumers) and raises
:class:`~streambus.errors.DecodeError` naming the field for anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from .errors import DecodeError
from .validation import validation_problem

__all__ = [
    "CONTROL_TYPES",
    "TERMINAL_TYPES",
    "AbortEvent",
    "Channel",
    "DeltaEvent",
    "EndEvent",
    "ErrorEvent",
    "Event",
    "ModerationEvent",
    "StartEvent",
    "Usage",
    "decode",
    "decode_many",
    "encode",
    "encode_each",
    "encode_many",
    "is_terminal",
    "to_builtins",
]

Channel: TypeAlias = Literal["content", "reasoning", "tool"]

# Bounds a decoded event must respect (constructing an event does not check them).
# 2**53 - 1 is the largest integer every JSON reader, JavaScript included, holds
# exactly; a delta never merges more chunks than a 32-bit counter holds.
_JSON_INT_MAX: Final = 2**53 - 1
_Count: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=_JSON_INT_MAX)]
_Chunks: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class _Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True, gc=False):
    """Fields common to every event.

    Events are not tracked by Python's cyclic garbage collector (``gc=False``):
    they are immutable and hold JSON data, so they cannot form a reference
    cycle, and a bus allocates so many of them that tracking them triggered
    full collections of ~30 ms mid-stream (see ``docs/decisions.md``). Put
    only JSON data in ``meta`` (the wire format demands it anyway).

    Only ``delta`` (the hot path) omits fields equal to their defaults on the
    wire; every other event carries all its fields, so a reader in any
    language needs no table of defaults for them.
    """

    stream: str
    """Id of one model response: unique, URL-safe."""
    seq: _Count
    """0 for ``start``, +1 for each later event of the stream."""
    ts: float
    """Producer wall clock, UNIX seconds."""


class StartEvent(_Base, frozen=True, kw_only=True, omit_defaults=False, tag="start"):
    """First event of every stream: who is answering, and the request's tags."""

    model: str = ""
    provider: str = ""
    meta: dict[str, Any] = {}


class DeltaEvent(_Base, frozen=True, kw_only=True, tag="delta"):
    """A piece of generated text.

    ``n`` counts the provider chunks merged into this delta (1 at the source).
    When several deltas were coalesced, ``seq`` is the last merged seq and
    ``first_seq`` the first; otherwise ``first_seq`` is ``None``.
    """

    text: str
    channel: Channel = "content"
    n: _Chunks = 1
    first_seq: _Count | None = None

    @property
    def seq_range(self) -> tuple[int, int]:
        """The inclusive range of source seqs this delta carries."""
        return (self.seq if self.first_seq is None else self.first_seq, self.seq)


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Token counts of a response; ``source`` says who counted them.

    ``prompt_tokens`` counts every input token, cached ones included, and
    ``completion_tokens`` every output token, reasoning included, whatever
    the provider's own split (``docs/events.md`` maps each provider's fields).
    The optional counts are ``None`` (and absent on the wire) when the
    provider did not report them: ``cached_input_tokens`` (input read from a
    prompt cache), ``cache_creation_input_tokens`` (input written to one;
    Anthropic bills those apart) and ``reasoning_tokens`` (the part of the
    output spent thinking).
    """

    prompt_tokens: _Count | None = None
    completion_tokens: _Count | None = None
    total_tokens: _Count | None = None
    source: Literal["provider", "counted"] = "provider"
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_tokens: int | None = None


class EndEvent(_Base, frozen=True, kw_only=True, omit_defaults=False, tag="end"):
    """Normal end of a stream, with usage and provider timings when known."""

    reason: str = "stop"
    usage: Usage | None = None
    timings: dict[str, float] = {}


class ErrorEvent(_Base, frozen=True, kw_only=True, omit_defaults=False, tag="error"):
    """The stream failed. ``kind`` is a stable machine-readable name."""

    kind: str
    message: str = ""
    retryable: bool = False


class AbortEvent(_Base, frozen=True, kw_only=True, omit_defaults=False, tag="abort"):
    """The stream was stopped on purpose; ``by`` says who stopped it."""

    reason: str = ""
    by: str = "client"


class ModerationEvent(_Base, frozen=True, kw_only=True, omit_defaults=False, tag="moderation"):
    """A moderation verdict about the characters ``[start, end)`` of a channel.

    Offsets count characters of that channel's text from the stream's start.
    ``action`` is ``flag``, ``redact``, ``retract`` (clients remove the span
    already shown) or ``abort``.
    """

    verdict: str = "flagged"
    categories: list[str] = []
    action: Literal["flag", "redact", "retract", "abort"] = "flag"
    start: _Count = 0
    end: _Count = 0
    channel: Channel = "content"
    scores: dict[str, float] = {}


Event: TypeAlias = StartEvent | DeltaEvent | EndEvent | ErrorEvent | AbortEvent | ModerationEvent
"""Any event."""

TERMINAL_TYPES: Final = (EndEvent, ErrorEvent, AbortEvent)
"""The event classes that close a stream; each stream has exactly one."""

CONTROL_TYPES: Final = (StartEvent, EndEvent, ErrorEvent, AbortEvent, ModerationEvent)
"""Events that overflow policies never merge or drop."""

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def is_terminal(event: Event) -> bool:
    """Return whether *event* closes its stream (``end``, ``error``, ``abort``)."""
    return isinstance(event, TERMINAL_TYPES)


def encode(event: Event) -> bytes:
    """Encode *event* as one compact JSON object (wire form, no newline)."""
    return _encoder.encode(event)


def encode_each(events: Iterable[Event]) -> list[bytes]:
    """Encode each of *events* as :func:`encode` does: one payload per event, in order (no call per event)."""
    return list(map(_encoder.encode, events))


def encode_many(events: list[Event]) -> bytes:
    """Encode *events* as JSON Lines: one object per line, newline-terminated."""
    buf = bytearray()
    for event in events:
        _encoder.encode_into(event, buf, len(buf))
        buf.extend(b"\n")
    return bytes(buf)


def decode(data: bytes | bytearray | memoryview | str) -> Event:
    """Decode one wire-form JSON object into an event.

    Unknown fields are ignored. Raises :class:`~streambus.errors.DecodeError`
    naming the field when the JSON is invalid (nested too deeply included),
    ``type`` is unknown, or a required field is missing, of the wrong type or
    out of bounds (integers: ``seq``, token counts and offsets within
    0..2**53-1, ``n`` within 1..2**31-1).
    """
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        problem = validation_problem(exc)
        field = problem.field if problem.missing else problem.path
        raise DecodeError(f"invalid event: {exc}", field=field) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"invalid event JSON: {exc}") from None
    except RecursionError:
        # msgspec stops at Python's recursion limit (it raises, it does not crash):
        # a value nested that deep is hostile input, not an event.
        raise DecodeError("invalid event JSON: nested too deeply") from None


def decode_many(data: bytes) -> tuple[list[Event], list[tuple[int, DecodeError]]]:
    """Decode JSON Lines (what :func:`encode_many` writes): the valid events, and why each other line was refused.

    One bad line costs only itself: every valid event is returned in order,
    and each refused line as ``(line number from 1, DecodeError)``. Blank
    lines are skipped. A batch with no bad line is decoded in one call.
    """
    try:
        return _decoder.decode_lines(data), []
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        pass
    events: list[Event] = []
    refused: list[tuple[int, DecodeError]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            events.append(decode(line))
        except DecodeError as exc:
            refused.append((number, exc))
    return events, refused


def to_builtins(event: Event) -> dict[str, Any]:
    """Return the wire form of *event* as a plain dict (for templating, tests)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result
