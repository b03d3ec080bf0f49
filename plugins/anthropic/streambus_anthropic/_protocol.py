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

:class:`AnthropicStreamParser` turns those bytes into the provider-neutral
pieces of :mod:`streambus.formats` (what the producer publishes and the
proxy reads): :class:`~streambus.formats.TextPiece` (``text_delta`` ->
``content``, ``thinking_delta`` -> ``reasoning``, ``tool_use`` blocks and
their ``input_json_delta`` -> ``tool`` fragments in the ``docs/wire.md``
line format), one :class:`~streambus.formats.EndPiece` at ``message_stop``
(the end reason and the usage gathered from ``message_start`` and
``message_delta``) or an :class:`~streambus.formats.ErrorPiece` for an
``error`` event. ``ping`` and ``signature_delta`` carry nothing for the bus.
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
    "RETRYABLE_ERRORS",
    "STOP_REASONS",
    "AnthropicStreamParser",
    "anthropic_usage",
    "message_pieces",
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


class _Usage(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct, gc=False):
    id: str | None = None
    model: str | None = None
    usage: _Usage | None = None


class _Block(msgspec.Struct, gc=False):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Delta(msgspec.Struct, gc=False):
    # content_block_delta's delta and message_delta's delta share this struct.
    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Error(msgspec.Struct, gc=False):
    type: str = "error"
    message: str = ""


class _Event(msgspec.Struct, gc=False):
    """The fields of an event we read; msgspec validates them while decoding."""

    type: str | None = None
    index: int | None = None
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _Error | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class _Answer(msgspec.Struct, gc=False):
    """A whole (``stream: false``) answer: ``{"type": "message", "content": [...], "stop_reason", "usage"}``."""

    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


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


class AnthropicStreamParser(SseAnswerParser[Piece]):
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
    ``message_stop`` or ``error`` are ignored. An ``error`` event's
    :class:`~streambus.formats.ErrorPiece` has the error type as its ``code``
    and is ``retryable`` for :data:`RETRYABLE_ERRORS`.
    """

    __slots__ = ("_blocks", "_reason", "_tools", "_usage", "skipped")

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, int | None] = {}  # content block index -> tool call index (None: not a tool)
        self._tools = 0
        self._usage: dict[str, int] = {}
        self._reason: str | None = None
        self.skipped = SkippedTypes("anthropic")
        """Events (and delta or block types) skipped because this parser does not know them, by type."""

    def handle(self, sse: SseEvent, out: list[Piece]) -> None:
        """Append the pieces of one event to *out* (see the class docstring)."""
        self.handle_data(sse.event.encode(), sse.data.encode(), sse.offset, out)

    def handle_data(self, event: bytes, data: bytes, offset: int, out: list[Piece]) -> None:
        """:meth:`handle` for the event's type, data and offset (what :meth:`feed` calls)."""
        try:
            parsed = _decode_event(data)
        except msgspec.MsgspecError:  # decoded again for the error naming the field and the offset
            parsed = decode_data(_decode_event, data, offset, "an Anthropic stream event")
        kind = parsed.type or event.decode()  # (the type in the data is the usual way, the name the fallback)
        if kind == "content_block_delta":
            delta = parsed.delta
            if delta is None or parsed.index is None:
                raise WireError("content_block_delta: needs an index and a delta", offset=offset)
            kind = delta.type or ""
            if kind == "text_delta":
                text = delta.text
                if text is None:
                    raise WireError("content_block_delta: a text_delta without text", offset=offset)
                if text:
                    out.append(TextPiece(text))
            elif kind == "thinking_delta":
                if delta.thinking is None:
                    raise WireError("content_block_delta: a thinking_delta without thinking", offset=offset)
                if delta.thinking:
                    out.append(TextPiece(delta.thinking, "reasoning"))
            elif kind == "input_json_delta":
                if delta.partial_json is None:
                    raise WireError("content_block_delta: an input_json_delta without partial_json", offset=offset)
                tool = self._blocks.get(parsed.index)
                if tool is not None and delta.partial_json:
                    out.append(TextPiece(tool_text(ToolCallFragment(index=tool, arguments=delta.partial_json)), "tool"))
            elif kind != "signature_delta":  # the signature only matters to Anthropic, on the next turn
                self.skipped.note(f"content_block_delta.{kind}")
        elif kind == "content_block_start":
            block = parsed.content_block
            if block is None or parsed.index is None:
                raise WireError("content_block_start: needs an index and a content_block", offset=offset)
            self._start_block(parsed.index, block, out)
        elif kind in ("ping", "content_block_stop"):
            pass
        elif kind == "message_start":
            if parsed.message is None:
                raise WireError("message_start: needs a message", offset=offset)
            self._count(parsed.message.usage)
        elif kind == "message_delta":
            if parsed.delta is not None and parsed.delta.stop_reason is not None:
                self._reason = parsed.delta.stop_reason
            self._count(parsed.usage)
        elif kind == "message_stop":
            self.done = True
            out.append(EndPiece(reason=self._end_reason(), usage=self._total()))
        elif kind == "error":
            self.done = True
            error = parsed.error or _Error()
            out.append(
                ErrorPiece(
                    message=error.message or error.type, code=error.type, retryable=error.type in RETRYABLE_ERRORS
                )
            )
        elif kind == "message":  # neither a type nor an event name: nothing to go by
            raise WireError("event without a type", offset=offset)
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


def message_pieces(body: bytes) -> list[Piece]:
    """The pieces of a whole (``stream: false``) Messages answer *body*: its content blocks, then the end.

    Raises :class:`~streambus.errors.WireError` naming what is wrong when
    *body* is not a ``message`` object.
    """
    try:
        message = _decode_answer(body)
    except msgspec.ValidationError as exc:
        raise WireError(f"not an Anthropic message: {validation_problem(exc).describe()}", offset=0) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"not JSON: {exc}", offset=0) from None
    parser = AnthropicStreamParser()
    out: list[Piece] = []
    for index, block in enumerate(message.content):
        parser._start_block(index, block, out)
    parser._reason = message.stop_reason
    parser._count(message.usage)
    out.append(EndPiece(reason=parser._end_reason(), usage=parser._total()))
    return out
