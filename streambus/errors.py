"""The one exception tree of streambus.

Every error the library raises on purpose derives from :class:`StreamBusError`,
so ``except StreamBusError`` catches them all::

    StreamBusError
    ├── DecodeError            bytes that are not a valid event (names the field)
    ├── WireError              a sans-I/O parser met bad bytes (carries the offset)
    ├── ConfigError            a pipeline file is wrong (names file, table and key)
    ├── PipelineFailed         a configured plugin failed while the pipeline ran
    ├── StreamsFailed          streams of a pipeline run ended in ``error`` (``streambus run`` exits 1)
    ├── PluginError            a plugin is unknown or failed to import
    │   └── PluginNotFound     ... no plugin of that name is installed (``kind``, ``name``)
    ├── UnknownOption          a plugin was given a keyword option it does not have (``plugin``, ``key``);
    │                          also a ``TypeError`` and a ``ValueError``, as Python and the option rule expect
    ├── RecordingError         a recording file is damaged (names the line)
    ├── BusClosed              publishing to, or subscribing on, a closed bus
    ├── StreamClosed           writing to a stream that already ended
    ├── SubscriptionClosed     a subscription was closed by the bus
    │   └── Overflowed         ... because its reader fell too far behind
    ├── SinkFailed             a sink marked critical raised, so the bus stopped
    ├── StopFailed             a stop route could not reach the stream's owner
    ├── AsyncioRequired        a part built on an asyncio-only library (aiohttp, redis-py, nats-py) ran
    │   │                      under trio or outside a loop (also a ``RuntimeError``)
    │   └── WrongEventLoop     ... streambus_langchain: LangChain's async API outside asyncio
    ├── TokenError             streambus.tokens: a credential was refused (missing, forged, expired...)
    ├── OutOfScope             streambus.tokens: a valid scoped token asked for streams it does not cover
    │
    │   defined beside what raises them, in the core:
    ├── StreamFailed           streambus.subscription: ``Subscription.text()`` met ``error``/``abort`` (``event``)
    ├── RecorderError          streambus.builtins.recorder: a recording file could not be written (``path``, ``errno``)
    ├── SecretInRecording      streambus.cassette: a recording holds what looks like a key (``path``, ``hits``)
    │
    │   raised by plugins, defined in their packages:
    ├── ProxyError             streambus_proxy: a bad proxy setting (upstream URL, tags header, formats)
    ├── ModerationAPIError     streambus_moderation: the moderation endpoint answered an error (``status``)
    ├── HttpStreamError        streambus_http: a request cannot be served (``status``)
    │   └── ResumeError        ... its ``Last-Event-ID`` is malformed (400) or evicted (409)
    ├── BroadcasterError       streambus_websocket: the broadcaster cannot start (port, token)
    ├── ProtocolError          streambus_websocket: an inbound frame was refused (``code``, ``field``)
    ├── TailError              streambus_websocket: ``streambus tail`` cannot go on (also a ``click.ClickException``)
    ├── RedisGap               streambus_redis: entries were lost before a consumer read them
    ├── NatsAuthFailed         streambus_nats: the NATS server refused this process's credentials
    ├── NatsGap                streambus_nats: messages were lost before a consumer read them
    ├── NatsHeaderParserUnsupported  streambus_nats: nats-py would hand header values over as lists (fast-parse)
    ├── StreamAborted          streambus_langchain: the run's stream was aborted on the bus (``stream``, ``by``)
    ├── RecordedStreamError    streambus_langchain: a recorded stream ended in ``error`` (``kind``)
    └── DemoError              streambus_demo: the demo cannot start (a port in use, a server silent)

A test (``tests/test_errors_tree.py``) checks that every exception class in
the core and the plugins derives from :class:`StreamBusError` and is drawn here.

Each error carries the offending piece of input as attributes, so callers can
react without parsing the message: branch on the type and attributes, never
on the text.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import sniffio

if TYPE_CHECKING:
    from .events import ErrorEvent

__all__ = [
    "AsyncioRequired",
    "BusClosed",
    "ConfigError",
    "DecodeError",
    "Overflowed",
    "PipelineFailed",
    "PluginError",
    "PluginNotFound",
    "RecordingError",
    "SinkFailed",
    "StopFailed",
    "StreamBusError",
    "StreamClosed",
    "StreamsFailed",
    "SubscriptionClosed",
    "UnknownOption",
    "WireError",
]


class StreamBusError(Exception):
    """Base class of every error streambus raises on purpose."""


class DecodeError(StreamBusError):
    """Bytes could not be decoded into an event.

    ``field`` names the offending field (``"$.text"`` style path) when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class WireError(StreamBusError):
    """A sans-I/O parser met input it cannot accept.

    ``offset`` is the byte offset, from the start of everything fed to the
    parser, where the bad input begins. ``partial`` is the text a decoding
    parser (:class:`streambus.wire.Utf8Decoder`) accepted in the same call
    before the bad input, so the caller loses nothing.
    """

    def __init__(self, message: str, *, offset: int, partial: str = "") -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset
        self.partial = partial
        """Text a decoding parser accepted in the same call before the bad input (else ``""``)."""


class ConfigError(StreamBusError):
    """A pipeline configuration is invalid.

    The message reads ``file: table[index].key: problem``; the pieces are kept
    in ``path`` (file), ``location`` (``sinks[1].port``) and ``problem``.
    """

    def __init__(self, problem: str, *, path: str | None = None, location: str | None = None) -> None:
        parts = [p for p in (path, location) if p]
        super().__init__(": ".join([*parts, problem]))
        self.path = path
        self.location = location
        self.problem = problem


class PipelineFailed(StreamBusError):
    """A producer or sink of a configured pipeline failed while it ran.

    The message reads ``file: table[index] (type): problem``; ``location``
    names the table (``sinks[1]``). The plugin's exception is the ``__cause__``.
    """

    def __init__(self, problem: str, *, path: str, location: str) -> None:
        super().__init__(f"{path}: {location}: {problem}")
        self.path = path
        self.location = location
        self.problem = problem


class PluginError(StreamBusError):
    """A plugin is not installed, unknown, or failed to import.

    ``hint`` is the command that fixes it, when one is known.
    """

    def __init__(self, message: str, *, name: str, hint: str | None = None) -> None:
        super().__init__(f"{message}. {hint}" if hint else message)
        self.name = name
        self.hint = hint


class PluginNotFound(PluginError):
    """No plugin named ``name`` is installed in group ``kind`` (``producers``, ``commands``...).

    The message lists the installed ones; install the missing distribution,
    or fix the name.
    """

    def __init__(self, message: str, *, kind: str, name: str, hint: str | None = None) -> None:
        super().__init__(message, name=name, hint=hint)
        self.kind = kind


class UnknownOption(StreamBusError, TypeError, ValueError):
    """A plugin was built with a keyword option its ``Options`` does not have.

    ``plugin`` names the class, ``key`` the option, ``known`` every option it
    has. It is a ``TypeError`` (what Python raises for an unexpected keyword
    argument) and a ``ValueError`` (what every other invalid option raises),
    so either ``except`` catches it.
    """

    def __init__(self, *, plugin: str, key: str, known: list[str]) -> None:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        super().__init__(f"{plugin}: unknown field `{key}`; {hint}its options are {', '.join(known)}")
        self.plugin = plugin
        self.key = key
        self.known = known


class RecordingError(StreamBusError):
    """A recording file is damaged or of an unsupported version.

    ``line`` is the 1-based line number of the offending line, or 0 when the
    fault is the file's, not a line's (missing, unreadable): the message then
    names the file alone (``path: message``), never a ``path:0`` position.
    """

    def __init__(self, message: str, *, path: str, line: int) -> None:
        super().__init__(f"{path}:{line}: {message}" if line > 0 else f"{path}: {message}")
        self.path = path
        self.line = line


class StreamsFailed(StreamBusError):
    """Streams of a pipeline run ended with an ``error`` event, so ``streambus run`` fails.

    ``count`` is how many streams failed; ``first`` is the first such
    ``error`` event (its ``stream``, ``kind`` and ``message`` say what went
    wrong). ``[run] fail_on_stream_error = false`` turns this off.
    """

    def __init__(self, path: str, count: int, first: ErrorEvent) -> None:
        detail = f"{first.kind}: {first.message}" if first.message else first.kind
        super().__init__(
            f"{path}: {count} stream(s) ended in error (first: stream {first.stream}: {detail}); "
            "set [run] fail_on_stream_error = false to exit 0 anyway"
        )
        self.path = path
        self.count = count
        self.first = first


class BusClosed(StreamBusError):
    """The bus is not running: enter ``async with Bus()`` first."""


class StreamClosed(StreamBusError):
    """The stream already had its terminal event; nothing more can be written."""


class SubscriptionClosed(StreamBusError):
    """The bus closed this subscription; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Overflowed(SubscriptionClosed):
    """The subscriber fell behind past what its overflow policy allows.

    Everything delivered before this error was complete and in order; the
    subscriber should reconnect (and recover, where the transport supports it).
    """


class SinkFailed(StreamBusError):
    """A sink marked ``critical`` raised, so the bus was stopped.

    The sink's exception is the ``__cause__``.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"critical sink {name!r} failed")
        self.name = name


class AsyncioRequired(StreamBusError, RuntimeError):
    """A part built on an asyncio-only library ran under trio, or outside any event loop.

    aiohttp, redis-py and nats-py run on asyncio only; the parts of streambus
    built on them call :meth:`check` before they start, so a trio user gets
    this, naming the part, the library and what to do, instead of a traceback
    from deep inside the library. ``what`` is the part and ``library`` the
    async library found (``"trio"``, or ``"no event loop"``).
    """

    DEFAULT_HINT = (
        'run the bus under asyncio: anyio.run(main, backend="asyncio"), asyncio.run(main()), or the streambus CLI'
    )
    """What the message tells the user to do when the caller names nothing better."""

    def __init__(self, message: str, *, what: str = "", library: str = "") -> None:
        super().__init__(message)
        self.what = what
        self.library = library

    @classmethod
    def check(cls, what: str, *, needs: str, hint: str | None = None) -> None:
        """Raise this error unless the running async library is asyncio.

        *what* names the part (``"RedisSink"``), *needs* the library that binds
        it to asyncio (``"redis-py"``), *hint* what to do instead (default
        :attr:`DEFAULT_HINT`).
        """
        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = "no event loop"
        if library != "asyncio":
            hint = hint or cls.DEFAULT_HINT
            raise cls(
                f"{what} needs asyncio ({needs} runs only on asyncio) but runs under {library}; {hint}",
                what=what,
                library=library,
            )


class StopFailed(StreamBusError):
    """A stop route could not carry a stop request (its engine is unreachable).

    Raised by :meth:`Bus.stop <streambus.Bus.stop>`; the edges answer it with
    503 (HTTP) or the ``stop_failed`` error (WebSocket). Retrying later may
    help. The message names the route, never a credential.
    """
