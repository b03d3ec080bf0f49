"""Provider wire formats, both ways, found by entry point.

Each provider plugin (``ollama``, ``openai``, ...) knows its HTTP format in
both directions: its producer *parses* the provider's stream into events, and
its :class:`WireFormat` *encodes* events back into the provider's bytes. The
mock model server (``streambus serve-mock``) and the proxy use the encoders,
so the core never imports a plugin: formats are registered in the
``streambus.formats`` entry point group, the value being a :class:`WireFormat`
instance (or a zero-argument class).

Routes are the HTTP paths a format answers, e.g. ``/api/chat`` for Ollama or
``/v1/chat/completions`` for OpenAI. A request body is the parsed JSON the
client sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import structlog

from .errors import WireError
from .events import DeltaEvent, Event
from .plugins import load
from .wire import ToolCallFragment, parse_tool_text

__all__ = [
    "LoadedModels",
    "ModelDetails",
    "ModelsRoute",
    "StreamEncoder",
    "WireFormat",
    "load_format",
    "tool_fragments",
]

log = structlog.get_logger("streambus.formats")

# Streams already warned about, newest last; bounded so a long-running server forgets old ones.
_warned: OrderedDict[str, None] = OrderedDict()
_WARNED_MAX = 1024


def tool_fragments(event: DeltaEvent) -> list[ToolCallFragment]:
    """The tool-call fragments a ``tool`` delta carries (``docs/wire.md``: one JSON line each).

    Encoders call this instead of :func:`~streambus.wire.parse_tool_text` so
    that text which is not in that format is never dropped in silence: each
    bad line is skipped, the good lines around it are kept, and the first bad
    line of a stream logs one warning (``formats.tool_text_unparsed``) naming
    the stream id and the position.
    """
    fragments: list[ToolCallFragment] = []
    offset = 0
    for line in event.text.split("\n"):
        try:
            fragments.extend(parse_tool_text(line))
        except WireError:
            if event.stream not in _warned:
                _warned[event.stream] = None
                if len(_warned) > _WARNED_MAX:
                    _warned.popitem(last=False)
                log.warning(
                    "formats.tool_text_unparsed",
                    stream=event.stream,
                    seq=event.seq,
                    offset=offset,
                    hint="tool deltas carry one JSON fragment per line (docs/wire.md); this text is not shown",
                )
        offset += len(line) + 1
    return fragments


@runtime_checkable
class StreamEncoder(Protocol):
    """Turns one stream's events into the provider's streamed response body."""

    content_type: str
    """The response ``Content-Type`` (``application/x-ndjson``, ``text/event-stream``)."""

    def encode(self, event: Event) -> bytes:
        """Bytes to send for *event*; ``b""`` when the format has nothing for it."""

    def close(self) -> bytes:
        """Trailing bytes after the last event (e.g. ``data: [DONE]``), possibly ``b""``."""


@runtime_checkable
class WireFormat(Protocol):
    """A provider's HTTP format: which routes it serves and how to encode them."""

    name: str
    """The entry point name (``ollama``, ``openai``)."""

    routes: Mapping[str, str]
    """HTTP path -> route kind, e.g. ``{"/api/chat": "chat", "/api/generate": "generate"}``."""

    def stream_encoder(self, route: str, request: Mapping[str, Any]) -> StreamEncoder:
        """Return an encoder for a streamed answer to *request* on *route*."""

    def assemble(self, route: str, request: Mapping[str, Any], events: Sequence[Event]) -> dict[str, Any]:
        """Return the whole (non-streamed, ``stream: false``) response body for *events*."""

    def is_streaming(self, route: str, request: Mapping[str, Any]) -> bool:
        """Whether *request* asks for a streamed answer (the provider's default applies)."""

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The provider's JSON error body for *status* (e.g. unknown model -> 404)."""

    def models_body(self, models: Sequence[str]) -> dict[str, Any]:
        """The body of the provider's model list (``/api/tags``, ``/v1/models``)."""


@runtime_checkable
class ModelDetails(Protocol):
    """Optional for a :class:`WireFormat`: describe one model, as clients ask before they chat.

    The mock model server serves it where the provider does: Ollama's
    ``POST /api/show``, OpenAI's ``GET /v1/models/{id}``.
    """

    def model_body(self, model: str, channels: Collection[str]) -> dict[str, Any]:
        """The body describing *model*; *channels* are the delta channels its recordings use
        (``content``, ``reasoning``, ``tool``), i.e. what the model can do."""


@runtime_checkable
class LoadedModels(Protocol):
    """Optional for a :class:`WireFormat`: list the models loaded now (Ollama's ``GET /api/ps``)."""

    def loaded_body(self, models: Mapping[str, float]) -> dict[str, Any]:
        """The body listing *models*: name -> UNIX time at which the model would be unloaded."""


@runtime_checkable
class ModelsRoute(Protocol):
    """Optional for a :class:`WireFormat`: where its clients list models, for the mock server.

    The mock serves ``GET`` on each of ``models_paths`` with
    :meth:`WireFormat.models_body` and, when the format is also
    :class:`ModelDetails`, ``GET {path}/{model}``. Formats may share a path
    (OpenAI's, Anthropic's and Gemini's ``/v1/models``): :meth:`claims` tells
    which clients are its own.
    """

    models_paths: tuple[str, ...]
    """E.g. ``("/v1/models",)`` (Anthropic), ``("/v1beta/models", "/v1/models")`` (Gemini)."""

    def claims(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with *headers* comes from this format's clients."""


def load_format(name: str) -> WireFormat:
    """Load the wire format registered as *name* in ``streambus.formats``.

    Raises :class:`~streambus.errors.PluginError` with the install hint when
    the providing plugin is missing.
    """
    target = load("formats", name)
    fmt = target() if isinstance(target, type) else target
    if not isinstance(fmt, WireFormat):
        raise TypeError(f"streambus.formats entry {name!r} is not a WireFormat: {fmt!r}")
    return fmt
