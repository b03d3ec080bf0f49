"""SseAnswerParser: subclasses get either SseEvents (handle) or the raw bytes (handle_data), same events."""

from __future__ import annotations

import pytest

from streambus.errors import WireError
from streambus.formats import SseAnswerParser
from streambus.wire import SseEvent

BODY = b"event: a\ndata: 1\n\n: ping\nid: 7\ndata: 2\n\nevent: b\ndata: \xff\n\nevent: c\ndata: 3"


class Events(SseAnswerParser[SseEvent]):
    def handle(self, sse: SseEvent, out: list[SseEvent]) -> None:
        out.append(sse)


class Raw(SseAnswerParser[tuple[bytes, bytes, int]]):
    def handle(self, sse: SseEvent, out: list[tuple[bytes, bytes, int]]) -> None:
        raise AssertionError("a subclass with handle_data is fed through SseParser.feed_raw only")

    def handle_data(self, event: bytes, data: bytes, offset: int, out: list[tuple[bytes, bytes, int]]) -> None:
        out.append((event, data, offset))


def run(parser: SseAnswerParser[object]) -> tuple[list[object], WireError]:
    got: list[object] = []
    with pytest.raises(WireError, match="invalid UTF-8") as info:
        for piece in parser.feed(BODY):
            got.append(piece)
    got += [*parser.feed(b""), *parser.close()]
    return got, info.value


def test_handle_data_subclass_gets_the_events_handle_gets_as_bytes() -> None:
    events, error = run(Events())  # type: ignore[arg-type]
    raw, raw_error = run(Raw())  # type: ignore[arg-type]
    assert [e.id for e in events] == ["", "7", "7"]  # type: ignore[attr-defined]  # a handle-only subclass sees the id
    assert raw == [(e.event.encode(), e.data.encode(), e.offset) for e in events]  # type: ignore[attr-defined]
    assert raw == [(b"a", b"1", 9), (b"message", b"2", 31), (b"c", b"3", 67)]
    assert error.offset == raw_error.offset == 55  # the bad byte; the event after it is kept
