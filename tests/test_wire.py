"""The sans-I/O parsers of streambus.wire: exact behaviour on hand-made inputs."""

from __future__ import annotations

import pytest

import streambus.wire as wire
from streambus.errors import StreamBusError, WireError
from streambus.wire import (
    NdjsonParser,
    SseEvent,
    SseParser,
    ToolCallFragment,
    Utf8Decoder,
    format_sse,
    merge_tool_calls,
    parse_tool_text,
    tool_text,
)

JAPANESE = "日本語のテキスト🎌é"


def test_exports_are_sorted_and_complete() -> None:
    assert wire.__all__ == sorted(wire.__all__)
    for name in wire.__all__:
        assert getattr(wire, name).__doc__
    assert issubclass(WireError, StreamBusError)


# -- UTF-8 ---------------------------------------------------------------------


@pytest.mark.parametrize("cut", range(len(JAPANESE.encode())))
def test_utf8_every_split_point(cut: int) -> None:
    data = JAPANESE.encode()
    decoder = Utf8Decoder()
    first = decoder.feed(data[:cut])
    assert first == data[:cut].decode("utf-8", "ignore")  # never half a character
    assert first + decoder.feed(data[cut:]) + decoder.close() == JAPANESE
    assert decoder.offset == len(data)


def test_utf8_one_byte_per_read() -> None:
    decoder = Utf8Decoder()
    pieces = [decoder.feed(bytes([b])) for b in JAPANESE.encode()]
    assert "".join(pieces) + decoder.close() == JAPANESE
    assert all(len(p) <= 1 for p in pieces)


def test_utf8_pending_counts_held_bytes() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed("日".encode()[:2]) == ""
    assert decoder.pending == 2


def test_utf8_invalid_byte_names_offset_and_keeps_text() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed(b"ok ") == "ok "
    with pytest.raises(WireError) as info:
        decoder.feed("日本".encode() + b"\xff" + b"rest")
    assert info.value.offset == 3 + 6
    assert info.value.partial == "日本"
    assert "0xff" in str(info.value) and "at byte 9" in str(info.value)
    # The decoder skipped the bad byte and still has what followed it.
    assert decoder.feed(b"!") == "rest!"
    assert decoder.close() == ""


def test_utf8_invalid_continuation_split_across_reads() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed(b"ab\xe6") == "ab"
    with pytest.raises(WireError) as info:
        decoder.feed(b"A")  # a lead byte followed by ASCII
    assert info.value.offset == 2
    assert decoder.close() == "A"


def test_utf8_truncated_at_close() -> None:
    decoder = Utf8Decoder()
    decoder.feed(b"x" + "語".encode()[:2])
    with pytest.raises(WireError, match="truncated") as info:
        decoder.close()
    assert info.value.offset == 1


def test_utf8_replace_mode_never_raises() -> None:
    decoder = Utf8Decoder(errors="replace")
    assert decoder.feed(b"a\xffb") + decoder.feed("日".encode()[:1]) + decoder.close() == "a\ufffdb\ufffd"


def test_utf8_rejects_unknown_error_mode() -> None:
    with pytest.raises(ValueError, match="errors"):
        Utf8Decoder(errors="ignore")  # type: ignore[arg-type]


# -- NDJSON --------------------------------------------------------------------


def test_ndjson_split_objects_several_per_read_blank_lines_and_crlf() -> None:
    parser = NdjsonParser()
    assert list(parser.feed(b'{"a": 1}\r\n\n  \r\n{"b"')) == [{"a": 1}]
    assert parser.buffered == 4
    assert list(parser.feed(': "日本"}\n[1]\n2\n'.encode())) == [{"b": "日本"}, [1], 2]
    assert list(parser.close()) == []


def test_ndjson_multibyte_split_inside_a_line() -> None:
    line = '{"t": "日本"}\n'.encode()
    for cut in range(1, len(line)):
        parser = NdjsonParser()
        out = [*parser.feed(line[:cut]), *parser.feed(line[cut:]), *parser.close()]
        assert out == [{"t": "日本"}]


def test_ndjson_last_line_without_newline() -> None:
    parser = NdjsonParser()
    assert list(parser.feed(b'{"a":1}\n{"done":true}')) == [{"a": 1}]
    assert list(parser.close()) == [{"done": True}]


def test_ndjson_truncated_last_line() -> None:
    parser = NdjsonParser()
    assert list(parser.feed(b'{"a":1}\n{"b":')) == [{"a": 1}]
    with pytest.raises(WireError, match="truncated") as info:
        list(parser.close())
    assert info.value.offset == 8


def test_ndjson_malformed_line_keeps_values_before_and_after() -> None:
    parser = NdjsonParser()
    got = []
    items = parser.feed(b'{"a":1}\nnot json\n{"c":3}\n')
    with pytest.raises(WireError, match="malformed JSON line") as info:
        for value in items:
            got.append(value)
    assert got == [{"a": 1}]
    assert info.value.offset == 8
    assert list(parser.feed(b"")) == [{"c": 3}]  # the parser stays usable


def test_ndjson_lines_after_a_bad_one_wait_for_the_next_feed() -> None:
    parser = NdjsonParser()
    with pytest.raises(WireError):
        list(parser.feed(b"1\n{\n22\n"))
    assert list(parser.feed(b"333\n")) == [22, 333]


def test_ndjson_line_limit() -> None:
    parser = NdjsonParser(max_line=8)
    assert list(parser.feed(b"[1,2]\n")) == [[1, 2]]
    with pytest.raises(WireError, match="longer than 8 bytes") as info:
        parser.feed(b"[1,2,3,4,5")
    assert info.value.offset == 6
    with pytest.raises(WireError, match="longer than 8 bytes") as info:
        list(NdjsonParser(max_line=8).feed(b'1\n"0123456789"\n2\n'))
    assert info.value.offset == 2
    with pytest.raises(ValueError, match="max_line"):
        NdjsonParser(max_line=0)


def test_ndjson_custom_loads() -> None:
    parser = NdjsonParser(loads=lambda raw: raw.decode().upper())
    assert list(parser.feed(b"abc\n")) == ["ABC"]


# -- SSE -----------------------------------------------------------------------


def parse(data: bytes, **kwargs: object) -> list[SseEvent]:
    parser = SseParser(**kwargs)  # type: ignore[arg-type]
    return [*parser.feed(data), *parser.close()]


def test_sse_data_with_and_without_space_and_multiline() -> None:
    events = parse(b"data: a\ndata:b\ndata:  c\n\n")
    assert [e.data for e in events] == ["a\nb\n c"]
    assert events[0].event == "message"


def test_sse_comments_event_id_retry() -> None:
    stream = b": keep-alive\n\nevent: delta\nid: 7\nretry: 1500\ndata: x\n\n:\ndata: y\n\n"
    parser = SseParser()
    events = list(parser.feed(stream))
    assert events == [
        SseEvent(data="x", event="delta", id="7", retry=1500, offset=45),
        SseEvent(data="y", event="message", id="7", retry=None, offset=56),
    ]
    assert parser.last_event_id == "7" and parser.retry == 1500


def test_sse_ignored_fields() -> None:
    events = parse(b"id: a\0b\nretry: 12x\nfoo: bar\ndata\n\n")
    assert events == [SseEvent(data="", id="", retry=None, offset=28)]


def test_sse_event_without_data_is_not_dispatched() -> None:
    parser = SseParser()
    assert list(parser.feed(b"event: ping\nid: 3\n\n")) == []
    assert parser.last_event_id == "3"
    assert list(parser.feed(b"data: z\n\n")) == [SseEvent(data="z", id="3", offset=19)]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_sse_line_ends(eol: bytes) -> None:
    stream = b"data: one" + eol + b"data: two" + eol + eol + b"data: three" + eol + eol
    assert [e.data for e in parse(stream)] == ["one\ntwo", "three"]


def test_sse_crlf_split_across_reads_is_one_line_end() -> None:
    parser = SseParser()
    assert list(parser.feed(b"data: a\r")) == []
    assert list(parser.feed(b"\n")) == []  # the LF completes the CRLF, it is not a blank line
    assert [e.data for e in parser.feed(b"\r\n")] == ["a"]


@pytest.mark.parametrize("held", [b"", b": held\r"])
def test_sse_crlf_split_after_a_bad_line_keeps_the_offsets(held: bytes) -> None:
    # The read ends in the CR of a CRLF, after an invalid line (and perhaps lines held behind it):
    # the LF that starts the next read still counts in the offsets of the events after it.
    first = b"data: bad \xff\r" + (b"\n" + held if held else b"")
    parser = SseParser()
    with pytest.raises(WireError) as info:
        list(parser.feed(first))
    assert info.value.offset == 10
    (event,) = parser.feed(b"\n\r\ndata: after\r\n\r\n")
    assert (event.data, event.offset) == ("after", len(first) + 3)


def test_sse_lone_cr_then_text_in_next_read() -> None:
    parser = SseParser()
    assert list(parser.feed(b"data: a\r")) == []
    assert [e.data for e in parser.feed(b"\rdata: b\r\r")] == ["a", "b"]


def test_sse_final_event_without_blank_line() -> None:
    parser = SseParser()
    assert list(parser.feed(b"data: a\n\ndata: last")) == [SseEvent(data="a")]
    assert [e.data for e in parser.close()] == ["last"]
    strict = SseParser(dispatch_at_close=False)
    list(strict.feed(b"data: last\n"))
    assert list(strict.close()) == []


def test_sse_byte_order_mark_split_across_reads() -> None:
    parser = SseParser()
    bom = b"\xef\xbb\xbf"
    assert list(parser.feed(bom[:2])) == []
    assert [(e.data, e.offset) for e in parser.feed(bom[2:] + b"data: x\n\n")] == [("x", 3)]


def test_sse_invalid_utf8_is_an_error_with_offset_and_parser_continues() -> None:
    parser = SseParser()
    got = []
    with pytest.raises(WireError, match="invalid UTF-8") as info:
        for event in parser.feed(b"data: ok\n\ndata: \xff\n\ndata: after\n\n"):
            got.append(event.data)
    assert got == ["ok"]
    assert info.value.offset == 16
    assert [e.data for e in parser.feed(b"")] == ["after"]
    assert [e.data for e in parse(b"data: \xff\n\n", errors="replace")] == ["\ufffd"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_sse_common_shapes_match_the_line_by_line_parse_at_every_cut(eol: bytes) -> None:
    # The events LLM APIs send (one data line, after an optional event line) take SseParser's
    # fast way; odd events between them (comment, id, two data lines, no space) take the line loop.
    lines = [
        b"event: start", b"data: {\"a\":1}", b"",
        b"data: \xe6\x97\xa5\xe6\x9c\xac", b"",
        b": keep-alive", b"event: delta", b"data:no space", b"",
        b"id: 7", b"data: one", b"data: two", b"",
        b"event: delta", b"data: after the id", b"",
        b"event: ", b"data: empty name", b"",
        b"data: last",
    ]  # fmt: skip
    body = eol.join(lines)
    expected = [
        SseEvent(data='{"a":1}', event="start", offset=len(b"event: start" + eol)),
        SseEvent(data="日本", offset=len(eol.join(lines[:3]) + eol)),
        SseEvent(data="no space", event="delta", offset=len(eol.join(lines[:7]) + eol)),
        SseEvent(data="one\ntwo", id="7", offset=len(eol.join(lines[:10]) + eol)),
        SseEvent(data="after the id", event="delta", id="7", offset=len(eol.join(lines[:14]) + eol)),
        SseEvent(data="empty name", id="7", offset=len(eol.join(lines[:17]) + eol)),
        SseEvent(data="last", id="7", offset=len(eol.join(lines[:19]) + eol)),
    ]
    assert parse(body) == expected
    for cut in range(len(body) + 1):
        parser = SseParser()
        got = [*parser.feed(body[:cut]), *parser.feed(body[cut:]), *parser.close()]
        assert got == expected, cut
    one_byte = SseParser()
    assert [e for i in range(len(body)) for e in one_byte.feed(body[i : i + 1])] + list(one_byte.close()) == expected
    # feed_raw gives the same events, as (type, data, offset) with bytes, at every cut too.
    raw_expected = [(e.event.encode(), e.data.encode(), e.offset) for e in expected]
    for cut in range(len(body) + 1):
        parser = SseParser()
        got_raw = [*parser.feed_raw(body[:cut]), *parser.feed_raw(body[cut:])]
        got_raw += [(e.event.encode(), e.data.encode(), e.offset) for e in parser.close()]
        assert got_raw == raw_expected, cut
    # One event per read, as servers write them: after the first, each read takes the fast way at once.
    reads = [part + eol + eol for part in body.split(eol + eol)]
    reads[-1] = reads[-1][: -2 * len(eol)]
    for raw in (False, True):
        parser = SseParser()
        got_reads = [e for r in reads for e in (parser.feed_raw(r) if raw else parser.feed(r))]
        last = [(e.event.encode(), e.data.encode(), e.offset) if raw else e for e in parser.close()]
        assert got_reads + last == (raw_expected if raw else expected)


def test_sse_feed_raw_names_invalid_utf8_at_its_offset_and_keeps_later_events() -> None:
    parser = SseParser()
    assert list(parser.feed_raw(b"event: x\ndata: ok\n\n")) == [(b"x", b"ok", 9)]
    got = []
    with pytest.raises(WireError, match="invalid UTF-8") as info:
        for event in parser.feed_raw(b"event: y\ndata: b\xffd\n\nevent: z\ndata: after\n\n"):
            got.append(event)
    assert got == []
    assert info.value.offset == 19 + 9 + 7  # the bad byte, in the second read's data line
    assert list(parser.feed_raw(b"")) == [(b"z", b"after", 19 + 20 + 9)]
    assert list(parser.feed_raw(b"data: {}\n\n")) == [(b"message", b"{}", 19 + 42)]


def test_sse_held_back_event_keeps_the_line_limit_and_errors_keep_later_events() -> None:
    parser = SseParser(max_line=16)
    assert [e.data for e in parser.feed(b"data: a\n\ndata: b")] == ["a"]
    assert parser.buffered == len(b"data: b")  # held for the next read
    with pytest.raises(WireError, match="longer than 16 bytes") as info:
        list(parser.feed(b"0123456789abcdef\n\n"))
    assert info.value.offset == 9
    parser = SseParser()
    got = []
    with pytest.raises(WireError, match="invalid UTF-8") as info:
        for event in parser.feed(b"event: x\ndata: ok\n\nevent: \xff\ndata: bad\n\nevent: y\ndata: after\n\n"):
            got.append(event.data)
    assert got == ["ok"]
    assert info.value.offset == 26
    # The bad line is dropped, as in the line loop; what follows it is kept.
    assert [(e.event, e.data) for e in parser.feed(b"")] == [("message", "bad"), ("y", "after")]


def test_sse_a_peer_cannot_grow_the_held_bytes_past_the_line_limit() -> None:
    # Short complete lines that never end their event: the fast way would hold them all; past
    # max_line it leaves them to the line loop, which keeps only the event's state.
    parser = SseParser(max_line=64)
    assert [e.data for e in parser.feed(b"data: a\n\n")] == ["a"]
    for _ in range(100):
        assert list(parser.feed(b"data: x\n")) == []
        assert parser.buffered <= 64
    assert [e.data for e in parser.feed(b"\n")] == ["\n".join(["x"] * 100)]


def test_sse_line_limit_and_bad_options() -> None:
    parser = SseParser(max_line=10)
    with pytest.raises(WireError, match="longer than 10"):
        parser.feed(b"data: 0123456789")
    with pytest.raises(ValueError, match="errors"):
        SseParser(errors="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_line"):
        SseParser(max_line=0)


def test_format_sse_round_trips() -> None:
    raw = format_sse("line 1\nline 2\r\nline 3", event="delta", id="9", retry=100)
    assert raw == b"event: delta\nid: 9\nretry: 100\ndata: line 1\ndata: line 2\ndata: line 3\n\n"
    assert parse(raw) == [SseEvent(data="line 1\nline 2\nline 3", event="delta", id="9", retry=100, offset=30)]
    with pytest.raises(ValueError, match="id"):
        format_sse("x", id="a\nb")


# -- tool-call text ------------------------------------------------------------


def test_tool_text_round_trip_and_merge() -> None:
    text = tool_text(ToolCallFragment(index=0, id="c1", name="f", arguments='{"a"'))
    text += tool_text(ToolCallFragment(index=1, name="g", arguments="{}"))
    text += tool_text(ToolCallFragment(index=0, arguments=": 1}"))
    fragments = parse_tool_text(text)
    assert len(fragments) == 3
    calls = merge_tool_calls(fragments)
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [(0, "c1", "f", '{"a": 1}'), (1, None, "g", "{}")]


def test_tool_text_bad_line() -> None:
    with pytest.raises(WireError) as info:
        parse_tool_text('{"index":0}\nnope\n')
    assert info.value.offset == 12


def test_skipped_types_count_per_parser_and_log_once_per_process() -> None:
    from structlog.testing import capture_logs

    from streambus.wire import SkippedTypes

    first, second = SkippedTypes("test-provider"), SkippedTypes("test-provider")
    with capture_logs() as logs:
        first.note("test.novel_a")
        first.note("test.novel_a")
        second.note("test.novel_a")
        second.note("test.novel_b")
    assert dict(first) == {"test.novel_a": 2} and dict(second) == {"test.novel_a": 1, "test.novel_b": 1}
    assert [(e["provider"], e["type"]) for e in logs if e["event"] == "wire.unknown_type"] == [
        ("test-provider", "test.novel_a"),
        ("test-provider", "test.novel_b"),
    ]
