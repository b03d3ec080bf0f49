"""streambus-gemini: Gemini API streams into the bus, and bus events back into that format.

- :class:`GeminiProducer` (entry point ``gemini`` in ``streambus.producers``)
  streams ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``;
- :class:`GeminiFormat` (entry point ``gemini`` in ``streambus.formats``)
  encodes events back into that stream for the mock server, so the official
  ``google-genai`` client can test against recordings;
- :class:`GeminiStreamParser` is the sans-I/O parser; it yields the
  provider-neutral pieces of :mod:`streambus.formats`, so the proxy reads
  Gemini answers with it too.

The producer runs on asyncio only (it uses aiohttp); the parser and the
format are plain functions of bytes and events and run anywhere.
"""

from __future__ import annotations

from ._format import GeminiFormat, GeminiStreamEncoder, gemini_sse, usage_metadata
from ._producer import GeminiProducer
from ._protocol import FINISH_REASONS, GeminiStreamParser, chunk_pieces, gemini_usage

__all__ = [
    "FINISH_REASONS",
    "GeminiFormat",
    "GeminiProducer",
    "GeminiStreamEncoder",
    "GeminiStreamParser",
    "chunk_pieces",
    "gemini_sse",
    "gemini_usage",
    "usage_metadata",
]
