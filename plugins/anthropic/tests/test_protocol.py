"""AnthropicStreamParser: the Messages SSE stream, split anywhere, and every kind of bad input."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streambus_anthropic import AnthropicStreamParser
from structlog.testing import capture_logs

from streambus import Usage, WireError
from streambus.formats import EndPiece, ErrorPiece, Piece, TextPiece
from streambus.wire import merge_tool_calls, parse_tool_text


def sse(name: str, obj: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(obj) + b"\n\n"


def block_delta(index: int, delta: dict[str, object]) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


# A stream shaped as in Anthropic's streaming reference: thinking (with its signature),
# text in Japanese and emoji, a tool call whose input arrives in pieces, cache usage.
MESSAGE: dict[str, object] = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude-sonnet-4-5",
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 1,
    },
}
STREAM = (
    sse("message_start", {"type": "message_start", "message": MESSAGE})
    + sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
    )
    + b'event: ping\ndata: {"type": "ping"}\n\n'
    + block_delta(0, {"type": "thinking_delta", "thinking": "考えて"})
    + block_delta(0, {"type": "thinking_delta", "thinking": "います"})
    + block_delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"})
    + sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    + sse(
        "content_block_start",
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    )
    + block_delta(1, {"type": "text_delta", "text": "こんにちは"})
    + block_delta(1, {"type": "text_delta", "text": "、世界🎌👩‍💻"})
    + sse("content_block_stop", {"type": "content_block_stop", "index": 1})
    + sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
        },
    )
    + block_delta(2, {"type": "input_json_delta", "partial_json": ""})
    + block_delta(2, {"type": "input_json_delta", "partial_json": '{"city": "京'})
    + block_delta(2, {"type": "input_json_delta", "partial_json": '都", "unit": "c"}'})
    + sse("content_block_stop", {"type": "content_block_stop", "index": 2})
    + sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 42},
        },
    )
    + sse("message_stop", {"type": "message_stop"})
)
USAGE = Usage(
    prompt_tokens=2112,
    completion_tokens=42,
    total_tokens=2154,
    cached_input_tokens=2000,
    cache_creation_input_tokens=100,
)


def parse(reads: list[bytes]) -> tuple[list[Piece], AnthropicStreamParser]:
    parser = AnthropicStreamParser()
    out: list[Piece] = []
    for data in reads:
        out.extend(parser.feed(data))
    out.extend(parser.close())
    return out, parser


def check(pieces: list[Piece]) -> None:
    text = {
        c: "".join(p.text for p in pieces if isinstance(p, TextPiece) and p.channel == c)
        for c in ("content", "reasoning", "tool")
    }
    assert text["content"] == "こんにちは、世界🎌👩‍💻"
    assert text["reasoning"] == "考えています"
    (call,) = merge_tool_calls(parse_tool_text(text["tool"]))
    assert (call.index, call.id, call.name, call.arguments) == (
        0,
        "toolu_01",
        "get_weather",
        '{"city": "京都", "unit": "c"}',
    )
    assert pieces[-1] == EndPiece(reason="tool_calls", usage=USAGE)


def test_reference_stream_in_one_read() -> None:
    pieces, parser = parse([STREAM])
    check(pieces)
    assert parser.done and dict(parser.skipped) == {}


def test_one_byte_per_read_splits_every_character() -> None:
    pieces, parser = parse([STREAM[i : i + 1] for i in range(len(STREAM))])
    check(pieces)
    assert parser.done


def test_one_event_per_read_with_any_read_cut_anywhere_gives_the_same_pieces() -> None:
    # One event per read (how the API flushes them) takes the SSE parser's quickest way; cutting
    # one read at every byte sends that event, and the reads after it, through the other ways.
    events = [e + b"\n\n" for e in STREAM.split(b"\n\n")[:-1]]
    expected, _ = parse([STREAM[i : i + 1] for i in range(len(STREAM))])
    check(expected)
    assert parse(events)[0] == expected
    for i, event in enumerate(events):
        for cut in range(1, len(event)):
            reads = [*events[:i], event[:cut], event[cut:], *events[i + 1 :]]
            assert parse(reads)[0] == expected, (i, cut)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    check(parse([STREAM[a:b] for a, b in itertools.pairwise(bounds)])[0])


def test_later_usage_replaces_earlier_and_reasons_map() -> None:
    body = (
        sse(
            "message_start",
            {"type": "message_start", "message": {**MESSAGE, "usage": {"input_tokens": 5, "output_tokens": 1}}},
        )
        + sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens"},
                "usage": {"input_tokens": 7, "output_tokens": 9},
            },
        )
        + sse("message_stop", {"type": "message_stop"})
    )
    pieces, _ = parse([body])
    assert pieces == [
        EndPiece(
            reason="length",
            usage=Usage(prompt_tokens=7, completion_tokens=9, total_tokens=16),
        )
    ]


def test_overloaded_error_event_is_a_retryable_error_piece() -> None:
    body = (
        sse("message_start", {"type": "message_start", "message": MESSAGE})
        + block_delta(0, {"type": "text_delta", "text": "部分"})
        + sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        + block_delta(0, {"type": "text_delta", "text": "ignored"})
    )
    pieces, parser = parse([body])
    assert pieces == [TextPiece("部分"), ErrorPiece(message="Overloaded", code="overloaded_error", retryable=True)]
    assert isinstance(pieces[-1], ErrorPiece) and pieces[-1].retryable and parser.done


def test_unknown_event_types_are_skipped_counted_and_logged_once() -> None:
    novel = sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {}}},
    )
    body = (
        sse("message_start", {"type": "message_start", "message": MESSAGE})
        + sse("future_event_x1", {"type": "future_event_x1", "what": 1})
        + block_delta(0, {"type": "text_delta", "text": "a"})
        + sse("future_event_x1", {"type": "future_event_x1"})
        + novel
        + sse("message_stop", {"type": "message_stop"})
    )
    with capture_logs() as logs:
        pieces, parser = parse([body])
        parse([body])  # a second stream counts again but does not log again
    assert [p for p in pieces if isinstance(p, TextPiece)] == [TextPiece("a")]
    assert isinstance(pieces[-1], EndPiece)
    assert dict(parser.skipped) == {"future_event_x1": 2, "content_block_delta.citations_delta": 1}
    warned = sorted(e["type"] for e in logs if e["event"] == "wire.unknown_type")
    assert warned == ["content_block_delta.citations_delta", "future_event_x1"]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (b"event: content_block_delta\ndata: {not json\n\n", "not JSON"),
        (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta"}}\n\n',
            "text_delta without text",
        ),
        (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":"0","delta":{}}\n\n',
            "index: expected `int",
        ),
        (b'data: {"index":0}\n\n', "without a type"),
    ],
)
def test_malformed_events_name_the_problem_and_position_after_the_good_ones(bad: bytes, problem: str) -> None:
    good = sse("message_start", {"type": "message_start", "message": MESSAGE}) + block_delta(
        0, {"type": "text_delta", "text": "ok"}
    )
    parser = AnthropicStreamParser()
    seen: list[Piece] = []
    with pytest.raises(WireError) as info:
        for piece in parser.feed(good + bad):
            seen.append(piece)
    assert seen == [TextPiece("ok")]
    assert problem in str(info.value)
    assert info.value.offset == len(good) + bad.index(b"data:")


def test_truncated_stream_is_not_done() -> None:
    pieces, parser = parse([STREAM[: STREAM.index(b"event: message_stop")]])
    assert not parser.done and not any(isinstance(p, EndPiece) for p in pieces)
