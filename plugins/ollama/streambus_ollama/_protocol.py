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
so the producer and the proxy share it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeAlias

import msgspec
import orjson

from streambus import Usage, WireError
from streambus.events import Channel
from streambus.wire import NdjsonParser, ToolCallFragment, tool_text

__all__ = [
    "TIMING_KEYS",
    "DonePiece",
    "ErrorPiece",
    "OllamaRoute",
    "OllamaStreamParser",
    "Piece",
    "TextPiece",
    "chunk_pieces",
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


def _str_field(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{where}{key} is {type(value).__name__}, expected a string")


def _int_field(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is {type(value).__name__}, expected a number")
    return int(value)


def chunk_pieces(obj: Any, route: OllamaRoute, tool_index: int = 0) -> list[Piece]:
    """The pieces one decoded stream object carries, in order.

    *tool_index* numbers tool calls that carry no index of their own (calls
    may arrive across several objects). Raises :class:`ValueError` naming the
    field when the object is not shaped like an Ollama stream object.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "error" in obj:
        error = obj["error"]
        return [ErrorPiece(error if isinstance(error, str) else orjson.dumps(error).decode())]
    pieces: list[Piece] = []
    tool_calls: Any = None
    if route == "chat":
        message = obj.get("message")
        if message is None:
            message = {}
        elif not isinstance(message, dict):
            raise ValueError(f"message is {type(message).__name__}, expected an object")
        thinking = _str_field(message, "thinking", "message.")
        content = _str_field(message, "content", "message.")
        tool_calls = message.get("tool_calls")
    else:
        thinking = _str_field(obj, "thinking", "")
        content = _str_field(obj, "response", "")
    if thinking:
        pieces.append(TextPiece(thinking, "reasoning"))
    if content:
        pieces.append(TextPiece(content, "content"))
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise ValueError("message.tool_calls is not a list")
        for i, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"message.tool_calls[{i}].function.name is missing")
            arguments = function.get("arguments", {})
            index = function.get("index")
            fragment = ToolCallFragment(
                index=index if isinstance(index, int) else tool_index + i,
                id=call.get("id") if isinstance(call.get("id"), str) else None,
                name=function["name"],
                arguments=arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode(),
            )
            pieces.append(TextPiece(tool_text(fragment), "tool"))
    if obj.get("done") is True:
        prompt = _int_field(obj, "prompt_eval_count")
        completion = _int_field(obj, "eval_count")
        usage = None
        if prompt is not None or completion is not None:
            total = (prompt or 0) + (completion or 0)
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)
        timings: dict[str, float] = {}
        for key in TIMING_KEYS:
            ns = _int_field(obj, key)
            if ns is not None:
                timings[key] = ns / 1e9
        reason = _str_field(obj, "done_reason", "") or "stop"
        pieces.append(DonePiece(reason=reason, usage=usage, timings=timings))
    return pieces


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
    (invalid JSON, a line that is not an Ollama object) raises
    :class:`~streambus.errors.WireError` with the byte offset of the line,
    after every piece before it. Objects after the final one are ignored.
    """

    __slots__ = ("_lines", "_tools", "done", "route")

    def __init__(self, route: OllamaRoute = "chat") -> None:
        if route not in ("chat", "generate"):
            raise ValueError(f"route: expected 'chat' or 'generate', got {route!r}")
        self.route: OllamaRoute = route
        self._lines = NdjsonParser()
        self._tools = 0
        self.done = False
        """Whether the final ``done: true`` object (or an error object) arrived."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Piece]:
        """Add *data*; return an iterator over the pieces it completed."""
        return self._pieces(self._lines.feed(data))

    def close(self) -> Iterator[Piece]:
        """End of input: the pieces of a last line that had no newline."""
        return self._pieces(self._lines.close())

    def _pieces(self, objects: Iterator[Any]) -> Iterator[Piece]:
        for obj in objects:
            if self.done:
                continue
            try:
                pieces = chunk_pieces(obj, self.route, self._tools)
            except ValueError as exc:
                raise WireError(f"not an Ollama stream object: {exc}", offset=self._lines.line_offset) from None
            for piece in pieces:
                if isinstance(piece, TextPiece) and piece.channel == "tool":
                    self._tools += 1
                elif not isinstance(piece, TextPiece):
                    self.done = True
                yield piece
