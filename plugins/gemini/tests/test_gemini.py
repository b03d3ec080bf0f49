"""Gemini: the parser, the encoder, the producer, and the official ``google-genai`` client reading our bytes."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from streambus_gemini import GeminiFormat, GeminiProducer, GeminiStreamParser
from structlog.testing import capture_logs

from streambus import Bus, WireError
from streambus.events import DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.formats import EndPiece, ErrorPiece, ModelsRoute, Piece, TextPiece, WireFormat, load_format
from streambus.mockserver import MockServer
from streambus.testing import EventCapture
from streambus.wire import ToolCallFragment, merge_tool_calls, parse_tool_text, tool_text

from .conftest import Reply, Upstream

TS = 1_767_225_600.25
TEXT = "こんにちは、世界🎌👩‍💻"
THOUGHT = "考え中🤔"
ARGS = {"city": "京都", "days": 2}
USAGE = Usage(
    prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920, reasoning_tokens=256
)
MODEL = "gemini-2.5-flash"
STREAM = "/v1beta/models/{model}:streamGenerateContent"


def events(stream: str = "s1", *, end: Event | None = None, tool: bool = True, model: str = MODEL) -> list[Event]:
    arguments = orjson.dumps(ARGS).decode()
    deltas: list[tuple[str, str]] = [("reasoning", THOUGHT), ("content", TEXT[:3]), ("content", TEXT[3:])]
    if tool:
        deltas += [
            ("tool", tool_text(ToolCallFragment(index=0, name="get_weather", arguments=arguments[:9]))),
            ("tool", tool_text(ToolCallFragment(index=0, arguments=arguments[9:]))),
        ]
    out: list[Event] = [StartEvent(stream=stream, seq=0, ts=TS, model=model, provider="gemini")]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream=stream, seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    reason = "tool_calls" if tool else "stop"
    out.append(end or EndEvent(stream=stream, seq=len(out), ts=TS + 9, reason=reason, usage=USAGE))
    return out


def body(evs: list[Event]) -> bytes:
    return GeminiFormat().encode_stream(STREAM, {}, evs)


def parse(reads: list[bytes]) -> tuple[list[Piece], GeminiStreamParser]:
    parser = GeminiStreamParser()
    out: list[Piece] = []
    for data in reads:
        out.extend(parser.feed(data))
    out.extend(parser.close())
    return out, parser


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def test_registered_wire_format() -> None:
    fmt = load_format("gemini")
    assert isinstance(fmt, GeminiFormat) and isinstance(fmt, WireFormat) and isinstance(fmt, ModelsRoute)
    assert fmt.is_streaming(STREAM, {}) and not fmt.is_streaming("/v1beta/models/{model}:generateContent", {})


def test_round_trip_at_every_cut() -> None:
    raw = body(events())
    for size in (1, 2, 7, len(raw)):
        pieces, parser = parse([raw[i : i + size] for i in range(0, len(raw), size)])
        assert parser.done
        by = {
            c: "".join(p.text for p in pieces if isinstance(p, TextPiece) and p.channel == c)
            for c in ("content", "reasoning", "tool")
        }
        assert (by["content"], by["reasoning"]) == (TEXT, THOUGHT)
        (call,) = merge_tool_calls(parse_tool_text(by["tool"]))
        assert (call.name, orjson.loads(call.arguments)) == ("get_weather", ARGS)
        assert pieces[-1] == EndPiece(reason="tool_calls", usage=USAGE)


def test_one_chunk_per_read_with_any_read_cut_anywhere_gives_the_same_pieces() -> None:
    # One chunk per read (how the API flushes them) takes the SSE parser's quickest way; cutting
    # one read at every byte sends that chunk, and the reads after it, through the other ways.
    raw = body(events())
    chunks = [c + b"\r\n\r\n" for c in raw.split(b"\r\n\r\n")[:-1]]
    assert b"".join(chunks) == raw
    expected, _ = parse([raw[i : i + 1] for i in range(len(raw))])
    assert expected[-1] == EndPiece(reason="tool_calls", usage=USAGE)
    assert parse(chunks)[0] == expected
    for i, chunk in enumerate(chunks):
        for cut in range(1, len(chunk)):
            assert parse([*chunks[:i], chunk[:cut], chunk[cut:], *chunks[i + 1 :]])[0] == expected, (i, cut)


def test_safety_block_and_max_tokens_map_to_end_reasons() -> None:
    blocked = sse(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}}
    )
    assert parse([blocked])[0] == [EndPiece(reason="content_filter", usage=Usage(prompt_tokens=7, total_tokens=7))]
    safety = sse({"candidates": [{"content": {"parts": [{"text": "部"}], "role": "model"}, "finishReason": "SAFETY"}]})
    assert parse([safety])[0] == [TextPiece("部"), EndPiece(reason="content_filter")]
    longer = sse({"candidates": [{"finishReason": "MAX_TOKENS"}]})
    assert parse([longer])[0] == [EndPiece(reason="length")]


def test_error_chunk_unknown_parts_and_malformed() -> None:
    error = sse({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
    pieces, parser = parse([sse({"candidates": [{"content": {"parts": [{"text": "部分"}]}}]}) + error])
    assert pieces == [
        TextPiece("部分"),
        ErrorPiece(message="The model is overloaded.", code="UNAVAILABLE", retryable=True),
    ]
    assert isinstance(pieces[-1], ErrorPiece) and pieces[-1].retryable and parser.done
    with capture_logs() as logs:
        pieces, parser = parse(
            [
                sse({"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": ""}}]}}]}),
                body(events(tool=False)),
            ]
        )
    assert dict(parser.skipped) == {"part": 1} and isinstance(pieces[-1], EndPiece)
    assert len([e for e in logs if e["event"] == "wire.unknown_type"]) <= 1
    good = sse({"candidates": [{"content": {"parts": [{"text": "ok"}]}}]})
    for bad, problem in [
        (b"data: {nope\r\n\r\n", "not JSON"),
        (sse({"candidates": [{"content": {"parts": [{"text": 5}]}}]}), "candidates[0].content.parts[0].text"),
    ]:
        parser = GeminiStreamParser()
        seen: list[Piece] = []
        with pytest.raises(WireError) as info:
            seen.extend(parser.feed(good + bad))
        assert problem in str(info.value) and info.value.offset == len(good) + bad.index(b"data:")


def split_inside_characters(raw: bytes) -> list[bytes]:
    cuts = [i + 1 for i, byte in enumerate(raw) if byte >= 0xC0]
    return [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]


def client(url: str) -> genai.Client:
    return genai.Client(api_key="fake-key", http_options={"base_url": url})


@pytest.mark.anyio
# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp warns about.
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_official_client_reads_characters_split_across_reads(upstream: Upstream) -> None:
    fmt, evs = GeminiFormat(), events()

    async def answer(request: web.Request, req: Any) -> web.StreamResponse:
        if request.path.endswith(":generateContent"):
            return web.json_response(fmt.assemble("generate", req, evs))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in split_inside_characters(body(evs)):
            await response.write(piece)
        await response.write_eof()
        return response

    for version in ("v1", "v1beta"):
        upstream.by_path[f"/{version}/models/{MODEL}:streamGenerateContent"] = answer
        upstream.by_path[f"/{version}/models/{MODEL}:generateContent"] = answer
    chunks = [
        c async for c in await client(upstream.url).aio.models.generate_content_stream(model=MODEL, contents="hi")
    ]
    parts = [
        p
        for c in chunks
        if c.candidates
        for p in (c.candidates[0].content.parts if c.candidates[0].content else None) or []
    ]
    assert "".join(p.text or "" for p in parts if not p.thought) == TEXT
    assert "".join(p.text or "" for p in parts if p.thought) == THOUGHT
    (call,) = [p.function_call for p in parts if p.function_call]
    assert (call.name, call.args) == ("get_weather", ARGS)
    u = chunks[-1].usage_metadata
    assert u is not None
    assert (
        u.prompt_token_count,
        u.candidates_token_count,
        u.thoughts_token_count,
        u.cached_content_token_count,
        u.total_token_count,
    ) == (2006, 44, 256, 1920, 2306)
    whole = await client(upstream.url).aio.models.generate_content(model=MODEL, contents="hi")
    assert whole.text == TEXT and whole.usage_metadata is not None and whole.usage_metadata.thoughts_token_count == 256


def test_official_client_against_serve_mock() -> None:
    recorded = [*events("a", tool=False), *events("b", tool=False, model="qwen3")]
    failed = events(
        "c",
        model="broken",
        end=ErrorEvent(stream="c", seq=6, ts=TS, kind="upstream_error", message="GPU gone", retryable=True),
    )
    with MockServer([*recorded, *failed], burst=True).running() as url:
        c = client(url)
        chunks = list(c.models.generate_content_stream(model=MODEL, contents="hi"))
        assert (
            "".join(
                p.text or ""
                for ch in chunks
                for p in (ch.candidates[0].content.parts if ch.candidates and ch.candidates[0].content else None) or []
                if not p.thought
            )
            == TEXT
        )
        assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.cached_content_token_count == 1920
        assert chunks[-1].candidates is not None and str(chunks[-1].candidates[0].finish_reason).endswith("STOP")
        assert [m.name for m in c.models.list()] == [f"models/{MODEL}", "models/qwen3", "models/broken"]
        assert c.models.get(model="qwen3").name == "models/qwen3"
        with pytest.raises(genai_errors.ClientError) as info:
            list(c.models.generate_content_stream(model="gemini-9", contents="hi"))
        assert info.value.code == 404
        seen: list[str] = []
        with pytest.raises(genai_errors.ServerError, match="GPU gone"):
            for ch in c.models.generate_content_stream(model="broken", contents="hi"):
                seen.append(ch.text or "")
        assert "".join(seen) == TEXT


# -- the producer -------------------------------------------------------------------------------


def producer(upstream: Upstream, **keys: Any) -> GeminiProducer:
    base: dict[str, Any] = {
        "base_url": upstream.url,
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
        "api_key_env": "STREAMBUS_TEST_GEMINI_KEY",
    }
    return GeminiProducer(**{**base, **keys})


async def run(p: GeminiProducer) -> list[Event]:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(p)
    return capture.events


def text(evs: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in evs if isinstance(e, DeltaEvent) and e.channel == channel)


@pytest.mark.anyio
async def test_producer_streams_and_sends_geminis_request(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBUS_TEST_GEMINI_KEY", "AIza-secret")
    upstream.replies = [Reply(split_inside_characters(body(events())))]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"}]
    with capture_logs() as logs:
        evs = await run(
            producer(
                upstream, messages=messages, prompt="more", system="Be brief.", include_thoughts=True, max_tokens=99
            )
        )
    assert text(evs) == TEXT and text(evs, "reasoning") == THOUGHT
    end = evs[-1]
    assert isinstance(end, EndEvent) and (end.reason, end.usage) == ("tool_calls", USAGE)
    assert upstream.requests[0] == {
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"text": "yes?"}]},
            {"role": "user", "parts": [{"text": "more"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 99, "thinkingConfig": {"includeThoughts": True}},
    }
    assert upstream.headers[0]["x-goog-api-key"] == "AIza-secret" and "AIza-secret" not in repr(logs)


@pytest.mark.anyio
async def test_producer_failures(upstream: Upstream) -> None:
    partial = sse({"candidates": [{"content": {"parts": [{"text": "部分"}]}}]})
    upstream.replies = [Reply([partial, sse({"error": {"code": 500, "message": "Internal", "status": "INTERNAL"}})])]
    end = (await run(producer(upstream)))[-1]
    assert (
        isinstance(end, ErrorEvent)
        and (end.kind, end.retryable) == ("upstream_error", True)
        and "INTERNAL" in end.message
    )
    upstream.replies = [Reply([partial])]
    evs = await run(producer(upstream, retries=0))
    assert text(evs) == "部分" and isinstance(evs[-1], ErrorEvent) and evs[-1].kind == "truncated"
    upstream.replies = [Reply([partial + b"data: {bad\r\n\r\n"])]
    end = (await run(producer(upstream)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "malformed" and f"at byte {len(partial)}" in end.message
    upstream.replies = [Reply([partial], then="hang")]
    end = (await run(producer(upstream, timeout=0.2, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout"
    upstream.replies = [
        Reply(status=404, body=b'{"error":{"code":404,"message":"models/gemini-9 is not found","status":"NOT_FOUND"}}')
    ]
    end = (await run(producer(upstream, model="gemini-9")))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "model_not_found" and "NOT_FOUND" in end.message
    upstream.replies = [
        Reply(status=429, body=b'{"error":{"code":429,"message":"Quota","status":"RESOURCE_EXHAUSTED"}}')
    ]
    end = (await run(producer(upstream, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("http_status", True)
    assert upstream.requests[-1] is not None and upstream.bodies


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"model": ""}, "model: required"),
        ({"messages": None}, "messages: required"),
        ({"timeout": 0}, "timeout: must be"),
    ],
)
def test_bad_options_name_the_key(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GeminiProducer(**{"model": "m", "messages": [{"role": "user", "content": "x"}], **keys})
