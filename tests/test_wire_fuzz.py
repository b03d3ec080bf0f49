"""Hypothesis: random splits of valid streams give the wire parsers identical output."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus.wire import NdjsonParser, SseEvent, SseParser, Utf8Decoder


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
