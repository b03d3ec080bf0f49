"""Parser benchmark: cost per provider chunk of decoding the same recorded byte streams.

Side by side in one run, on the same bytes cut the same ways:

- Ollama NDJSON: streambus's :class:`~streambus.wire.NdjsonParser` (values)
  and :class:`~streambus_ollama.OllamaStreamParser` (values -> bus pieces)
  against the official ``ollama`` client's line handling, which is httpx's
  ``Response.iter_lines()`` (its ``TextDecoder`` + ``LineDecoder``) then
  ``json.loads`` per line, exactly as ``ollama._client`` does;
- OpenAI SSE: streambus's :class:`~streambus.wire.SseParser` + ``orjson.loads``
  and :class:`~streambus_openai.OpenAIStreamParser` (-> bus pieces) against
  the official ``openai`` client's ``SSEDecoder.iter_bytes`` then
  ``sse.json()`` per event, as ``openai._streaming`` does;
- OpenAI Responses SSE: :class:`~streambus_openai.ResponsesStreamParser`
  against the same ``openai`` decoding (``responses.create(stream=True)``);
- Anthropic Messages SSE: :class:`~streambus_anthropic.AnthropicStreamParser`
  against the ``anthropic`` client's ``SSEDecoder.iter_bytes`` then
  ``sse.json()``, as ``anthropic._streaming`` does;
- Gemini SSE: :class:`~streambus_gemini.GeminiStreamParser` against
  ``google-genai``'s ``HttpResponse.segments()`` over an httpx response (its
  SSE line decoder, data joining and ``json.loads``), as
  ``generate_content_stream`` does before building its pydantic models.

The streams are made by the plugins' own encoders from a synthetic answer
(English and Japanese tokens), so both sides parse byte-identical input. Two
cuts: one provider chunk per read (how a server writes them), and 1460-byte
TCP segments (chunks split anywhere, several per read). Each figure is the
best of several interleaved repetitions, in nanoseconds of CPU time per
provider chunk. The pydantic
models the official clients build afterwards are not counted: that is not
parsing, and streambus does not build them.

Goal: at least 2x faster per chunk than each official client.
Writes ``bench/results/parsers.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from google.genai._api_client import HttpResponse as GenaiHttpResponse
from openai._streaming import SSEDecoder
from streambus_anthropic import AnthropicFormat, AnthropicStreamParser
from streambus_gemini import GeminiFormat, GeminiStreamParser
from streambus_ollama import OllamaFormat, OllamaStreamParser
from streambus_openai import OpenAIFormat, OpenAIStreamParser, ResponsesStreamParser

from streambus.events import DeltaEvent, EndEvent, Event, StartEvent, Usage
from streambus.wire import NdjsonParser, SseParser

OUT = Path(__file__).resolve().parent / "results" / "parsers.md"
TOKENS = 3000
REPEATS = 15
GOAL = 2.0


def answer() -> list[Event]:
    words = ("The", " quick", " brown", " fox", " jumps", " over", " 日本", "語の", "テキ", "スト", "。", "\n")
    events: list[Event] = [StartEvent(stream="bench", seq=0, ts=1.0, model="bench-model")]
    for i in range(TOKENS):
        events.append(DeltaEvent(stream="bench", seq=i + 1, ts=1.0 + i / 50, text=words[i % len(words)]))
    events.append(
        EndEvent(
            stream="bench",
            seq=TOKENS + 1,
            ts=100.0,
            usage=Usage(prompt_tokens=12, completion_tokens=TOKENS, total_tokens=TOKENS + 12),
            timings={"total_duration": 80.5, "eval_duration": 79.0},
        )
    )
    return events


def per_event(fmt: Any, route: str, request: dict[str, Any], events: list[Event]) -> list[bytes]:
    encoder = fmt.stream_encoder(route, request)
    chunks = [encoder.encode(e) for e in events]
    chunks.append(encoder.close())
    return [c for c in chunks if c]


def segments(chunks: list[bytes], size: int = 1460) -> list[bytes]:
    body = b"".join(chunks)
    return [body[i : i + size] for i in range(0, len(body), size)]


# -- the contenders -----------------------------------------------------------------


def ours_ndjson(reads: list[bytes]) -> int:
    parser = NdjsonParser()
    n = 0
    for data in reads:
        for _ in parser.feed(data):
            n += 1
    for _ in parser.close():
        n += 1
    return n


def ours_ollama(reads: list[bytes]) -> int:
    parser = OllamaStreamParser("chat")
    n = 0
    for data in reads:
        for _ in parser.feed(data):
            n += 1
    for _ in parser.close():
        n += 1
    return n


def official_ollama(reads: list[bytes]) -> int:
    # What ollama._client does with a streamed response: iter_lines, json.loads.
    response = httpx.Response(200, content=iter(reads))
    n = 0
    for line in response.iter_lines():
        json.loads(line)
        n += 1
    return n


def ours_sse(reads: list[bytes]) -> int:
    parser = SseParser()
    n = 0
    for data in reads:
        for event in parser.feed(data):
            if event.data != "[DONE]":
                orjson.loads(event.data)
            n += 1
    for _event in parser.close():
        n += 1
    return n


def ours_openai(reads: list[bytes]) -> int:
    parser = OpenAIStreamParser("chat")
    n = 0
    for data in reads:
        for _ in parser.feed(data):
            n += 1
    for _ in parser.close():
        n += 1
    return n


def official_openai(reads: list[bytes]) -> int:
    # What openai._streaming.Stream does: SSEDecoder.iter_bytes, then sse.json().
    n = 0
    for sse in SSEDecoder().iter_bytes(iter(reads)):
        if sse.data.startswith("[DONE]"):
            n += 1
            break
        sse.json()
        n += 1
    return n


def streambus_parser(parser_class: Callable[[], Any]) -> Callable[[list[bytes]], int]:
    def run(reads: list[bytes]) -> int:
        parser = parser_class()
        n = 0
        for data in reads:
            for _ in parser.feed(data):
                n += 1
        for _ in parser.close():
            n += 1
        return n

    return run


def official_anthropic(reads: list[bytes]) -> int:
    # What anthropic._streaming.Stream does: SSEDecoder.iter_bytes, then sse.json() per event.
    n = 0
    for sse in AnthropicSSEDecoder().iter_bytes(iter(reads)):
        sse.json()
        n += 1
    return n


def official_gemini(reads: list[bytes]) -> int:
    # What google-genai's generate_content_stream does with the body: HttpResponse.segments()
    # (SSE lines, data joined, json.loads), before its pydantic models.
    n = 0
    for _ in GenaiHttpResponse({}, httpx.Response(200, content=iter(reads))).segments():
        n += 1
    return n


def measure(contenders: list[tuple[str, Callable[[list[bytes]], int]]], reads: list[bytes], chunks: int) -> list[float]:
    """Best CPU time per chunk of each contender, in ns; repetitions interleave the contenders.

    CPU time of this process (not wall time) and interleaving keep the
    comparison fair on a machine shared with other work.
    """
    for _, fn in contenders:
        fn(reads)  # warm up
    best = [float("inf")] * len(contenders)
    for _ in range(REPEATS):
        for i, (_, fn) in enumerate(contenders):
            started = time.process_time_ns()
            fn(reads)
            best[i] = min(best[i], time.process_time_ns() - started)
    return [b / chunks for b in best]


def rows() -> Iterator[tuple[str, str, str, float, float]]:
    events = answer()
    Contender = tuple[str, Callable[[list[bytes]], int]]
    cases: list[tuple[str, Any, str, dict[str, Any], list[Contender], Contender]] = [
        ("Ollama NDJSON", OllamaFormat(), "/api/chat", {"model": "bench-model"},
         [("streambus NdjsonParser", ours_ndjson), ("streambus OllamaStreamParser", ours_ollama)],
         ("ollama client (httpx iter_lines + json.loads)", official_ollama)),
        ("OpenAI SSE", OpenAIFormat(), "/v1/chat/completions",
         {"model": "bench-model", "stream_options": {"include_usage": True}},
         [("streambus SseParser + orjson", ours_sse), ("streambus OpenAIStreamParser", ours_openai)],
         ("openai client (SSEDecoder + sse.json)", official_openai)),
        ("OpenAI Responses SSE", OpenAIFormat(), "/v1/responses", {"model": "bench-model"},
         [("streambus ResponsesStreamParser", streambus_parser(ResponsesStreamParser))],
         ("openai client (SSEDecoder + sse.json)", official_openai)),
        ("Anthropic Messages SSE", AnthropicFormat(), "/v1/messages", {"model": "bench-model"},
         [("streambus AnthropicStreamParser", streambus_parser(AnthropicStreamParser))],
         ("anthropic client (SSEDecoder + sse.json)", official_anthropic)),
        ("Gemini SSE", GeminiFormat(), "/v1beta/models/{model}:streamGenerateContent", {},
         [("streambus GeminiStreamParser", streambus_parser(GeminiStreamParser))],
         ("google-genai (HttpResponse.segments)", official_gemini)),
    ]  # fmt: skip
    for label, fmt, route, request, ours, official in cases:
        chunks = per_event(fmt, route, request, events)
        for cut, reads in (("1 chunk per read", chunks), ("1460-byte segments", segments(chunks))):
            base, *mine = measure([official, *ours], reads, len(chunks))
            yield label, cut, official[0], base, 1.0
            for (name, _), ns in zip(ours, mine, strict=True):
                yield label, cut, name, ns, base / ns


def main() -> None:
    lines = [
        "## Parsers: cost per provider chunk (ours vs the official clients' decoding)",
        "",
        f"{TOKENS} content chunks + start/end, encoded by the plugins' own WireFormat; "
        f"CPU time, best of {REPEATS} interleaved runs.",
        "",
        "| stream | reads | parser | ns / chunk | speed-up vs official |",
        "|---|---|---|---:|---:|",
    ]
    worst = float("inf")
    for label, cut, name, ns, speedup in rows():
        lines.append(f"| {label} | {cut} | {name} | {ns:,.0f} | {speedup:.2f}x |")
        if name.startswith("streambus"):
            worst = min(worst, speedup)
        print(lines[-1], flush=True)
    met = "met" if worst >= GOAL else "NOT met"
    lines += [
        "",
        f"Goal: at least {GOAL:.0f}x faster per chunk than each official client's decoding. "
        f"Slowest streambus speed-up: {worst:.2f}x — goal {met}.",
        "",
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
