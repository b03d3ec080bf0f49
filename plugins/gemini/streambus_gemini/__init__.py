"""streambus-gemini: Gemini API streams into the bus, and bus events back into that format.

- :class:`GeminiProducer` (entry point ``gemini`` in ``streambus.producers``)
  streams ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``;
- :class:`GeminiFormat` (entry point ``gemini`` in ``streambus.formats``)
  encodes events back into that stream for the mock server, so the official
  ``google-genai`` client can test against recordings;
- :class:`GeminiStreamParser` is the sans-I/O parser.

The producer runs on asyncio only (it uses aiohttp); the parser and the
format are plain functions of bytes and events and run anywhere.
"""

from __future__ import annotations

from ._format import GeminiFormat, GeminiStreamEncoder, gemini_sse, usage_metadata
from ._producer import GeminiProducer
from ._protocol import FINISH_REASONS, DonePiece, ErrorPiece, GeminiStreamParser, Piece, TextPiece, gemini_usage

__all__ = [
    "FINISH_REASONS",
    "DonePiece",
    "ErrorPiece",
    "GeminiFormat",
    "GeminiProducer",
    "GeminiStreamEncoder",
    "GeminiStreamParser",
    "Piece",
    "TextPiece",
    "gemini_sse",
    "gemini_usage",
    "usage_metadata",
]
