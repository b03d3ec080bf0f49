"""streambus-ollama: Ollama streams into the bus, and bus events back into Ollama's format.

- :class:`OllamaProducer` (entry point ``ollama`` in ``streambus.producers``)
  streams ``/api/chat`` or ``/api/generate`` answers into bus events;
- :class:`OllamaFormat` (entry point ``ollama`` in ``streambus.formats``)
  encodes events back into byte-exact Ollama NDJSON for the mock server and
  the proxy;
- :class:`OllamaStreamParser` is the sans-I/O parser both use.

The producer runs on asyncio only (it uses aiohttp); the parser and the
format are plain functions of bytes and events and run anywhere.
"""

from __future__ import annotations

from ._format import OllamaFormat, OllamaStreamEncoder, created_at
from ._producer import Failure, OllamaProducer, OllamaRequest, require_asyncio
from ._protocol import (
    TIMING_KEYS,
    DonePiece,
    ErrorPiece,
    OllamaRoute,
    OllamaStreamParser,
    Piece,
    TextPiece,
    chunk_pieces,
)

__all__ = [
    "TIMING_KEYS",
    "DonePiece",
    "ErrorPiece",
    "Failure",
    "OllamaFormat",
    "OllamaProducer",
    "OllamaRequest",
    "OllamaRoute",
    "OllamaStreamEncoder",
    "OllamaStreamParser",
    "Piece",
    "TextPiece",
    "chunk_pieces",
    "created_at",
    "require_asyncio",
]
