"""streambus-ollama: Ollama streams into the bus, and bus events back into Ollama's format.

- :class:`OllamaProducer` (entry point ``ollama`` in ``streambus.producers``)
  streams ``/api/chat`` or ``/api/generate`` answers into bus events;
- :class:`OllamaFormat` (entry point ``ollama`` in ``streambus.formats``)
  encodes events back into byte-exact Ollama NDJSON for the mock server and
  the proxy;
- :class:`OllamaStreamParser` is the sans-I/O parser both use;
  :class:`OllamaPieceParser` is the same in :mod:`streambus.formats` pieces,
  what the proxy reads.

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
    OllamaPieceParser,
    OllamaRoute,
    OllamaStreamParser,
    Piece,
    TextPiece,
    body_pieces,
    chunk_pieces,
    neutral_piece,
)

__all__ = [
    "TIMING_KEYS",
    "DonePiece",
    "ErrorPiece",
    "Failure",
    "OllamaFormat",
    "OllamaPieceParser",
    "OllamaProducer",
    "OllamaRequest",
    "OllamaRoute",
    "OllamaStreamEncoder",
    "OllamaStreamParser",
    "Piece",
    "TextPiece",
    "body_pieces",
    "chunk_pieces",
    "created_at",
    "neutral_piece",
    "require_asyncio",
]
