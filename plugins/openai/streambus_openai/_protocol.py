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
the choice ``index`` it belongs to (``n > 1`` interleaves choices).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeAlias

import msgspec
import orjson

from streambus import Usage, WireError
from streambus.events import Channel
from streambus.wire import SseEvent, SseParser, ToolCallFragment, tool_text

__all__ = [
    "DonePiece",
    "ErrorPiece",
    "FinishPiece",
    "OpenAIRoute",
    "OpenAIStreamParser",
    "Piece",
    "TextPiece",
    "UsagePiece",
    "chunk_pieces",
    "error_piece",
]

OpenAIRoute: TypeAlias = Literal["chat", "completions"]


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


def _text(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{where}.{key} is {type(value).__name__}, expected a string")


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, Mapping):
        raise ValueError("usage is not an object")
    counts: dict[str, int | None] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"usage.{key} is {type(value).__name__}, expected an integer")
        counts[key] = value
    if counts["total_tokens"] is None and counts["prompt_tokens"] is not None:
        counts["total_tokens"] = counts["prompt_tokens"] + (counts["completion_tokens"] or 0)
    return Usage(
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        total_tokens=counts["total_tokens"],
    )


def chunk_pieces(obj: Any, route: OpenAIRoute) -> list[Piece]:
    """The pieces one decoded chunk carries, in order.

    Raises :class:`ValueError` naming the field when the chunk is not shaped
    like an OpenAI stream chunk.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("error"):
        return [error_piece(obj["error"])]
    pieces: list[Piece] = []
    choices = obj.get("choices") or []
    if not isinstance(choices, list):
        raise ValueError("choices is not a list")
    for position, choice in enumerate(choices):
        where = f"choices[{position}]"
        if not isinstance(choice, dict):
            raise ValueError(f"{where} is not an object")
        index = choice.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{where}.index is not an integer")
        if route == "chat":
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise ValueError(f"{where}.delta is not an object")
            where += ".delta"
            reasoning = _text(delta, "reasoning_content", where) or _text(delta, "reasoning", where)
            if reasoning:
                pieces.append(TextPiece(reasoning, "reasoning", index))
            content = _text(delta, "content", where)
            if content:
                pieces.append(TextPiece(content, "content", index))
            calls = delta.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ValueError(f"{where}.tool_calls is not a list")
                for i, call in enumerate(calls):
                    if not isinstance(call, dict):
                        raise ValueError(f"{where}.tool_calls[{i}] is not an object")
                    function = call.get("function") or {}
                    if not isinstance(function, dict):
                        raise ValueError(f"{where}.tool_calls[{i}].function is not an object")
                    call_index = call.get("index", i)
                    fragment = ToolCallFragment(
                        index=call_index if isinstance(call_index, int) else i,
                        id=_text(call, "id", f"{where}.tool_calls[{i}]"),
                        name=_text(function, "name", f"{where}.tool_calls[{i}].function"),
                        arguments=_text(function, "arguments", f"{where}.tool_calls[{i}].function") or "",
                    )
                    pieces.append(TextPiece(tool_text(fragment), "tool", index))
        else:
            text = _text(choice, "text", where)
            if text:
                pieces.append(TextPiece(text, "content", index))
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise ValueError(f"{where}.finish_reason is not a string")
            pieces.append(FinishPiece(reason, index))
    usage = obj.get("usage")
    if usage is not None:
        pieces.append(UsagePiece(_usage(usage)))
    return pieces


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
    data is not JSON, or not a chunk, raises :class:`~streambus.errors.WireError`
    with the byte offset of the event, after every piece before it.
    Events after ``[DONE]`` are ignored.
    """

    __slots__ = ("_sse", "done", "route")

    def __init__(self, route: OpenAIRoute = "chat") -> None:
        if route not in ("chat", "completions"):
            raise ValueError(f"route: expected 'chat' or 'completions', got {route!r}")
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
        for event in events:
            if self.done:
                continue
            data = event.data
            if data == "[DONE]" or data.strip() == "[DONE]":
                self.done = True
                yield DonePiece()
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise WireError(f"event data is not JSON: {exc}", offset=event.offset) from None
            try:
                if event.event == "error":
                    yield error_piece(obj.get("error", obj) if isinstance(obj, dict) else obj)
                    continue
                pieces = chunk_pieces(obj, route)
            except ValueError as exc:
                raise WireError(f"not an OpenAI stream chunk: {exc}", offset=event.offset) from None
            yield from pieces
