"""Anthropic's Messages streaming format, sans-I/O: SSE bytes in, stream pieces out.

``POST /v1/messages`` with ``stream: true`` answers with server-sent events,
each one JSON object whose ``type`` repeats the event name (documented at
https://docs.anthropic.com/en/api/messages-streaming)::

    event: message_start
    data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5",...,
           "usage":{"input_tokens":25,"cache_read_input_tokens":0,"output_tokens":1}}}

    event: content_block_start
    data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

    event: content_block_delta
    data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

    event: content_block_stop
    data: {"type":"content_block_stop","index":0}

    event: message_delta
    data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}

    event: message_stop
    data: {"type":"message_stop"}

:class:`AnthropicStreamParser` turns those bytes into :class:`TextPiece`
(``text_delta`` -> ``content``, ``thinking_delta`` -> ``reasoning``,
``tool_use`` blocks and their ``input_json_delta`` -> ``tool`` fragments in
the ``docs/wire.md`` line format), one :class:`DonePiece` at
``message_stop`` (the end reason and the usage gathered from
``message_start`` and ``message_delta``) or an :class:`ErrorPiece` for an
``error`` event. ``ping`` and ``signature_delta`` carry nothing for the bus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, TypeAlias

import msgspec
import orjson

from streambus import Usage, WireError
from streambus.events import Channel
from streambus.validation import validation_problem
from streambus.wire import SkippedTypes, SseEvent, SseParser, ToolCallFragment, tool_text, yield_then_raise

__all__ = [
    "RETRYABLE_ERRORS",
    "STOP_REASONS",
    "AnthropicStreamParser",
    "DonePiece",
    "ErrorPiece",
    "Piece",
    "TextPiece",
    "anthropic_usage",
]

STOP_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic's ``stop_reason`` -> the bus ``end`` reason; other values pass through unchanged."""

RETRYABLE_ERRORS: Final = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})
"""Error types worth retrying (Anthropic's 429, 500, 504 and 529)."""


class TextPiece(msgspec.Struct, frozen=True):
    """Generated text on a channel (``content``, ``reasoning`` or ``tool``)."""

    text: str
    channel: Channel = "content"


class DonePiece(msgspec.Struct, frozen=True, kw_only=True):
    """``message_stop``: the bus end reason, Anthropic's own ``stop_reason``, and the usage."""

    reason: str = "stop"
    stop_reason: str | None = None
    usage: Usage | None = None


class ErrorPiece(msgspec.Struct, frozen=True, kw_only=True):
    """An ``error`` event: ``{"type": "error", "error": {"type": "overloaded_error", "message": ...}}``."""

    type: str
    message: str

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (overloaded, rate limited, server error)."""
        return self.type in RETRYABLE_ERRORS


Piece: TypeAlias = TextPiece | DonePiece | ErrorPiece


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    usage: _Usage | None = None


class _Block(msgspec.Struct):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Delta(msgspec.Struct):
    # content_block_delta's delta and message_delta's delta share this struct.
    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Error(msgspec.Struct):
    type: str = "error"
    message: str = ""


class _Event(msgspec.Struct):
    """The fields of an event we read; msgspec validates them while decoding."""

    type: str | None = None
    index: int | None = None
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _Error | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


def anthropic_usage(
    input_tokens: int | None,
    output_tokens: int | None,
    cache_creation_input_tokens: int | None = None,
    cache_read_input_tokens: int | None = None,
) -> Usage:
    """The bus :class:`~streambus.Usage` for Anthropic's counts.

    Anthropic's ``input_tokens`` leaves out the tokens written to and read
    from the prompt cache; the bus ``prompt_tokens`` counts every input
    token, so it is the sum of the three.
    """
    known = [n for n in (input_tokens, cache_creation_input_tokens, cache_read_input_tokens) if n is not None]
    prompt = sum(known) if known else None
    total = (prompt or 0) + (output_tokens or 0) if prompt is not None or output_tokens is not None else None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output_tokens,
        total_tokens=total,
        cached_input_tokens=cache_read_input_tokens,
        cache_creation_input_tokens=cache_creation_input_tokens,
    )


class AnthropicStreamParser:
    """Parse an Anthropic Messages SSE body into pieces, incrementally.

    ::

        parser = AnthropicStreamParser()
        for chunk in reads:
            for piece in parser.feed(chunk):
                ...
        for piece in parser.close():
            ...
        if not parser.done:
            ...  # no message_stop (nor error): the stream was truncated

    Iterate what :meth:`feed` returns before feeding again. An event whose
    data is not JSON, has no ``type``, or has a field of the wrong type (a
    ``text_delta`` without text, say) raises
    :class:`~streambus.errors.WireError` naming the problem and the byte
    offset of the event, after every piece before it. An event type this
    parser does not know (Anthropic adds some now and then) is skipped and
    counted in :attr:`skipped`, and the first of each type is logged once per
    process, so a new event never breaks a stream. Events after
    ``message_stop`` or ``error`` are ignored.
    """

    __slots__ = ("_blocks", "_reason", "_sse", "_tools", "_usage", "done", "skipped")

    def __init__(self) -> None:
        self._sse = SseParser()
        self._blocks: dict[int, int | None] = {}  # content block index -> tool call index (None: not a tool)
        self._tools = 0
        self._usage: dict[str, int] = {}
        self._reason: str | None = None
        self.done = False
        """Whether ``message_stop`` (or an ``error`` event) arrived."""
        self.skipped = SkippedTypes("anthropic")
        """Events (and delta or block types) skipped because this parser does not know them, by type."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Piece]:
        """Add *data*; return an iterator over the pieces it completed."""
        return self._pieces(self._sse.feed(data))

    def close(self) -> Iterator[Piece]:
        """End of input: the pieces of a last event that had no blank line after it."""
        return self._pieces(self._sse.close())

    def _pieces(self, events: Iterator[SseEvent]) -> Iterator[Piece]:
        out: list[Piece] = []
        try:
            for sse in events:
                if not self.done:
                    self._event(sse, out)
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)

    def _event(self, sse: SseEvent, out: list[Piece]) -> None:
        try:
            event = _decode_event(sse.data)
        except msgspec.ValidationError as exc:
            raise WireError(
                f"not an Anthropic stream event: {validation_problem(exc).describe()}", offset=sse.offset
            ) from None
        except msgspec.DecodeError as exc:
            raise WireError(f"event data is not JSON: {exc}", offset=sse.offset) from None
        kind = event.type or sse.event
        if kind == "content_block_delta":
            delta = event.delta
            if delta is None or event.index is None:
                raise WireError("content_block_delta: needs an index and a delta", offset=sse.offset)
            kind = delta.type or ""
            if kind == "text_delta":
                if delta.text is None:
                    raise WireError("content_block_delta: a text_delta without text", offset=sse.offset)
                if delta.text:
                    out.append(TextPiece(delta.text))
            elif kind == "thinking_delta":
                if delta.thinking is None:
                    raise WireError("content_block_delta: a thinking_delta without thinking", offset=sse.offset)
                if delta.thinking:
                    out.append(TextPiece(delta.thinking, "reasoning"))
            elif kind == "input_json_delta":
                if delta.partial_json is None:
                    raise WireError("content_block_delta: an input_json_delta without partial_json", offset=sse.offset)
                tool = self._blocks.get(event.index)
                if tool is not None and delta.partial_json:
                    out.append(TextPiece(tool_text(ToolCallFragment(index=tool, arguments=delta.partial_json)), "tool"))
            elif kind != "signature_delta":  # the signature only matters to Anthropic, on the next turn
                self.skipped.note(f"content_block_delta.{kind}")
        elif kind == "content_block_start":
            block = event.content_block
            if block is None or event.index is None:
                raise WireError("content_block_start: needs an index and a content_block", offset=sse.offset)
            self._start_block(event.index, block, out)
        elif kind in ("ping", "content_block_stop"):
            pass
        elif kind == "message_start":
            if event.message is None:
                raise WireError("message_start: needs a message", offset=sse.offset)
            self._count(event.message.usage)
        elif kind == "message_delta":
            if event.delta is not None and event.delta.stop_reason is not None:
                self._reason = event.delta.stop_reason
            self._count(event.usage)
        elif kind == "message_stop":
            self.done = True
            out.append(DonePiece(reason=self._end_reason(), stop_reason=self._reason, usage=self._total()))
        elif kind == "error":
            self.done = True
            error = event.error or _Error()
            out.append(ErrorPiece(type=error.type, message=error.message or error.type))
        elif kind == "message":  # neither a type nor an event name: nothing to go by
            raise WireError("event without a type", offset=sse.offset)
        else:
            self.skipped.note(kind)

    def _start_block(self, index: int, block: _Block, out: list[Piece]) -> None:
        if block.type == "tool_use":
            tool = self._tools
            self._tools += 1
            self._blocks[index] = tool
            # The API starts a tool_use block with an empty input and streams it as JSON fragments;
            # a server that sends the whole input at once gets it passed on as one fragment.
            arguments = orjson.dumps(block.input).decode() if block.input else ""
            out.append(
                TextPiece(
                    tool_text(ToolCallFragment(index=tool, id=block.id, name=block.name or "", arguments=arguments)),
                    "tool",
                )
            )
            return
        self._blocks[index] = None
        if block.type == "text":
            if block.text:
                out.append(TextPiece(block.text))
        elif block.type == "thinking":
            if block.thinking:
                out.append(TextPiece(block.thinking, "reasoning"))
        elif block.type != "redacted_thinking":  # encrypted reasoning: nothing readable to pass on
            self.skipped.note(f"content_block.{block.type}")

    def _count(self, usage: _Usage | None) -> None:
        # message_delta's counts are cumulative: a later value replaces an earlier one.
        if usage is not None:
            for key in msgspec.structs.fields(_Usage):
                value = getattr(usage, key.name)
                if value is not None:
                    self._usage[key.name] = value

    def _total(self) -> Usage | None:
        u = self._usage
        if not u:
            return None
        return anthropic_usage(
            u.get("input_tokens"),
            u.get("output_tokens"),
            u.get("cache_creation_input_tokens"),
            u.get("cache_read_input_tokens"),
        )

    def _end_reason(self) -> str:
        if self._reason is None:
            return "stop"
        return STOP_REASONS.get(self._reason, self._reason)
