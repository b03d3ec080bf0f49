"""streambus-http: serve bus streams where users already are.

HTTP streaming outputs for one stream or a filter over many, as small ASGI
(FastAPI / Starlette) and aiohttp building blocks, plus the standalone
``http`` sink:

- ``sse``: server-sent wire events with ``id: <stream>:<seq>``; a browser
  ``EventSource`` resumes after ``Last-Event-ID`` without gap or duplicate;
- ``text``: plain text chunks; ``ndjson``: one wire event per line;
- ``ui``: the Vercel AI SDK UI message stream (``useChat``);
- ``openai``: ``chat.completion.chunk`` SSE that any OpenAI client reads.

Every response reads from a :class:`StreamHub` (one bus subscription with a
bounded history). :class:`BackgroundBus` runs a bus in a thread for
Streamlit's ``st.write_stream`` and Gradio's ``ChatInterface``.
The ASGI blocks live in :mod:`streambus_http.asgi`, the aiohttp ones in
:mod:`streambus_http.aio`.
"""

from __future__ import annotations

from ._background import BackgroundBus
from ._errors import HttpStreamError, ResumeError
from ._formats import (
    FORMATS,
    Encoder,
    FormatName,
    NDJSONEncoder,
    OpenAIChunkEncoder,
    SSEEncoder,
    TextEncoder,
    UIMessageStreamEncoder,
    make_encoder,
)
from ._hub import Cursor, StreamHub, parse_event_id
from ._serve import Opened, body, open_stream
from .sink import HttpSink

__all__ = [
    "FORMATS",
    "BackgroundBus",
    "Cursor",
    "Encoder",
    "FormatName",
    "HttpSink",
    "HttpStreamError",
    "NDJSONEncoder",
    "OpenAIChunkEncoder",
    "Opened",
    "ResumeError",
    "SSEEncoder",
    "StreamHub",
    "TextEncoder",
    "UIMessageStreamEncoder",
    "body",
    "make_encoder",
    "open_stream",
    "parse_event_id",
]
