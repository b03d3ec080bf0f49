"""The official anthropic, openai (Responses) and google-genai clients adopt streambus by changing the base URL.

Each fake upstream below answers with bytes written by hand from the
provider's public API reference (Anthropic: "Streaming Messages"; OpenAI:
"Responses streaming events"; Gemini: "models.streamGenerateContent" with
``alt=sse``), cut inside every multi-byte character so each piece reaches
the proxy as its own write. The client must get exactly those bytes, and the
bus exactly the text, tool-call arguments and usage (cached, cache-creation
and reasoning tokens included) they carry.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import anthropic
import anyio
import openai
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from structlog.testing import capture_logs

from streambus.events import EndEvent, ErrorEvent, Usage
from streambus.recording import read_recording
from streambus.testing import Reply
from streambus.wire import merge_tool_calls, parse_tool_text

from .conftest import FAKE_KEY, Env, Upstream

pytestmark = [
    pytest.mark.anyio,
    # google-genai's async client subclasses aiohttp's ClientSession, which aiohttp warns about.
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning"),
]

TEXT = "こんにちは、世界🎌👩‍💻"
THOUGHT = "考えています🤔"
ARGS = '{"city": "京都", "unit": "c"}'


def split_inside_characters(raw: bytes) -> list[bytes]:
    """Cut *raw* after the first byte of every multi-byte character: each character spans two reads."""
    cuts = [i + 1 for i, byte in enumerate(raw) if byte >= 0xC0]
    return [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]


def sse(event: str | None, obj: Any, eol: bytes = b"\n") -> bytes:
    head = b"event: " + event.encode() + eol if event else b""
    return head + b"data: " + orjson.dumps(obj) + eol + eol


def tool_call(env: Env, stream: str) -> tuple[str | None, str, str]:
    (call,) = merge_tool_calls(parse_tool_text(env.capture.text(stream, "tool")))
    return call.id, call.name, call.arguments


def assert_no_key(env: Env, logs: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    assert logs, "the proxy logs its requests: the checks below must have looked at something"
    assert FAKE_KEY not in repr(logs)
    # The fake upstream's own access log (aiohttp.access) shows the URL it was sent, as a provider's
    # would; the proxy serves without an access log.
    assert not [r for r in caplog.records if FAKE_KEY in r.getMessage() and r.name != "aiohttp.access"]
    assert FAKE_KEY not in env.recorder_path.read_text()
    assert FAKE_KEY not in repr(env.capture.events)


async def ended(env: Env, n: int = 1) -> tuple[str, Any]:
    """The id and terminal event of the *n*-th proxied stream, once it ended."""
    await env.capture.wait_for(lambda c: len(c.ended) >= n)
    stream = env.capture.streams[n - 1]
    return stream, env.capture.terminal(stream)


# -- Anthropic Messages ------------------------------------------------------------------------

ANTHROPIC_MODEL = "claude-sonnet-4-5"
ANTHROPIC_USAGE = Usage(
    prompt_tokens=25 + 1200 + 300,
    completion_tokens=89,
    total_tokens=25 + 1200 + 300 + 89,
    cached_input_tokens=1200,
    cache_creation_input_tokens=300,
)


def anthropic_block(index: int, delta: dict[str, Any]) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


ANTHROPIC_START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": ANTHROPIC_MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 1200,
                "output_tokens": 1,
            },
        },
    },
)
ANTHROPIC_STREAM = b"".join(
    [
        ANTHROPIC_START,
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        ),
        anthropic_block(0, {"type": "thinking_delta", "thinking": "考えて"}),
        sse("ping", {"type": "ping"}),
        anthropic_block(0, {"type": "thinking_delta", "thinking": "います🤔"}),
        anthropic_block(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        anthropic_block(1, {"type": "text_delta", "text": "こんにちは、"}),
        anthropic_block(1, {"type": "text_delta", "text": "世界🎌👩‍💻"}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
            },
        ),
        anthropic_block(2, {"type": "input_json_delta", "partial_json": ""}),
        anthropic_block(2, {"type": "input_json_delta", "partial_json": '{"city": "京'}),
        anthropic_block(2, {"type": "input_json_delta", "partial_json": '都", "unit": "c"}'}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 2}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 89},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
)


TEXT_START = [
    ANTHROPIC_START,
    sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
]


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=FAKE_KEY, max_retries=0)


async def test_anthropic_client_through_the_proxy(
    scripted: Upstream, proxy_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scripted.replies = [Reply(split_inside_characters(ANTHROPIC_STREAM), content_type="text/event-stream")]
    with capture_logs() as logs:
        async with proxy_env(scripted.url) as env:
            client = anthropic_client(env.url)
            async with client.messages.stream(
                model=ANTHROPIC_MODEL, max_tokens=1024, messages=[{"role": "user", "content": "天気は？"}]
            ) as stream:
                streamed = [text async for text in stream.text_stream]
                final = await stream.get_final_message()
            # The raw bytes, as any HTTP client gets them: exactly the upstream's.
            async with aiohttp.ClientSession() as http:
                answer = await http.post(
                    env.url + "/v1/messages",
                    json={"model": ANTHROPIC_MODEL, "max_tokens": 9, "messages": [], "stream": True},
                    headers={"x-api-key": FAKE_KEY, "anthropic-version": "2023-06-01"},
                )
                assert await answer.read() == ANTHROPIC_STREAM
            await env.capture.wait_for(lambda c: len(c.ended) == 2)
            first = env.capture.streams[0]
            start, end = env.capture.start(first), env.capture.end(first)
            await client.close()
    assert "".join(streamed) == TEXT
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "京都", "unit": "c"}  # type: ignore[union-attr]
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (1200, 300)
    assert (start.provider, start.model) == ("anthropic", ANTHROPIC_MODEL)
    channel = {c: env.capture.text(first, c) for c in ("content", "reasoning", "tool")}
    assert (channel["content"], channel["reasoning"]) == (TEXT, THOUGHT)
    (call,) = merge_tool_calls(parse_tool_text(channel["tool"]))
    assert (call.id, call.name, call.arguments) == ("toolu_01", "get_weather", ARGS)
    assert (end.reason, end.usage) == ("tool_calls", ANTHROPIC_USAGE)
    # The key reaches the upstream, and only it (this client version sends it as a bearer token).
    sent = {k.lower(): v for k, v in scripted.headers[0].items()}
    assert FAKE_KEY in sent.get("x-api-key", "") + sent.get("authorization", "")
    assert_no_key(env, logs, caplog)


async def test_anthropic_failures_keep_the_providers_status_body_and_events(
    scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    refused = orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": f"bad key {FAKE_KEY}"}}
    )
    scripted.replies = [
        Reply(status=400, body=refused),
        Reply(
            [*TEXT_START, anthropic_block(0, {"type": "text_delta", "text": "部分"}), sse("error", overloaded)],
            content_type="text/event-stream",
        ),
        Reply(
            [*TEXT_START, anthropic_block(0, {"type": "text_delta", "text": "部"})],
            content_type="text/event-stream",
            then="drop",
        ),
    ]
    kwargs: dict[str, Any] = {"model": ANTHROPIC_MODEL, "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}
    async with proxy_env(scripted.url) as env:
        client = anthropic_client(env.url)
        with pytest.raises(anthropic.BadRequestError) as refusal:
            await client.messages.create(**kwargs, stream=True)
        assert refusal.value.status_code == 400 and refusal.value.body == orjson.loads(refused)
        stream, terminal = await ended(env, 1)
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "http_status" and not terminal.retryable
        assert FAKE_KEY not in terminal.message and "invalid_request_error" in terminal.message

        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with client.messages.stream(**kwargs) as answer:
                async for _ in answer:
                    pass
        stream, terminal = await ended(env, 2)
        assert env.capture.text(stream) == "部分"
        assert isinstance(terminal, ErrorEvent) and (terminal.kind, terminal.retryable) == ("upstream_error", True)
        assert "overloaded_error" in terminal.message

        with pytest.raises(anthropic.APIError):
            async with client.messages.stream(**kwargs) as answer:
                async for _ in answer:
                    pass
        stream, terminal = await ended(env, 3)
        assert isinstance(terminal, ErrorEvent) and (terminal.kind, terminal.retryable) == ("truncated", True)
        await client.close()


async def test_anthropic_whole_answer_is_published(scripted: Upstream, proxy_env: Callable[..., Any]) -> None:
    message = {
        "id": "msg_02",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [
            {"type": "text", "text": TEXT},
            {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "京都", "unit": "c"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 1200, "output_tokens": 89},
    }
    scripted.replies = [Reply(body=orjson.dumps(message))]
    async with proxy_env(scripted.url) as env:
        client = anthropic_client(env.url)
        answer = await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=9, messages=[])
        stream, terminal = await ended(env, 1)
        await client.close()
    assert answer.content[0].text == TEXT  # type: ignore[union-attr]
    call_id, name, arguments = tool_call(env, stream)
    assert env.capture.text(stream) == TEXT and (call_id, name) == ("toolu_02", "get_weather")
    assert orjson.loads(arguments) == orjson.loads(ARGS)
    assert isinstance(terminal, EndEvent) and terminal.reason == "tool_calls"
    assert terminal.usage == Usage(
        prompt_tokens=1225, completion_tokens=89, total_tokens=1314, cached_input_tokens=1200
    )


# -- OpenAI Responses --------------------------------------------------------------------------

RESPONSES_MODEL = "gpt-5-mini"


def responses_stream() -> bytes:
    """A reasoning summary, a message and a function call, as the Responses streaming reference shows them."""
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> bytes:
        return sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

    response: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1741290958,
        "status": "in_progress",
        "model": RESPONSES_MODEL,
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
    }
    summary = {"type": "summary_text", "text": THOUGHT}
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [summary]}
    part = {"type": "output_text", "text": TEXT, "annotations": []}
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [part]}
    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": ARGS,
        "status": "completed",
    }
    usage = {
        "input_tokens": 2006,
        "input_tokens_details": {"cached_tokens": 1920},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 256},
        "total_tokens": 2306,
    }
    at0 = {"item_id": "rs_1", "output_index": 0}
    at1 = {"item_id": "msg_1", "output_index": 1}
    at2 = {"item_id": "fc_1", "output_index": 2}
    return b"".join(
        [
            ev("response.created", response=response),
            ev("response.in_progress", response=response),
            ev("response.output_item.added", output_index=0, item={**reasoning, "summary": []}),
            ev("response.reasoning_summary_part.added", **at0, summary_index=0, part={**summary, "text": ""}),
            ev("response.reasoning_summary_text.delta", **at0, summary_index=0, delta="考えて"),
            ev("response.reasoning_summary_text.delta", **at0, summary_index=0, delta="います🤔"),
            ev("response.reasoning_summary_text.done", **at0, summary_index=0, text=THOUGHT),
            ev("response.reasoning_summary_part.done", **at0, summary_index=0, part=summary),
            ev("response.output_item.done", output_index=0, item=reasoning),
            ev("response.output_item.added", output_index=1, item={**message, "status": "in_progress", "content": []}),
            ev("response.content_part.added", **at1, content_index=0, part={**part, "text": ""}),
            ev("response.output_text.delta", **at1, content_index=0, delta="こんにちは、", logprobs=[]),
            ev("response.output_text.delta", **at1, content_index=0, delta="世界🎌👩‍💻", logprobs=[]),
            ev("response.output_text.done", **at1, content_index=0, text=TEXT, logprobs=[]),
            ev("response.content_part.done", **at1, content_index=0, part=part),
            ev("response.output_item.done", output_index=1, item=message),
            ev("response.output_item.added", output_index=2, item={**call, "arguments": "", "status": "in_progress"}),
            ev("response.function_call_arguments.delta", **at2, delta='{"city": "京'),
            ev("response.function_call_arguments.delta", **at2, delta='都", "unit": "c"}'),
            ev("response.function_call_arguments.done", **at2, arguments=ARGS),
            ev("response.output_item.done", output_index=2, item=call),
            ev(
                "response.completed",
                response={**response, "status": "completed", "output": [reasoning, message, call], "usage": usage},
            ),
        ]
    )


RESPONSES_STREAM = responses_stream()
RESPONSES_USAGE = Usage(
    prompt_tokens=2006, completion_tokens=300, total_tokens=2306, cached_input_tokens=1920, reasoning_tokens=256
)


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=FAKE_KEY, max_retries=0)


@pytest.mark.parametrize("helper", ["create", "stream"])
async def test_openai_responses_client_through_the_proxy(
    helper: str, scripted: Upstream, proxy_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scripted.replies = [Reply(split_inside_characters(RESPONSES_STREAM), content_type="text/event-stream")]
    with capture_logs() as logs:
        async with proxy_env(scripted.url) as env:
            client = openai_client(env.url)
            if helper == "create":
                stream = await client.responses.create(model=RESPONSES_MODEL, input="天気は？", stream=True)
                events = [event async for event in stream]
                final = events[-1].response  # type: ignore[union-attr]
            else:
                async with client.responses.stream(model=RESPONSES_MODEL, input="天気は？") as helped:
                    events = [event async for event in helped]
                    final = await helped.get_final_response()
            stream, terminal = await ended(env, 1)
            start = env.capture.start(stream)
            await client.close()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == TEXT and final.output_text == TEXT
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 1920
    # The request went upstream as the client sent it (the Responses API always reports usage).
    assert scripted.requests[0] == {"model": RESPONSES_MODEL, "input": "天気は？", "stream": True}
    assert (start.provider, start.model) == ("openai", RESPONSES_MODEL)
    assert (env.capture.text(stream), env.capture.text(stream, "reasoning")) == (TEXT, THOUGHT)
    assert tool_call(env, stream) == ("call_1", "get_weather", ARGS)
    assert isinstance(terminal, EndEvent) and (terminal.reason, terminal.usage) == ("tool_calls", RESPONSES_USAGE)
    assert_no_key(env, logs, caplog)


async def test_openai_responses_bytes_and_failures(scripted: Upstream, proxy_env: Callable[..., Any]) -> None:
    failed = sse(
        "response.failed",
        {
            "type": "response.failed",
            "sequence_number": 3,
            "response": {"id": "resp_2", "status": "failed", "error": {"code": "server_error", "message": "GPU gone"}},
        },
    )
    delta = sse(
        "response.output_text.delta",
        {
            "type": "response.output_text.delta",
            "sequence_number": 2,
            "item_id": "m",
            "output_index": 0,
            "delta": "部分",
        },
    )
    refused = orjson.dumps(
        {
            "error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    )
    scripted.replies = [
        Reply(split_inside_characters(RESPONSES_STREAM), content_type="text/event-stream"),
        Reply(status=401, body=refused),
        Reply([delta, failed], content_type="text/event-stream"),
        Reply([delta, b"event: response.output_text.delta\ndata: {not json}\n\n"], content_type="text/event-stream"),
    ]
    request = {"model": RESPONSES_MODEL, "input": "x", "stream": True}
    async with proxy_env(scripted.url) as env, aiohttp.ClientSession() as http:
        async with http.post(env.url + "/v1/responses", json=request) as answer:
            assert await answer.read() == RESPONSES_STREAM
        assert isinstance((await ended(env))[1], EndEvent)

        client = openai_client(env.url)
        with pytest.raises(openai.AuthenticationError) as refusal:
            await client.responses.create(model=RESPONSES_MODEL, input="x", stream=True)
        assert refusal.value.status_code == 401 and refusal.value.body == orjson.loads(refused)["error"]
        stream, terminal = await ended(env, 2)
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "http_status"

        stream = await client.responses.create(model=RESPONSES_MODEL, input="x", stream=True)
        kinds = [event.type async for event in stream]
        assert kinds == ["response.output_text.delta", "response.failed"]
        stream, terminal = await ended(env, 3)
        assert env.capture.text(stream) == "部分"
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "upstream_error" and "GPU gone" in terminal.message

        async with http.post(env.url + "/v1/responses", json=request) as answer:
            body = await answer.read()
        assert body.startswith(delta + b"event: response.output_text.delta\ndata: {not json}")
        stream, terminal = await ended(env, 4)
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "malformed"
        await client.close()


# -- Gemini --------------------------------------------------------------------------------------

GEMINI_MODEL = "gemini-2.5-flash"
GEMINI_USAGE = Usage(
    prompt_tokens=2006,
    completion_tokens=44 + 256,
    total_tokens=2306,
    cached_input_tokens=1920,
    reasoning_tokens=256,
)


def gemini_chunk(parts: list[dict[str, Any]], **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    candidate.update(extra.pop("candidate", {}))
    # The API writes CRLF line ends.
    return sse(None, {"candidates": [candidate], **extra, "modelVersion": GEMINI_MODEL, "responseId": "r1"}, b"\r\n")


GEMINI_STREAM = b"".join(
    [
        gemini_chunk([{"text": "考えて", "thought": True}]),
        gemini_chunk([{"text": "います🤔", "thought": True}]),
        gemini_chunk([{"text": "こんにちは、"}]),
        gemini_chunk([{"text": "世界🎌👩‍💻"}]),
        gemini_chunk(
            [{"functionCall": {"name": "get_weather", "args": {"city": "京都", "unit": "c"}}}],
            candidate={"finishReason": "STOP"},
            usageMetadata={
                "promptTokenCount": 2006,
                "candidatesTokenCount": 44,
                "thoughtsTokenCount": 256,
                "cachedContentTokenCount": 1920,
                "totalTokenCount": 2306,
            },
        ),
    ]
)


def gemini_client(url: str) -> genai.Client:
    return genai.Client(api_key=FAKE_KEY, http_options={"base_url": url, "api_version": "v1beta"})


async def test_gemini_client_through_the_proxy(
    scripted: Upstream, proxy_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scripted.replies = [Reply(split_inside_characters(GEMINI_STREAM), content_type="text/event-stream")]
    with capture_logs() as logs:
        async with proxy_env(scripted.url) as env:
            client = gemini_client(env.url)
            chunks = [
                c
                async for c in await client.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="天気は？")
            ]
            async with aiohttp.ClientSession() as http:
                url = f"{env.url}/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse&key={FAKE_KEY}"
                async with http.post(url, json={"contents": []}) as answer:
                    assert await answer.read() == GEMINI_STREAM
            await env.capture.wait_for(lambda c: len(c.ended) == 2)
            first = env.capture.streams[0]
            start, end = env.capture.start(first), env.capture.end(first)
    parts = [
        p for c in chunks if c.candidates for p in (c.candidates[0].content.parts or []) if c.candidates[0].content
    ]
    assert "".join(p.text or "" for p in parts if not p.thought) == TEXT
    (call,) = [p.function_call for p in parts if p.function_call]
    assert call.args == {"city": "京都", "unit": "c"}
    u = chunks[-1].usage_metadata
    assert u is not None and (u.cached_content_token_count, u.thoughts_token_count) == (1920, 256)
    assert {k.lower(): v for k, v in scripted.headers[0].items()}["x-goog-api-key"] == FAKE_KEY
    assert (start.provider, start.model) == ("gemini", GEMINI_MODEL)
    channel = {c: env.capture.text(first, c) for c in ("content", "reasoning", "tool")}
    assert (channel["content"], channel["reasoning"]) == (TEXT, THOUGHT)
    (merged,) = merge_tool_calls(parse_tool_text(channel["tool"]))
    assert (merged.name, orjson.loads(merged.arguments)) == ("get_weather", {"city": "京都", "unit": "c"})
    assert (end.reason, end.usage) == ("tool_calls", GEMINI_USAGE)
    # The stats sink behind the proxy totals the cached and reasoning tokens of both answers.
    tokens = env.stats.snapshot(streams=False)["overall"]["tokens"]
    assert (tokens["cached_input"]["all"], tokens["reasoning"]["all"]) == (2 * 1920, 2 * 256)
    assert_no_key(env, logs, caplog)
    assert all(FAKE_KEY not in str(e) for e in read_recording(env.recorder_path).events)


async def test_gemini_failures(scripted: Upstream, proxy_env: Callable[..., Any]) -> None:
    refused = orjson.dumps(
        {
            "error": {
                "code": 400,
                "message": f"API key not valid: {FAKE_KEY}",
                "status": "INVALID_ARGUMENT",
            }
        }
    )
    error_chunk = sse(
        None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}, b"\r\n"
    )
    scripted.replies = [
        Reply(status=400, body=refused),
        Reply([gemini_chunk([{"text": "部分"}]), error_chunk], content_type="text/event-stream"),
        Reply([gemini_chunk([{"text": "部分"}])], content_type="text/event-stream", then="hang"),
        Reply(
            [
                gemini_chunk(
                    [{"text": "部分"}], candidate={"finishReason": "SAFETY"}, usageMetadata={"promptTokenCount": 7}
                )
            ],
            content_type="text/event-stream",
        ),
    ]
    async with proxy_env(scripted.url, read_timeout=0.3) as env:
        client = gemini_client(env.url)
        with pytest.raises(genai_errors.ClientError) as refusal:
            async for _ in await client.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="x"):
                pass
        assert refusal.value.code == 400 and refusal.value.status == "INVALID_ARGUMENT"
        _, terminal = await ended(env, 1)
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "http_status"
        assert "INVALID_ARGUMENT" in terminal.message
        # The key the client sent in x-goog-api-key, echoed back: redacted on the bus.
        assert FAKE_KEY not in terminal.message and "[redacted]" in terminal.message

        seen: list[str] = []
        with pytest.raises(genai_errors.ServerError, match="overloaded"):
            async for chunk in await client.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="x"):
                seen.append(chunk.text or "")
        assert seen == ["部分"]
        _, terminal = await ended(env, 2)
        assert isinstance(terminal, ErrorEvent) and (terminal.kind, terminal.retryable) == ("upstream_error", True)

        async with aiohttp.ClientSession() as http:
            url = f"{env.url}/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse"
            with anyio.fail_after(10):
                async with http.post(url, json={"contents": []}) as answer:
                    body = await answer.read()
        assert body.startswith(gemini_chunk([{"text": "部分"}]))
        assert b'"error"' in body  # ended in band, as Gemini ends a failed stream
        _, terminal = await ended(env, 3)
        assert isinstance(terminal, ErrorEvent) and terminal.kind == "timeout"

        chunks = [c async for c in await client.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="x")]
        assert len(chunks) == 1
        _, terminal = await ended(env, 4)
        assert isinstance(terminal, EndEvent) and terminal.reason == "content_filter"
        assert terminal.usage == Usage(prompt_tokens=7, total_tokens=7)


# -- every way an answer can fail, for each of the three formats --------------------------------

FIRST_EVENT = {
    "anthropic": ("/v1/messages", [*TEXT_START, anthropic_block(0, {"type": "text_delta", "text": "部分"})]),
    "openai": (
        "/v1/responses",
        [
            sse(
                "response.output_text.delta",
                {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "m", "output_index": 0}
                | {"delta": "部分"},
            )
        ],
    ),
    "gemini": (f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse", [gemini_chunk([{"text": "部分"}])]),
}
BAD_EVENT = {
    "anthropic": b"event: content_block_delta\ndata: {not json\n\n",
    "openai": b"event: response.output_text.delta\ndata: {not json\n\n",
    "gemini": b"data: {not json\r\n\r\n",
}


@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini"])
@pytest.mark.parametrize("failure", ["truncated", "timeout", "malformed"])
async def test_a_failed_answer_reaches_the_client_and_ends_the_bus_stream(
    provider: str, failure: str, scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    from streambus.formats import ErrorPiece, load_format

    path, first = FIRST_EVENT[provider]
    chunks = [*first, BAD_EVENT[provider]] if failure == "malformed" else list(first)
    then = {"truncated": "drop", "timeout": "hang", "malformed": "end"}[failure]
    scripted.replies = [Reply(chunks, content_type="text/event-stream", then=then)]
    request = {"model": RESPONSES_MODEL, "stream": True, "max_tokens": 9, "messages": [], "input": "x"}
    async with proxy_env(scripted.url, read_timeout=0.3) as env, aiohttp.ClientSession() as http:
        with anyio.fail_after(10):
            async with http.post(env.url + path, json=request) as answer:
                body = await answer.read()
        stream, terminal = await ended(env)
    sent = b"".join(chunks)
    assert body.startswith(sent)  # the upstream's bytes first, exactly
    assert env.capture.text(stream) == "部分"
    assert isinstance(terminal, ErrorEvent) and terminal.kind == failure
    if failure == "malformed":
        at = len(b"".join(first)) + BAD_EVENT[provider].index(b"data:")  # the bad data line's offset
        assert body == sent and f"at byte {at})" in terminal.message
    else:
        # Then the stream is ended the way the provider ends a failed one, which its client raises on.
        parser = load_format(provider).stream_parser(path.split("?")[0], request)  # type: ignore[attr-defined]
        pieces = [*parser.feed(body[len(sent) :]), *parser.close()]
        assert isinstance(pieces[-1], ErrorPiece) and parser.done


async def test_moderated_clients_of_the_new_formats_get_the_approved_text_in_their_format(
    scripted: Upstream, proxy_env: Callable[..., Any]
) -> None:
    from streambus_moderation import KeywordModerator, ModerationStage

    stage = ModerationStage(moderator=KeywordModerator(words={"x": ["zzz"]}), window_chars=8, overlap_chars=2)
    scripted.replies = [
        Reply(split_inside_characters(ANTHROPIC_STREAM), content_type="text/event-stream"),
        Reply(split_inside_characters(GEMINI_STREAM), content_type="text/event-stream"),
        Reply(split_inside_characters(RESPONSES_STREAM), content_type="text/event-stream"),
    ]
    async with proxy_env(scripted.url, stage=stage) as env:
        claude = anthropic_client(env.url)
        async with claude.messages.stream(model=ANTHROPIC_MODEL, max_tokens=9, messages=[]) as answer:
            anthropic_text = "".join([text async for text in answer.text_stream])
            anthropic_usage = (await answer.get_final_message()).usage
        await claude.close()
        gemini = gemini_client(env.url)
        chunks = [c async for c in await gemini.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="x")]
        gpt = openai_client(env.url)
        async with gpt.responses.stream(model=RESPONSES_MODEL, input="x") as helped:
            final = await helped.get_final_response()
        await gpt.close()
        await env.capture.wait_for(lambda c: len(c.ended) == 3)
    # Re-encoded by each format's encoder from the processed bus stream: the same text and usage.
    assert anthropic_text == TEXT and anthropic_usage.cache_read_input_tokens == 1200
    gemini_text = "".join(
        p.text or "" for c in chunks if c.candidates and c.candidates[0].content
        for p in c.candidates[0].content.parts or [] if not p.thought
    )  # fmt: skip
    assert gemini_text == TEXT and chunks[-1].usage_metadata is not None
    assert chunks[-1].usage_metadata.thoughts_token_count == 256
    assert (
        final.output_text == TEXT
        and final.usage is not None
        and final.usage.output_tokens_details.reasoning_tokens == 256
    )


async def test_a_key_in_geminis_query_parameter_is_kept_off_the_bus(
    scripted: Upstream, proxy_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echoed = sse(
        None, {"error": {"code": 400, "message": f"bad key {FAKE_KEY}", "status": "INVALID_ARGUMENT"}}, b"\r\n"
    )
    scripted.replies = [
        Reply([gemini_chunk([{"text": f"you sent {FAKE_KEY}"}]), echoed], content_type="text/event-stream")
    ]
    with capture_logs() as logs:
        async with proxy_env(scripted.url) as env, aiohttp.ClientSession() as http:
            url = f"{env.url}/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse&key={FAKE_KEY}"
            async with http.post(url, json={"contents": []}) as answer:
                body = await answer.read()
            stream, terminal = await ended(env)
    assert FAKE_KEY.encode() in body  # the client's own key, echoed by its upstream: not the proxy's to change
    assert env.capture.text(stream) == "you sent [redacted]"
    assert isinstance(terminal, ErrorEvent) and "[redacted]" in terminal.message
    assert_no_key(env, logs, caplog)
