"""streambus-openai: OpenAI-compatible streams into the bus, and bus events back into that format.

- :class:`OpenAIProducer` (entry point ``openai`` in ``streambus.producers``)
  streams ``/chat/completions`` (or the legacy ``/completions``) from any
  OpenAI-compatible server into bus events, one stream per choice;
- :class:`OpenAIFormat` (entry point ``openai`` in ``streambus.formats``)
  encodes events back into OpenAI SSE chunks for the mock server and proxy;
- :class:`OpenAIStreamParser` is the sans-I/O parser both use;
  :class:`OpenAIPieceParser` is the same in :mod:`streambus.formats` pieces,
  what the proxy reads, and :class:`UsageFilter` takes the usage the proxy
  asked for back out of the client's bytes; the Responses API
  (``/responses``, ``endpoint = "responses"``) has
  :class:`ResponsesStreamParser` and :class:`ResponsesStreamEncoder`.

The producer runs on asyncio only (it uses aiohttp); the parser and the
format are plain functions of bytes and events and run anywhere.
"""

from __future__ import annotations

from ._format import DONE, OpenAIFormat, OpenAIStreamEncoder, sse_chunk
from ._producer import Failure, OpenAIProducer, OpenAIRequest, require_asyncio
from ._protocol import (
    DonePiece,
    ErrorPiece,
    FinishPiece,
    OpenAIPieceParser,
    OpenAIRoute,
    OpenAIStreamParser,
    Piece,
    TextPiece,
    UsageFilter,
    UsagePiece,
    body_pieces,
    chunk_pieces,
    error_piece,
)
from ._responses import ResponsesStreamEncoder, ResponsesStreamParser, responses_usage

__all__ = [
    "DONE",
    "DonePiece",
    "ErrorPiece",
    "Failure",
    "FinishPiece",
    "OpenAIFormat",
    "OpenAIPieceParser",
    "OpenAIProducer",
    "OpenAIRequest",
    "OpenAIRoute",
    "OpenAIStreamEncoder",
    "OpenAIStreamParser",
    "Piece",
    "ResponsesStreamEncoder",
    "ResponsesStreamParser",
    "TextPiece",
    "UsageFilter",
    "UsagePiece",
    "body_pieces",
    "chunk_pieces",
    "error_piece",
    "require_asyncio",
    "responses_usage",
    "sse_chunk",
]
