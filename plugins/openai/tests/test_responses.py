"""The Responses API: parser, encoder, producer, and the official client's create(stream=True) and stream()."""

from __future__ import annotations

import itertools
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from streambus_openai import (
    DonePiece,
    ErrorPiece,
    FinishPiece,
    OpenAIFormat,
    OpenAIProducer,
    ResponsesStreamParser,
    TextPiece,
    UsagePiece,
)
from structlog.testing import capture_logs

from streambus import Bus, WireError
from streambus.events import DeltaEvent, EndEvent, ErrorEvent, Event, StartEvent, Usage
from streambus.mockserver import MockServer
from streambus.testing import EventCapture
from streambus.wire import ToolCallFragment, merge_tool_calls, parse_tool_text, tool_text

from .conftest import Reply, Upstream

TS = 1_767_225_600.25
TEXT = "こんにちは、世界🎌👩‍💻"
THOUGHT = "考え中🤔"
ARGS = '{"city": "京都"}'
USAGE = Usage(
    prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920, reasoning_tokens=256
)
MODEL = "gpt-5-mini"


def events(stream: str = "s1", *, end: Event | None = None, tool: bool = True, model: str = MODEL) -> list[Event]:
    deltas: list[tuple[str, str]] = [
        ("reasoning", THOUGHT[:2]),
        ("reasoning", THOUGHT[2:]),
        ("content", TEXT[:3]),
        ("content", TEXT[3:]),
    ]
    if tool:
        deltas += [
            ("tool", tool_text(ToolCallFragment(index=0, id="call_1", name="get_weather", arguments=ARGS[:9]))),
            ("tool", tool_text(ToolCallFragment(index=0, arguments=ARGS[9:]))),
        ]
    out: list[Event] = [StartEvent(stream=stream, seq=0, ts=TS, model=model, provider="openai")]
    for i, (channel, text) in enumerate(deltas, start=1):
        out.append(DeltaEvent(stream=stream, seq=i, ts=TS + i, text=text, channel=channel))  # type: ignore[arg-type]
    out.append(
        end or EndEvent(stream=stream, seq=len(out), ts=TS + 9, reason="tool_calls" if tool else "stop", usage=USAGE)
    )
    return out


def body(evs: list[Event]) -> bytes:
    return OpenAIFormat().encode_stream("/v1/responses", {"model": MODEL, "stream": True}, evs)


def parse(reads: list[bytes]) -> tuple[list[Any], ResponsesStreamParser]:
    parser = ResponsesStreamParser()
    out: list[Any] = []
    for data in reads:
        out.extend(parser.feed(data))
    out.extend(parser.close())
    return out, parser


def test_encoded_stream_parses_back_at_every_cut() -> None:
    raw = body(events())
    for size in (1, 3, len(raw)):
        pieces, parser = parse([raw[i : i + size] for i in range(0, len(raw), size)])
        assert parser.done and dict(parser.skipped) == {}
        by = {
            c: "".join(p.text for p in pieces if isinstance(p, TextPiece) and p.channel == c)
            for c in ("content", "reasoning", "tool")
        }
        assert (by["content"], by["reasoning"]) == (TEXT, THOUGHT)
        (call,) = merge_tool_calls(parse_tool_text(by["tool"]))
        assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", ARGS)
        assert pieces[-3:] == [FinishPiece("tool_calls"), UsagePiece(USAGE), DonePiece()]


def sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def test_incomplete_failed_and_error_events() -> None:
    incomplete = sse(
        {
            "type": "response.incomplete",
            "response": {
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "usage": {"input_tokens": 3, "output_tokens": 5},
            },
        }
    )
    pieces, parser = parse([incomplete])
    assert pieces == [
        FinishPiece("length"),
        UsagePiece(Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)),
        DonePiece(),
    ]
    failed = sse(
        {
            "type": "response.failed",
            "response": {"status": "failed", "error": {"code": "server_error", "message": "boom"}},
        }
    )
    assert parse([failed])[0] == [ErrorPiece(message="boom", code="server_error")]
    error = sse(
        {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None, "sequence_number": 3}
    )
    pieces, parser = parse([sse({"type": "response.output_text.delta", "delta": "部分"}), error])
    assert pieces == [TextPiece("部分"), ErrorPiece(message="slow down", code="rate_limit_exceeded")] and parser.done


def test_unknown_types_skipped_and_malformed_named_with_position() -> None:
    with capture_logs() as logs:
        pieces, parser = parse([sse({"type": "response.future_thing_r1"}), body(events(tool=False))])
    assert dict(parser.skipped) == {"response.future_thing_r1": 1} and isinstance(pieces[-1], DonePiece)
    assert [e["type"] for e in logs if e["event"] == "wire.unknown_type"] == ["response.future_thing_r1"]
    good = sse({"type": "response.output_text.delta", "delta": "ok"})
    for bad, problem in [
        (b"data: {nope\n\n", "not JSON"),
        (sse({"type": "response.output_text.delta"}), "without a delta"),
        (
            sse({"type": "response.function_call_arguments.delta", "item_id": "fc_9", "delta": "{"}),
            "for no function_call",
        ),
    ]:
        parser = ResponsesStreamParser()
        seen: list[Any] = []
        with pytest.raises(WireError) as info:
            seen.extend(parser.feed(good + bad))
        assert problem in str(info.value) and info.value.offset == len(good) + bad.index(b"data:")


def split_inside_characters(raw: bytes) -> list[bytes]:
    cuts = [i + 1 for i, byte in enumerate(raw) if byte >= 0xC0]
    return [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]


async def _serve(upstream: Upstream, evs: list[Event]) -> None:
    fmt = OpenAIFormat()

    async def answer(request: web.Request, req: Any) -> web.StreamResponse:
        if not fmt.is_streaming("/v1/responses", req):
            return web.json_response(fmt.assemble("/v1/responses", req, evs))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in split_inside_characters(body(evs)):
            await response.write(piece)
        await response.write_eof()
        return response

    upstream.by_path["/v1/responses"] = answer


@pytest.mark.anyio
async def test_official_client_create_and_stream_helper(upstream: Upstream) -> None:
    await _serve(upstream, events())
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="test", max_retries=0) as client:
        stream = await client.responses.create(model=MODEL, input="hi", stream=True)
        seen = [event async for event in stream]
        assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == TEXT
        assert "".join(e.delta for e in seen if e.type == "response.reasoning_summary_text.delta") == THOUGHT
        assert "".join(e.delta for e in seen if e.type == "response.function_call_arguments.delta") == ARGS
        completed = seen[-1]
        assert completed.type == "response.completed" and completed.response.usage is not None
        u = completed.response.usage
        assert (
            u.input_tokens,
            u.input_tokens_details.cached_tokens,
            u.output_tokens,
            u.output_tokens_details.reasoning_tokens,
            u.total_tokens,
        ) == (2006, 1920, 300, 256, 2306)

        async with client.responses.stream(model=MODEL, input="hi") as helper:
            texts = [e.delta async for e in helper if e.type == "response.output_text.delta"]
            final = await helper.get_final_response()
        assert "".join(texts) == TEXT and final.output_text == TEXT
        (call,) = [item for item in final.output if item.type == "function_call"]
        assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", ARGS)
        assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 1920

        whole = await client.responses.create(model=MODEL, input="hi")
        assert (
            whole.output_text == TEXT
            and whole.usage is not None
            and whole.usage.output_tokens_details.reasoning_tokens == 256
        )


def test_official_client_against_serve_mock_with_a_chat_recording() -> None:
    # A recording made through Chat Completions (any provider) served to a Responses client.
    recorded = events("c", tool=False, model="qwen3")
    with (
        MockServer(recorded, burst=True).running() as url,
        openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client,
    ):
        with client.responses.stream(model="qwen3", input="hi") as helper:
            final = helper.get_final_response()
        assert final.output_text == TEXT and final.usage is not None
        assert (final.usage.input_tokens_details.cached_tokens, final.usage.output_tokens_details.reasoning_tokens) == (
            1920,
            256,
        )
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="gpt-9", input="hi", stream=True)


# -- the producer with endpoint = "responses" --------------------------------------------------


def producer(upstream: Upstream, **keys: Any) -> OpenAIProducer:
    base: dict[str, Any] = {
        "base_url": upstream.url + "/v1",
        "model": MODEL,
        "endpoint": "responses",
        "messages": [{"role": "user", "content": "hi"}],
        "retry_backoff": 0,
    }
    return OpenAIProducer(**{**base, **keys})


async def run(p: OpenAIProducer) -> list[Event]:
    capture = EventCapture()
    async with Bus() as bus:
        capture.attach(bus)
        bus.start_producer(p)
    return capture.events


def text(evs: list[Event], channel: str = "content") -> str:
    return "".join(e.text for e in evs if isinstance(e, DeltaEvent) and e.channel == channel)


@pytest.mark.anyio
async def test_producer_streams_the_responses_api(upstream: Upstream) -> None:
    upstream.replies = [Reply(split_inside_characters(body(events())))]
    evs = await run(producer(upstream, system="Be brief.", max_tokens=50))
    assert text(evs) == TEXT and text(evs, "reasoning") == THOUGHT
    end = evs[-1]
    assert isinstance(end, EndEvent) and (end.reason, end.usage) == ("tool_calls", USAGE)
    assert upstream.requests[0] == {
        "model": MODEL,
        "input": [{"role": "user", "content": "hi"}],
        "instructions": "Be brief.",
        "stream": True,
        "max_output_tokens": 50,
    }


@pytest.mark.anyio
async def test_producer_failures(upstream: Upstream) -> None:
    partial = sse({"type": "response.output_text.delta", "delta": "部分"})
    error = sse({"type": "error", "code": "server_error", "message": "boom"})
    upstream.replies = [Reply([partial, error])]
    evs = await run(producer(upstream))
    assert text(evs) == "部分"
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].kind == "upstream_error" and "boom" in evs[-1].message
    upstream.replies = [Reply([partial])]
    end = (await run(producer(upstream, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "truncated" and "response.completed" in end.message
    upstream.replies = [Reply([partial + b"data: {bad\n\n"])]
    end = (await run(producer(upstream)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "malformed" and f"at byte {len(partial)}" in end.message
    upstream.replies = [Reply([partial], then="hang")]
    end = (await run(producer(upstream, timeout=0.2, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and end.kind == "timeout"
    upstream.replies = [
        Reply(status=429, body=b'{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}')
    ]
    end = (await run(producer(upstream, retries=0)))[-1]
    assert isinstance(end, ErrorEvent) and (end.kind, end.retryable) == ("http_status", True)


def test_n_is_refused_with_responses() -> None:
    with pytest.raises(ValueError, match="n: the Responses API answers with one choice"):
        OpenAIProducer(model="m", endpoint="responses", prompt="hi", n=2)
