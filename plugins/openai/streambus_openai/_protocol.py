"""The OpenAI streaming format, sans-I/O: SSE bytes in, stream pieces out.

OpenAI-compatible servers stream ``/v1/chat/completions`` (and the legacy
``/v1/completions``) with ``stream: true`` as server-sent events, one JSON
chunk per event, ended by ``data: [DONE]`` (documented at
https://platform.openai.com/docs/api-reference/chat-streaming)::

    data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",
           "choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"logprobs":null,"finish_reason":null}]}

    data: {"id":"chatcmpl-1",...,"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}

    data: {"id":"chatcmpl-1",...,"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}

    data: [DONE]

:class:`OpenAIStreamParser` turns those bytes into pieces; every piece names
the choice ``index`` it belongs to (``n > 1`` interleaves choices). The proxy
reads it through :class:`OpenAIPieceParser` (provider-neutral
:mod:`streambus.formats` pieces), and takes the usage it asked for on the
client's behalf back out with :class:`UsageFilter`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, TypeAlias

import msgspec
import orjson

from streambus import Usage, WireError, formats
from streambus.events import Channel
from streambus.producing import StreamParser
from streambus.validation import validation_problem
from streambus.wire import SseEvent, SseParser, ToolCallFragment, tool_text, yield_then_raise

__all__ = [
    "DonePiece",
    "ErrorPiece",
    "FinishPiece",
    "OpenAIPieceParser",
    "OpenAIRoute",
    "OpenAIStreamParser",
    "Piece",
    "TextPiece",
    "UsageFilter",
    "UsagePiece",
    "body_pieces",
    "chunk_pieces",
    "error_piece",
]

OpenAIRoute: TypeAlias = Literal["chat", "completions", "responses"]


class TextPiece(msgspec.Struct, frozen=True):
    """Generated text of choice *index* on a channel (``content``, ``reasoning``, ``tool``)."""

    text: str
    channel: Channel = "content"
    index: int = 0


class FinishPiece(msgspec.Struct, frozen=True):
    """Choice *index* finished: ``finish_reason`` (``stop``, ``length``, ``tool_calls``, ...)."""

    reason: str
    index: int = 0


class UsagePiece(msgspec.Struct, frozen=True):
    """Token counts of the whole request (the usage chunk)."""

    usage: Usage


class DonePiece(msgspec.Struct, frozen=True):
    """``data: [DONE]``: the stream ended normally."""


class ErrorPiece(msgspec.Struct, frozen=True, kw_only=True):
    """An error object sent in the stream: ``{"error": {"message", "type", "code"}}``."""

    message: str
    type: str | None = None
    code: str | None = None


Piece: TypeAlias = TextPiece | FinishPiece | UsagePiece | DonePiece | ErrorPiece


def error_piece(error: Any) -> ErrorPiece:
    """An :class:`ErrorPiece` from an OpenAI ``error`` value (an object or a string)."""
    if isinstance(error, Mapping):
        message = error.get("message")
        code = error.get("code")
        kind = error.get("type")
        return ErrorPiece(
            message=message if isinstance(message, str) else orjson.dumps(error).decode(),
            type=kind if isinstance(kind, str) else None,
            code=str(code) if code is not None else None,
        )
    return ErrorPiece(message=error if isinstance(error, str) else orjson.dumps(error).decode())


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int | None = None
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Chunk(msgspec.Struct):
    """The fields of a stream chunk we read; msgspec validates them while decoding."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _pieces(chunk: _Chunk, route: OpenAIRoute) -> list[Piece]:
    if chunk.error:
        return [error_piece(chunk.error)]
    pieces: list[Piece] = []
    for position, choice in enumerate(chunk.choices or ()):
        index = choice.index if choice.index is not None else position
        if route == "chat":
            delta = choice.delta
            if delta is not None:
                reasoning = delta.reasoning_content or delta.reasoning
                if reasoning:
                    pieces.append(TextPiece(reasoning, "reasoning", index))
                if delta.content:
                    pieces.append(TextPiece(delta.content, "content", index))
                for i, call in enumerate(delta.tool_calls or ()):
                    function = call.function
                    fragment = ToolCallFragment(
                        index=call.index if call.index is not None else i,
                        id=call.id,
                        name=function.name if function is not None else None,
                        arguments=(function.arguments or "") if function is not None else "",
                    )
                    pieces.append(TextPiece(tool_text(fragment), "tool", index))
        elif choice.text:
            pieces.append(TextPiece(choice.text, "content", index))
        if choice.finish_reason is not None:
            pieces.append(FinishPiece(choice.finish_reason, index))
    usage = chunk.usage
    if usage is not None:
        total = usage.total_tokens
        if total is None and usage.prompt_tokens is not None:
            total = usage.prompt_tokens + (usage.completion_tokens or 0)
        cached = usage.prompt_tokens_details
        thought = usage.completion_tokens_details
        pieces.append(
            UsagePiece(
                Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    total_tokens=total,
                    cached_input_tokens=cached.cached_tokens if cached is not None else None,
                    reasoning_tokens=thought.reasoning_tokens if thought is not None else None,
                )
            )
        )
    return pieces


def chunk_pieces(obj: Any, route: OpenAIRoute) -> list[Piece]:
    """The pieces one decoded chunk carries, in order.

    Raises :class:`ValueError` naming the field when the chunk is not shaped
    like an OpenAI stream chunk.
    """
    try:
        chunk = msgspec.convert(obj, _Chunk)
    except msgspec.ValidationError as exc:
        raise ValueError(validation_problem(exc).describe()) from None
    return _pieces(chunk, route)


class OpenAIStreamParser:
    """Parse an OpenAI-compatible SSE response body into pieces, incrementally.

    ::

        parser = OpenAIStreamParser("chat")
        for chunk in reads:
            for piece in parser.feed(chunk):
                ...
        for piece in parser.close():
            ...
        if not parser.done:
            ...  # no data: [DONE]: the stream was truncated

    Iterate what :meth:`feed` returns before feeding again. An event whose
    data is not JSON, or not a chunk (a field of the wrong type), raises
    :class:`~streambus.errors.WireError` naming the problem and the byte
    offset of the event, after every piece before it. Events after
    ``[DONE]`` are ignored. Data is decoded straight into typed structs
    (msgspec), which validates it at no extra cost.
    """

    __slots__ = ("_sse", "done", "route")

    def __init__(self, route: OpenAIRoute = "chat") -> None:
        if route not in ("chat", "completions"):
            hint = " (the Responses API has its own parser: ResponsesStreamParser)" if route == "responses" else ""
            raise ValueError(f"route: expected 'chat' or 'completions', got {route!r}{hint}")
        self.route: OpenAIRoute = route
        self._sse = SseParser()
        self.done = False
        """Whether ``data: [DONE]`` arrived."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Piece]:
        """Add *data*; return an iterator over the pieces it completed."""
        return self._pieces(self._sse.feed(data))

    def close(self) -> Iterator[Piece]:
        """End of input: the pieces of a last event that had no blank line after it."""
        return self._pieces(self._sse.close())

    def _pieces(self, events: Iterator[SseEvent]) -> Iterator[Piece]:
        route = self.route
        out: list[Piece] = []
        try:
            for event in events:
                if self.done:
                    continue
                data = event.data
                if data == "[DONE]" or data.strip() == "[DONE]":
                    self.done = True
                    out.append(DonePiece())
                elif event.event == "error":
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        obj = data
                    out.append(error_piece(obj.get("error", obj) if isinstance(obj, dict) else obj))
                else:
                    out.extend(_pieces(_decode(data, event.offset), route))
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)


def _decode(data: str, offset: int) -> _Chunk:
    try:
        return _decode_chunk(data)
    except msgspec.ValidationError as exc:
        raise WireError(f"not an OpenAI stream chunk: {validation_problem(exc).describe()}", offset=offset) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"event data is not JSON: {exc}", offset=offset) from None


class OpenAIPieceParser:
    """An OpenAI parser speaking :class:`streambus.formats.PieceParser` (what the proxy reads).

    *parser* is the :class:`OpenAIStreamParser` of *route* unless given (the
    Responses API's is :class:`~streambus_openai.ResponsesStreamParser`).
    Choice text keeps its choice number; the finish reason of choice 0 and
    the usage are held until the end (``data: [DONE]``, ``response.completed``),
    which becomes the one :class:`~streambus.formats.EndPiece` carrying them.
    """

    __slots__ = ("_parser", "_reason", "_usage")

    def __init__(self, route: OpenAIRoute = "chat", *, parser: StreamParser | None = None) -> None:
        self._parser = parser if parser is not None else OpenAIStreamParser(route)
        self._reason = "stop"
        self._usage: Usage | None = None

    @property
    def done(self) -> bool:
        """Whether the answer's end arrived."""
        return self._parser.done

    def feed(self, data: bytes) -> Iterator[formats.Piece]:
        """Add *data*; return an iterator over the pieces it completed (see :meth:`OpenAIStreamParser.feed`)."""
        return self.neutral(self._parser.feed(data))

    def close(self) -> Iterator[formats.Piece]:
        """End of input: the pieces of a last event that had no blank line after it."""
        return self.neutral(self._parser.close())

    def neutral(self, pieces: Iterable[Piece]) -> Iterator[formats.Piece]:
        """The provider-neutral pieces for the OpenAI *pieces* (iterated lazily, in order)."""
        for piece in pieces:
            if isinstance(piece, TextPiece):
                yield formats.TextPiece(piece.text, piece.channel, piece.index)
            elif isinstance(piece, FinishPiece):
                if piece.index == 0:
                    self._reason = piece.reason
            elif isinstance(piece, UsagePiece):
                self._usage = piece.usage
            elif isinstance(piece, DonePiece):
                yield formats.EndPiece(reason=self._reason, usage=self._usage)
            else:
                yield formats.ErrorPiece(message=piece.message, code=piece.code)


def body_pieces(body: bytes, route: OpenAIRoute) -> list[formats.Piece]:
    """The pieces of a whole ``stream: false`` answer (``chat.completion`` or ``text_completion``).

    Raises :class:`~streambus.errors.WireError` naming the problem when *body* is not one.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}", offset=0) from None
    if not isinstance(obj, dict):
        raise WireError("not an OpenAI answer: the body is not a JSON object", offset=0)
    if route == "chat" and isinstance(obj.get("choices"), list):
        # A chat.completion carries "message" where a chunk carries "delta": same fields.
        obj = {**obj, "choices": [{**c, "delta": c.get("message")} for c in obj["choices"] if isinstance(c, dict)]}
    try:
        pieces = chunk_pieces(obj, route)
    except ValueError as exc:
        raise WireError(f"not an OpenAI answer: {exc}", offset=0) from None
    return [*OpenAIPieceParser(route).neutral([*pieces, DonePiece()])]


# An SSE event ends at a blank line, whichever line ending the server uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The ``"usage":null`` every chunk carries once include_usage is asked for.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')


class UsageFilter:
    """Take out of a streamed answer what ``stream_options.include_usage`` added, sans-I/O.

    The proxy asks the upstream for usage when the client did not; OpenAI
    then adds a last chunk with ``"choices": []`` and the usage, and a
    ``"usage": null`` member to every other chunk (as documented at
    https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options).
    This filter drops that chunk and that member, byte for byte otherwise,
    so the client gets what it would have got without the proxy asking.
    Bytes are passed on whole events at a time; :meth:`close` returns the rest.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for the upstream's *data* (an event cut by a read is held until it completes)."""
        held = self._held + data if self._held else data
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(held):
            out.append(_without_usage(held[start : end.end()]))
            start = end.end()
        self._held = held[start:]
        return b"".join(out)

    def close(self) -> bytes:
        """What is still held back (a last event without its blank line), filtered the same way."""
        rest, self._held = self._held, b""
        return _without_usage(rest) if rest else b""


def _without_usage(event: bytes) -> bytes:
    if b'"usage"' not in event:
        return event
    data = b"".join(
        line[5:].removeprefix(b" ") for line in re.split(rb"\r\n|\n|\r", event) if line.startswith(b"data:")
    )
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return event  # not a chunk: not ours to change
    if not isinstance(obj, dict) or "usage" not in obj:
        return event
    if obj["usage"] is not None and obj.get("choices") == []:
        return b""
    if obj["usage"] is None:
        return _NULL_USAGE.sub(b"", event, count=1)
    return event
