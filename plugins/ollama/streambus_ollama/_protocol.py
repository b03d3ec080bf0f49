"""Ollama's streaming format, sans-I/O: NDJSON bytes in, stream pieces out.

Ollama streams ``/api/chat`` and ``/api/generate`` as one JSON object per
line (documented at https://github.com/ollama/ollama/blob/main/docs/api.md)::

    {"model":"llama3.2","created_at":"...","message":{"role":"assistant","content":"The"},"done":false}
    ...
    {"model":"llama3.2","created_at":"...","message":{"role":"assistant","content":""},
     "done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,
     "prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}

A failure in the middle of a stream is a line ``{"error": "..."}``.
:class:`OllamaStreamParser` turns those bytes into :class:`TextPiece`,
:class:`DonePiece` and :class:`ErrorPiece` values; it never touches a socket,
so the producer and the proxy share it. The proxy reads it through
:class:`OllamaPieceParser`, which maps those pieces onto the provider-neutral
ones of :mod:`streambus.formats`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, TypeAlias

import msgspec
import orjson

from streambus import Usage, WireError, formats
from streambus.events import Channel
from streambus.validation import validation_problem
from streambus.wire import NdjsonParser, ToolCallFragment, tool_text, yield_then_raise

__all__ = [
    "TIMING_KEYS",
    "DonePiece",
    "ErrorPiece",
    "OllamaPieceParser",
    "OllamaRoute",
    "OllamaStreamParser",
    "Piece",
    "TextPiece",
    "body_pieces",
    "chunk_pieces",
    "neutral_piece",
]

OllamaRoute: TypeAlias = Literal["chat", "generate"]

TIMING_KEYS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
"""Ollama's duration fields (nanoseconds on the wire, seconds in ``end.timings``)."""


class TextPiece(msgspec.Struct, frozen=True):
    """Generated text on a channel (``content``, ``reasoning`` or ``tool``)."""

    text: str
    channel: Channel = "content"


class DonePiece(msgspec.Struct, frozen=True, kw_only=True):
    """The final ``done: true`` object: why it ended, token counts, timings in seconds."""

    reason: str = "stop"
    usage: Usage | None = None
    timings: dict[str, float] = {}


class ErrorPiece(msgspec.Struct, frozen=True):
    """An ``{"error": ...}`` object sent by the server in the stream."""

    message: str


Piece: TypeAlias = TextPiece | DonePiece | ErrorPiece


class _Function(msgspec.Struct):
    name: str
    arguments: Any = None
    index: int | None = None


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    thinking: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Chunk(msgspec.Struct):
    """The fields of a stream object we read; msgspec validates them while decoding."""

    message: _Message | None = None
    response: str | None = None
    thinking: str | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    total_duration: int | float | None = None
    load_duration: int | float | None = None
    prompt_eval_duration: int | float | None = None
    eval_duration: int | float | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _pieces(chunk: _Chunk, route: OllamaRoute, tool_index: int) -> list[Piece]:
    if chunk.error is not None:
        error = chunk.error
        return [ErrorPiece(error if isinstance(error, str) else orjson.dumps(error).decode())]
    pieces: list[Piece] = []
    tool_calls = None
    if route == "chat":
        message = chunk.message
        if message is None:
            thinking = content = None
        else:
            thinking, content, tool_calls = message.thinking, message.content, message.tool_calls
    else:
        thinking, content = chunk.thinking, chunk.response
    if thinking:
        pieces.append(TextPiece(thinking, "reasoning"))
    if content:
        pieces.append(TextPiece(content, "content"))
    if tool_calls:
        for i, call in enumerate(tool_calls):
            function = call.function
            arguments = function.arguments if function.arguments is not None else {}
            fragment = ToolCallFragment(
                index=function.index if function.index is not None else tool_index + i,
                id=call.id,
                name=function.name,
                arguments=arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode(),
            )
            pieces.append(TextPiece(tool_text(fragment), "tool"))
    if chunk.done:
        prompt, completion = chunk.prompt_eval_count, chunk.eval_count
        usage = None
        if prompt is not None or completion is not None:
            total = (prompt or 0) + (completion or 0)
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)
        timings: dict[str, float] = {}
        for key in TIMING_KEYS:
            ns = getattr(chunk, key)
            if ns is not None:
                timings[key] = ns / 1e9
        pieces.append(DonePiece(reason=chunk.done_reason or "stop", usage=usage, timings=timings))
    return pieces


def chunk_pieces(obj: Any, route: OllamaRoute, tool_index: int = 0) -> list[Piece]:
    """The pieces one decoded stream object carries, in order.

    *tool_index* numbers tool calls that carry no index of their own (calls
    may arrive across several objects). Raises :class:`ValueError` naming the
    field when the object is not shaped like an Ollama stream object.
    """
    try:
        chunk = msgspec.convert(obj, _Chunk)
    except msgspec.ValidationError as exc:
        raise ValueError(validation_problem(exc).describe()) from None
    return _pieces(chunk, route, tool_index)


class OllamaStreamParser:
    """Parse an Ollama NDJSON response body into pieces, incrementally.

    ::

        parser = OllamaStreamParser("chat")
        for chunk in reads:
            for piece in parser.feed(chunk):
                ...
        for piece in parser.close():
            ...
        if not parser.done:
            ...  # the server closed before the final object: truncated

    Iterate what :meth:`feed` returns before feeding again. Bad input
    (invalid JSON, a line that is not an Ollama object, a field of the wrong
    type) raises :class:`~streambus.errors.WireError` naming the problem and
    the byte offset of the line, after every piece before it. Objects after
    the final one are ignored. Lines are decoded straight into typed structs
    (msgspec), which validates them at no extra cost.
    """

    __slots__ = ("_lines", "_tools", "done", "route")

    def __init__(self, route: OllamaRoute = "chat") -> None:
        if route not in ("chat", "generate"):
            raise ValueError(f"route: expected 'chat' or 'generate', got {route!r}")
        self.route: OllamaRoute = route
        self._lines = NdjsonParser(loads=_decode_chunk)
        self._tools = 0
        self.done = False
        """Whether the final ``done: true`` object (or an error object) arrived."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Piece]:
        """Add *data*; return an iterator over the pieces it completed."""
        return self._pieces(self._lines.feed(data))

    def close(self) -> Iterator[Piece]:
        """End of input: the pieces of a last line that had no newline."""
        return self._pieces(self._lines.close())

    def _pieces(self, chunks: Iterator[_Chunk]) -> Iterator[Piece]:
        route = self.route
        out: list[Piece] = []
        try:
            for chunk in chunks:
                if self.done:
                    continue
                for piece in _pieces(chunk, route, self._tools):
                    if piece.__class__ is TextPiece:
                        if piece.channel == "tool":
                            self._tools += 1
                    else:
                        self.done = True
                    out.append(piece)
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)


def neutral_piece(piece: Piece) -> formats.Piece:
    """The provider-neutral :mod:`streambus.formats` piece for an Ollama *piece*."""
    if piece.__class__ is TextPiece:
        assert isinstance(piece, TextPiece)
        return formats.TextPiece(piece.text, piece.channel)
    if isinstance(piece, DonePiece):
        return formats.EndPiece(reason=piece.reason, usage=piece.usage, timings=piece.timings)
    assert isinstance(piece, ErrorPiece)
    return formats.ErrorPiece(message=piece.message)


class OllamaPieceParser:
    """:class:`OllamaStreamParser` speaking :class:`streambus.formats.PieceParser` (what the proxy reads)."""

    __slots__ = ("_parser",)

    def __init__(self, route: OllamaRoute = "chat") -> None:
        self._parser = OllamaStreamParser(route)

    @property
    def done(self) -> bool:
        """Whether the final ``done: true`` object (or an error object) arrived."""
        return self._parser.done

    def feed(self, data: bytes) -> Iterator[formats.Piece]:
        """Add *data*; return an iterator over the pieces it completed (see :meth:`OllamaStreamParser.feed`)."""
        return map(neutral_piece, self._parser.feed(data))

    def close(self) -> Iterator[formats.Piece]:
        """End of input: the pieces of a last line that had no newline."""
        return map(neutral_piece, self._parser.close())


def body_pieces(body: bytes, route: OllamaRoute) -> list[formats.Piece]:
    """The pieces of a whole ``stream: false`` answer *body* (one JSON object).

    Raises :class:`~streambus.errors.WireError` naming the problem when it is not one.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}", offset=0) from None
    try:
        pieces = chunk_pieces(obj, route)
    except ValueError as exc:
        raise WireError(f"not an Ollama answer: {exc}", offset=0) from None
    return [neutral_piece(piece) for piece in pieces]
