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

The proxy (``streambus proxy``) also needs the way *in*: a format that
implements :class:`AnswerParsing` gives it a sans-I/O :class:`PieceParser`
per request, which turns the provider's answer bytes into the provider-neutral
pieces below (:class:`TextPiece`, :class:`EndPiece`, :class:`ErrorPiece`).
The proxy publishes pieces and nothing else, so a provider plugin installed
later is proxied without editing the proxy (``docs/writing-plugins.md``).
A provider answering with server-sent events of JSON writes its parser on
:class:`SseAnswerParser` (one ``handle`` per event, :func:`decode_event` for
the JSON); the producer publishes the same pieces with
:func:`streambus.producing.publish_pieces`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, runtime_checkable

import msgspec
import structlog

from .errors import WireError
from .events import Channel, DeltaEvent, Event, Usage
from .plugins import discover, load
from .validation import validation_problem
from .wire import RawSseEvent, SseEvent, SseParser, ToolCallFragment, parse_tool_text, yield_then_raise

__all__ = [
    "AnswerFilter",
    "AnswerParsing",
    "Credentials",
    "EndPiece",
    "ErrorPiece",
    "LoadedModels",
    "ModelDetails",
    "ModelsRoute",
    "Piece",
    "PieceParser",
    "SseAnswerParser",
    "StreamEncoder",
    "TextPiece",
    "WireFormat",
    "decode_data",
    "decode_event",
    "installed_formats",
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
class Credentials(Protocol):
    """Optional for a :class:`WireFormat`: where its clients put their key, beyond ``Authorization``.

    The proxy forwards these values upstream and keeps them out of every
    event, recording and log line (an upstream may echo a key back).
    """

    credential_headers: tuple[str, ...]
    """Request headers holding a key, e.g. ``("x-api-key",)`` (Anthropic), ``("x-goog-api-key",)`` (Gemini)."""
    credential_params: tuple[str, ...]
    """Query parameters holding a key, e.g. ``("key",)`` (Gemini); ``()`` for none."""


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


class TextPiece(msgspec.Struct, frozen=True, gc=False):  # (str and int fields: no cycles to collect)
    """Generated text: becomes a ``delta`` event on *channel* (``content``, ``reasoning``, ``tool``).

    *choice* numbers the answer when one request asks for several (OpenAI's
    ``n``); the proxy publishes choice 0. Tool text is one
    :func:`~streambus.wire.tool_text` line per fragment (``docs/wire.md``).
    """

    text: str
    channel: Channel = "content"
    choice: int = 0


class EndPiece(msgspec.Struct, frozen=True, kw_only=True):
    """The answer ended normally: becomes the ``end`` event.

    A parser emits it once, when it has everything the end carries: for
    OpenAI that is ``data: [DONE]``, after the finish reason and the usage chunk.
    """

    reason: str = "stop"
    """Why choice 0 ended (``stop``, ``length``, ``tool_calls``...)."""
    usage: Usage | None = None
    """The provider's token counts, when it sent them."""
    timings: dict[str, float] = {}
    """Provider timings in seconds (Ollama's ``eval_duration``...)."""


class ErrorPiece(msgspec.Struct, frozen=True, kw_only=True):
    """The provider reported an error inside its answer (an ``{"error": ...}`` object).

    Turn it into the stream's failure with
    :func:`streambus.producing.stream_error_failure`, as the producers do.
    """

    message: str
    code: str | None = None
    """The provider's error code or type (OpenAI's ``error.code``, Anthropic's ``error.type``,
    Gemini's ``error.status``), when it sent one."""
    retryable: bool = False
    """Whether the provider says the same request may succeed later (Anthropic's
    ``overloaded_error``, Gemini's ``UNAVAILABLE``)."""


Piece: TypeAlias = TextPiece | EndPiece | ErrorPiece
"""What a :class:`PieceParser` returns: provider-neutral, one of three kinds."""


class PieceParser(Protocol):
    """A sans-I/O parser of one answer: the provider's bytes in, :data:`Piece` values out.

    ::

        parser = fmt.stream_parser("chat", request)
        for data in reads:
            for piece in parser.feed(data):
                ...  # publish it
        for piece in parser.close():
            ...
        if not parser.done:
            ...  # the answer ended before its final marker: truncated

    Iterate what :meth:`feed` returns before feeding again. Bad input raises
    :class:`~streambus.errors.WireError` (naming the problem and the byte
    offset) *while iterating*, after every piece before it, so nothing good is
    lost. A parser never touches a socket.
    """

    @property
    def done(self) -> bool:
        """Whether the answer's final marker arrived (the :class:`EndPiece` was returned)."""

    def feed(self, data: bytes) -> Iterable[Piece]:
        """Add *data*; return the pieces it completed (possibly none)."""

    def close(self) -> Iterable[Piece]:
        """End of input: the pieces of a last unterminated unit (:class:`WireError` if it is cut short)."""


_P = TypeVar("_P")
_T = TypeVar("_T")
_D = TypeVar("_D", str, bytes)


def decode_event(decode: Callable[[str], _T], event: SseEvent, what: str) -> _T:
    """Decode the JSON *event* data with a msgspec *decode* function (typed: it validates as it decodes).

    Raises :class:`~streambus.errors.WireError` at the event's byte offset:
    ``not {what}: ...`` naming the field that is wrong, or ``event data is not JSON``.
    """
    return decode_data(decode, event.data, event.offset, what)


def decode_data(decode: Callable[[_D], _T], data: _D, offset: int, what: str) -> _T:
    """:func:`decode_event` for an event's *data* (``bytes`` from :meth:`SseAnswerParser.handle_data`) at *offset*.

    Decoding the bytes saves making a ``str`` that msgspec would turn back
    into UTF-8. The usual way is to call
    *decode* directly and, only when it raises, this function for the error::

        try:
            parsed = decode(data)
        except msgspec.MsgspecError:
            parsed = decode_data(decode, data, offset, "an X event")
    """
    try:
        return decode(data)
    except msgspec.ValidationError as exc:
        raise WireError(f"not {what}: {validation_problem(exc).describe()}", offset=offset) from None
    except msgspec.DecodeError as exc:
        raise WireError(f"event data is not JSON: {exc}", offset=offset) from None


class SseAnswerParser(ABC, Generic[_P]):
    """The shared half of a parser of an answer sent as server-sent events (Anthropic, Gemini, Responses).

    A subclass implements :meth:`handle` for one event and sets :attr:`done`
    when the answer's end arrived (or overrides :meth:`handle_data`, which
    gets the event's data as ``bytes`` without an :class:`SseEvent` built,
    the faster way for a msgspec decoder); this class runs the core
    :class:`~streambus.wire.SseParser` and keeps the :class:`PieceParser`
    promise: :meth:`feed` returns the pieces of the events a read completed,
    and a :class:`~streambus.errors.WireError` is raised while iterating,
    after every piece before it. Events after the end are ignored.
    """

    __slots__ = ("_raw", "done", "sse")

    def __init__(self) -> None:
        self.sse = SseParser()
        """The event-stream parser the bytes go through."""
        self.done = False
        """Whether the answer's end (or an error that ends it) arrived."""
        self._raw = type(self).handle_data is not SseAnswerParser.handle_data

    @abstractmethod
    def handle(self, sse: SseEvent, out: list[_P]) -> None:
        """Append the pieces of the event *sse* to *out*; raise :class:`~streambus.errors.WireError` when it is bad."""

    def handle_data(self, event: bytes, data: bytes, offset: int, out: list[_P]) -> None:
        """Like :meth:`handle`, for an event given as its type and data (valid UTF-8 bytes) and its offset.

        Override it instead of :meth:`handle` (which then only needs to call
        it) to decode the data from ``bytes``; this class then reads the
        stream with :meth:`~streambus.wire.SseParser.feed_raw`. The default
        builds the :class:`SseEvent` and calls :meth:`handle`.
        """
        self.handle(SseEvent(data=data.decode(), event=event.decode(), offset=offset), out)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[_P]:
        """Add *data*; return an iterator over the pieces it completed."""
        if not self._raw:
            return self._pieces(self.sse.feed(data))
        out: list[_P] = []
        handle = self.handle_data
        try:
            for event, value, offset in self.sse.feed_raw(data):
                if not self.done:
                    handle(event, value, offset, out)
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)

    def close(self) -> Iterator[_P]:
        """End of input: the pieces of a last event that had no blank line after it."""
        if self._raw:
            return self._data_pieces((e.event.encode(), e.data.encode(), e.offset) for e in self.sse.close())
        return self._pieces(self.sse.close())

    def _pieces(self, events: Iterator[SseEvent]) -> Iterator[_P]:
        out: list[_P] = []
        try:
            for sse in events:
                if not self.done:
                    self.handle(sse, out)
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)

    def _data_pieces(self, events: Iterator[RawSseEvent]) -> Iterator[_P]:
        out: list[_P] = []
        handle = self.handle_data
        try:
            for event, data, offset in events:
                if not self.done:
                    handle(event, data, offset, out)
        except WireError as exc:
            return yield_then_raise(out, exc)
        return iter(out)


class AnswerFilter(Protocol):
    """Takes out of the answer bytes what the proxy added by asking for more (see :meth:`AnswerParsing.usage_request`).

    Sans-I/O, like a parser: :meth:`feed` returns the bytes the client gets
    for *data* now (it may hold back an incomplete unit), :meth:`close` the rest.
    """

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for the upstream's *data*."""

    def close(self) -> bytes:
        """What is still held back, at the end of the answer."""


@runtime_checkable
class AnswerParsing(Protocol):
    """Optional for a :class:`WireFormat`, needed by the proxy: read the provider's answers.

    Every path in the format's ``routes`` is then proxied: the request is
    forwarded, the answer goes back to the client byte for byte, and a copy is
    parsed into pieces and published on the bus.
    """

    def stream_parser(self, route: str, request: Mapping[str, Any]) -> PieceParser:
        """A new parser for the streamed answer to *request* on *route* (a route kind, as in ``routes``)."""

    def body_pieces(self, route: str, request: Mapping[str, Any], body: bytes) -> list[Piece]:
        """The pieces of a whole (``stream: false``) answer *body*, ending with an :class:`EndPiece`.

        Raises :class:`~streambus.errors.WireError` naming what is wrong when
        *body* is not such an answer.
        """

    def usage_request(self, route: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], AnswerFilter] | None:
        """Ask the provider for token usage the client did not ask for, or ``None`` (nothing to ask).

        Returns the request body to send instead of *request*, and a filter
        that removes from the streamed answer what the client did not ask
        for, so the client gets exactly the bytes it would have got. The
        parser still sees the unfiltered answer, so the bus gets the usage.
        """


def installed_formats() -> dict[str, WireFormat]:
    """Every wire format registered in ``streambus.formats`` that imports, by name.

    A plugin that fails to import is left out (``streambus plugins`` shows
    why); load one by name with :func:`load_format` to get the error.
    """
    return {info.name: load_format(info.name) for info in discover("formats") if info.ok}


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
