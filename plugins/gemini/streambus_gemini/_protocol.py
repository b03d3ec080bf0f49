"""The Gemini API's streaming format, sans-I/O: SSE bytes in, stream pieces out.

``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` answers with
server-sent events, each one ``GenerateContentResponse``
(https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent)::

    data: {"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"},"index":0}],
           "modelVersion":"gemini-2.5-flash","responseId":"r1"}

    data: {"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},"finishReason":"STOP","index":0}],
           "usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":3,"thoughtsTokenCount":20,
                            "cachedContentTokenCount":4,"totalTokenCount":32}}

There is no end marker: the chunk with a ``finishReason`` (or a
``promptFeedback.blockReason``: the prompt itself was blocked) ends the
answer. :class:`GeminiStreamParser` yields the provider-neutral pieces of
:mod:`streambus.formats`: :class:`~streambus.formats.TextPiece` (text parts
to ``content``, ``thought: true`` parts to ``reasoning``, each
``functionCall`` part to one whole ``tool`` fragment), then one
:class:`~streambus.formats.EndPiece` with the end reason and usage, or an
:class:`~streambus.formats.ErrorPiece` for an ``{"error": ...}`` chunk.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import orjson

from streambus import Usage, WireError
from streambus.formats import EndPiece, ErrorPiece, Piece, SseAnswerParser, TextPiece, decode_data
from streambus.validation import validation_problem
from streambus.wire import SkippedTypes, SseEvent, ToolCallFragment, tool_text

__all__ = [
    "FINISH_REASONS",
    "GeminiStreamParser",
    "chunk_pieces",
    "gemini_usage",
]

FINISH_REASONS: Final = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
"""Gemini's ``finishReason`` -> the bus ``end`` reason; others become their lower-case name."""

_RETRYABLE: Final = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED"})


class _FunctionCall(msgspec.Struct, gc=False):
    name: str = ""
    args: Any = None
    id: str | None = None


class _Part(msgspec.Struct, rename="camel", gc=False):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None
    thought_signature: str | None = None


class _Content(msgspec.Struct, gc=False):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct, rename="camel", gc=False):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int = 0


class _Feedback(msgspec.Struct, rename="camel", gc=False):
    block_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel", gc=False):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int | None = None
    cached_content_token_count: int | None = None
    total_token_count: int | None = None


class _Error(msgspec.Struct, gc=False):
    message: str = ""
    code: int | None = None
    status: str | None = None


class _Chunk(msgspec.Struct, rename="camel", gc=False):
    candidates: list[_Candidate] | None = None
    prompt_feedback: _Feedback | None = None
    usage_metadata: _UsageMetadata | None = None
    error: _Error | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def gemini_usage(
    prompt: int | None, candidates: int | None, thoughts: int | None, cached: int | None, total: int | None
) -> Usage:
    """The bus :class:`~streambus.Usage` for Gemini's ``usageMetadata`` counts.

    Gemini's ``candidatesTokenCount`` leaves the thoughts out; the bus
    ``completion_tokens`` counts every output token, so it adds them.
    """
    completion = None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    if total is None and (prompt is not None or completion is not None):
        total = (prompt or 0) + (completion or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_input_tokens=cached,
        reasoning_tokens=thoughts,
    )


class GeminiStreamParser(SseAnswerParser[Piece]):
    """Parse a Gemini ``streamGenerateContent?alt=sse`` body into pieces, incrementally.

    ::

        parser = GeminiStreamParser()
        for chunk in reads:
            for piece in parser.feed(chunk):
                ...
        for piece in parser.close():
            ...
        if not parser.done:
            ...  # no finishReason: the stream was truncated

    Iterate what :meth:`feed` returns before feeding again. Data that is not
    JSON, or not a ``GenerateContentResponse`` (a field of the wrong type),
    raises :class:`~streambus.errors.WireError` with the byte offset of the
    event, after every piece before it. Part kinds it does not read
    (``inlineData``, ``executableCode``...) are skipped and counted in
    :attr:`skipped`, the first of each logged once per process. Only the
    first candidate is read (the API streams one unless asked otherwise).
    An error chunk's :class:`~streambus.formats.ErrorPiece` has the error
    ``status`` (``UNAVAILABLE``...) as its ``code``.
    """

    __slots__ = ("_tools", "_usage", "skipped")

    def __init__(self) -> None:
        super().__init__()
        self._tools = 0
        self._usage: _UsageMetadata | None = None
        self.skipped = SkippedTypes("gemini")
        """Parts skipped because this parser does not read their kind, by kind."""

    def handle(self, sse: SseEvent, out: list[Piece]) -> None:
        """Append the pieces of one chunk to *out* (see the class docstring)."""
        self.handle_data(sse.event.encode(), sse.data.encode(), sse.offset, out)

    def handle_data(self, event: bytes, data: bytes, offset: int, out: list[Piece]) -> None:
        """:meth:`handle` for the chunk's data and offset (what :meth:`feed` calls)."""
        try:
            chunk = _decode_chunk(data)
        except msgspec.MsgspecError:  # decoded again for the error naming the field and the offset
            chunk = decode_data(_decode_chunk, data, offset, "a Gemini stream chunk")
        self._chunk(chunk, out)

    def _chunk(self, chunk: _Chunk, out: list[Piece]) -> None:
        if chunk.error is not None:
            self.done = True
            e = chunk.error
            retryable = e.status in _RETRYABLE or e.code in (429, 500, 503, 504)
            code = e.status or (str(e.code) if e.code is not None else None)
            out.append(ErrorPiece(message=e.message or e.status or "error", code=code, retryable=retryable))
            return
        if chunk.usage_metadata is not None:
            self._usage = chunk.usage_metadata
        finish: str | None = None
        if chunk.candidates:
            candidate = chunk.candidates[0]
            content = candidate.content
            if content is not None and content.parts:
                for part in content.parts:
                    text = part.text
                    if text and part.function_call is None:  # the usual part: text
                        out.append(TextPiece(text, "reasoning" if part.thought else "content"))
                    else:
                        self._part(part, out)
            finish = candidate.finish_reason
        if finish is None:
            feedback = chunk.prompt_feedback
            if feedback is not None and feedback.block_reason is not None:
                self.done = True
                out.append(EndPiece(reason="content_filter", usage=self._total()))
        elif finish != "FINISH_REASON_UNSPECIFIED":
            self.done = True
            reason = FINISH_REASONS.get(finish, finish.lower())
            if reason == "stop" and self._tools:
                reason = "tool_calls"
            out.append(EndPiece(reason=reason, usage=self._total()))

    def _part(self, part: _Part, out: list[Piece]) -> None:
        if part.function_call is not None:
            call = part.function_call
            arguments = orjson.dumps(call.args if call.args is not None else {}).decode()
            fragment = ToolCallFragment(index=self._tools, id=call.id, name=call.name, arguments=arguments)
            self._tools += 1
            out.append(TextPiece(tool_text(fragment), "tool"))
        elif part.text is not None:
            if part.text:
                out.append(TextPiece(part.text, "reasoning" if part.thought else "content"))
        elif part.thought_signature is None:
            self.skipped.note("part")

    def _total(self) -> Usage | None:
        u = self._usage
        if u is None:
            return None
        return gemini_usage(
            u.prompt_token_count,
            u.candidates_token_count,
            u.thoughts_token_count,
            u.cached_content_token_count,
            u.total_token_count,
        )


def chunk_pieces(body: bytes) -> list[Piece]:
    """The pieces of a whole (``:generateContent``) answer *body*: one ``GenerateContentResponse``.

    It has the shape of a stream chunk, so it is read as the one chunk of a
    stream. Raises :class:`~streambus.errors.WireError` naming what is wrong
    when *body* is not such a response.
    """
    try:
        chunk = _decode_chunk(body)
    except msgspec.ValidationError as exc:
        raise WireError(f"not a Gemini response: {validation_problem(exc).describe()}", offset=0) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"not JSON: {exc}", offset=0) from None
    parser = GeminiStreamParser()
    out: list[Piece] = []
    parser._chunk(chunk, out)
    if not parser.done:
        out.append(EndPiece(usage=parser._total()))
    return out
