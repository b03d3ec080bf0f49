"""Sans-I/O parsers for model streams: bytes in, parsed items out, no sockets.

- :class:`Utf8Decoder` — incremental UTF-8 that never splits a character;
- :class:`NdjsonParser` — newline-delimited JSON (Ollama's stream format);
- :class:`SseParser` — WHATWG server-sent events (OpenAI-compatible streams),
  with :func:`format_sse` for the other direction;
- :class:`SkippedTypes` — what a provider parser skipped, counted and logged once;
- :func:`tool_text` / :func:`parse_tool_text` / :func:`merge_tool_calls` —
  the JSON-lines text that ``tool`` channel deltas carry.

Producers only move bytes between a socket and these parsers, so every wire
condition (a character split across reads, one byte per read, CRLF, a
missing last newline) is testable without a network. Bad input raises
:class:`~streambus.errors.WireError` carrying the byte ``offset``.
"""

from __future__ import annotations

from ..errors import WireError
from ._ndjson import DEFAULT_MAX_LINE, NdjsonParser, yield_then_raise
from ._skipped import SkippedTypes
from ._sse import RawSseEvent, SseEvent, SseParser, format_sse
from ._tools import ToolCall, ToolCallFragment, merge_tool_calls, parse_tool_text, tool_text
from ._utf8 import Utf8Decoder

__all__ = [
    "DEFAULT_MAX_LINE",
    "NdjsonParser",
    "RawSseEvent",
    "SkippedTypes",
    "SseEvent",
    "SseParser",
    "ToolCall",
    "ToolCallFragment",
    "Utf8Decoder",
    "WireError",
    "format_sse",
    "merge_tool_calls",
    "parse_tool_text",
    "tool_text",
    "yield_then_raise",
]
