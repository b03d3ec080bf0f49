"""streambus-anthropic: Anthropic Messages streams into the bus, and bus events back into that format.

- :class:`AnthropicProducer` (entry point ``anthropic`` in ``streambus.producers``)
  streams ``POST /v1/messages`` into bus events;
- :class:`AnthropicFormat` (entry point ``anthropic`` in ``streambus.formats``)
  encodes events back into Anthropic's server-sent events for the mock
  server, so the official ``anthropic`` client can test against recordings;
- :class:`AnthropicStreamParser` is the sans-I/O parser; it yields the
  provider-neutral pieces of :mod:`streambus.formats`, so the proxy reads
  Anthropic answers with it too.

The producer runs on asyncio only (it uses aiohttp); the parser and the
format are plain functions of bytes and events and run anywhere.
"""

from __future__ import annotations

from ._format import AnthropicFormat, AnthropicStreamEncoder, anthropic_sse, usage_body
from ._producer import AnthropicProducer
from ._protocol import RETRYABLE_ERRORS, STOP_REASONS, AnthropicStreamParser, anthropic_usage, message_pieces

__all__ = [
    "RETRYABLE_ERRORS",
    "STOP_REASONS",
    "AnthropicFormat",
    "AnthropicProducer",
    "AnthropicStreamEncoder",
    "AnthropicStreamParser",
    "anthropic_sse",
    "anthropic_usage",
    "message_pieces",
    "usage_body",
]
