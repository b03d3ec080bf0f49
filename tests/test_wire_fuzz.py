"""Hypothesis: random splits of valid streams give the wire parsers identical output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus import WireError
from streambus.wire import NdjsonParser, RawSseEvent, SseEvent, SseParser, Utf8Decoder


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40)
fuzz = settings(max_examples=100, deadline=None)


@fuzz
@given(text=st.text(), cuts=cuts)
def test_utf8_any_split_gives_the_same_text(text: str, cuts: list[int]) -> None:
    decoder = Utf8Decoder()
    out = "".join(decoder.feed(piece) for piece in split(text.encode(), cuts)) + decoder.close()
    assert out == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@fuzz
@given(
    values=st.lists(json_values, max_size=10),
    eols=st.lists(st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r\n  \n"]), min_size=10, max_size=10),
    final_newline=st.booleans(),
    cuts=cuts,
)
def test_ndjson_any_split_gives_the_same_values(
    values: list[Any], eols: list[bytes], final_newline: bool, cuts: list[int]
) -> None:
    body = b"".join(orjson.dumps(v) + eols[i] for i, v in enumerate(values))
    if values and not final_newline:
        body = body[: -len(eols[len(values) - 1])]
    parser = NdjsonParser()
    got: list[Any] = []
    for piece in split(body, cuts):
        got.extend(parser.feed(piece))
    got.extend(parser.close())
    assert got == values


sse_text = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=15)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[SseEvent]]:
    """A random event stream and the events a browser would dispatch from it."""
    eol = draw(st.sampled_from([b"\n", b"\r", b"\r\n"]))
    parts: list[bytes] = []
    expected: list[SseEvent] = []
    last_id = ""
    pos = 0

    def add(line: bytes) -> int:
        nonlocal pos
        start = pos
        parts.append(line + eol)
        pos += len(line) + len(eol)
        return start

    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            add(b":" + draw(sse_text).encode())
        event = draw(st.none() | st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6))
        if event is not None:
            add(b"event: " + event.encode())
        if draw(st.booleans()):
            last_id = draw(sse_text)
            add(b"id: " + last_id.encode())
        lines = draw(st.lists(sse_text, min_size=1, max_size=3))
        offset = -1
        for line in lines:
            space = draw(st.booleans()) or line.startswith(" ")
            start = add(b"data:" + (b" " if space else b"") + line.encode())
            offset = start if offset < 0 else offset
        add(b"")
        expected.append(SseEvent(data="\n".join(lines), event=event or "message", id=last_id, offset=offset))
    return b"".join(parts), expected


@fuzz
@given(stream=sse_streams(), cuts=cuts)
def test_sse_any_split_gives_the_same_events(stream: tuple[bytes, list[SseEvent]], cuts: list[int]) -> None:
    body, expected = stream
    parser = SseParser()
    got: list[SseEvent] = []
    for piece in split(body, cuts):
        got.extend(parser.feed(piece))
    got.extend(parser.close())
    assert got == expected


@fuzz
@given(stream=sse_streams())
def test_sse_one_byte_per_read(stream: tuple[bytes, list[SseEvent]]) -> None:
    body, expected = stream
    parser = SseParser()
    got = [event for i in range(len(body)) for event in parser.feed(body[i : i + 1])]
    assert got + list(parser.close()) == expected


# Events as LLM APIs send them (SseParser's fast ways take these) and, between them, near misses
# that must go to the line loop: a CR or LF inside a line, a second data line, a comment, an id,
# invalid UTF-8, no space after the colon, a line end other than the stream's.
sse_blocks = st.sampled_from(
    [
        [b'data: {"a":1}'],
        [b"event: delta", b'data: {"text":"\xe6\x97\xa5\xe6\x9c\xac"}'],
        [b"event: ", b"data: empty name"],
        [b"data: "],
        [b"data: a\rb"],
        [b"data: a\nb"],
        [b"data: a\r"],
        [b"event: e\r", b"data: y"],
        [b"event: e", b"data: y\n"],
        [b"event: e", b"data: one", b"data: two"],
        [b"data: one", b"data: two"],
        [b": ping"],
        [b"id: 7", b"data: z"],
        [b"data: bad \xff byte"],
        [b"event: bad \xc3", b"data: z"],
        [b"data:no space"],
        [b"event: a", b"event: b", b"data: c"],
        [b"event: lonely"],
    ]
)


def sse_outcomes(parser: SseParser, reads: list[bytes], raw: bool) -> list[object]:
    """What feeding *reads* gives: each event as ``(type, data, offset)`` bytes, each error as its offset."""
    got: list[object] = []

    def take(events: Iterator[SseEvent | RawSseEvent]) -> bool:
        try:
            for e in events:
                got.append(e if isinstance(e, tuple) else (e.event.encode(), e.data.encode(), e.offset))
        except WireError as exc:
            got.append(("error", exc.offset))
            return True
        return False

    for data in reads:
        take(parser.feed_raw(data) if raw else parser.feed(data))
    while take(parser.feed_raw(b"") if raw else parser.feed(b"")):  # the lines held after an error
        pass
    take(parser.close())
    return got


@fuzz
@given(
    blocks=st.lists(sse_blocks, max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    first_whole=st.booleans(),
    cuts=cuts,
)
def test_sse_whole_events_per_read_match_the_line_loop(
    blocks: list[list[bytes]], eol: bytes, first_whole: bool, cuts: list[int]
) -> None:
    # Servers flush each event on its own, so a read usually is exactly one event: feed_raw's
    # quickest way. Whatever the events, one per read (the first perhaps cut anywhere, so the
    # quick way starts at any point) gives what one byte per read gives through feed's line loop.
    events = [eol.join(lines) + eol + eol for lines in [[b"data: start"], *blocks]]
    reads = events if first_whole else [*split(events[0], cuts), *events[1:]]
    body = b"".join(events)
    expected = sse_outcomes(SseParser(), [body[i : i + 1] for i in range(len(body))], raw=False)
    assert sse_outcomes(SseParser(), reads, raw=True) == expected
    assert sse_outcomes(SseParser(), reads, raw=False) == expected
    # Several events per read, cut anywhere (TCP segments): the fast way's split and line count.
    segments = [b"".join(events[i : i + 3]) for i in range(0, len(events), 3)]
    for pieces in (segments, split(body, cuts)):
        assert sse_outcomes(SseParser(), pieces, raw=True) == expected
        assert sse_outcomes(SseParser(), pieces, raw=False) == expected
