"""Test helpers, and the streambus pytest plugin (registered through ``pytest11``).

Installing streambus makes these fixtures available in every test suite:

``mock_model_server``
    A factory: ``server = mock_model_server("rec.jsonl", speed=...)`` serves the
    recording as an Ollama and OpenAI-compatible server on a free loopback port
    (in a background thread, so sync tests, asyncio and trio all work) and
    returns the running :class:`~streambus.mockserver.MockServer`; use
    ``server.url`` (Ollama clients) or ``server.url + "/v1"`` (OpenAI clients).
    Stopped at the end of the test. Needs ``pip install 'streambus[testing]'``.
``replay_recording``
    ``await replay_recording(bus, "rec.jsonl", **options)`` replays a recording
    into a running bus (as fast as possible unless you pass ``speed`` or
    ``burst=False``), waits until the bus's sinks took in every event, and
    returns the :class:`~streambus.replay.ReplayProducer`;
    ``wait=False`` starts it in the background instead of waiting for it.
``event_capture``
    A factory: ``capture = event_capture(bus)`` records every event the bus
    publishes (lossless) into an :class:`EventCapture` with helpers such as
    ``capture.text(stream)`` and ``capture.assert_text("Hello", stream)``.
``streambus_bus``
    A running :class:`~streambus.Bus` for the test (async tests, anyio plugin).
``streambus_recording``
    Record once, replay forever: an :class:`LLMRecording` whose ``url`` (and
    ready ``openai()``, ``ollama()``, ``anthropic()``, ``gemini()`` clients)
    reach the real upstream through the proxy the first time, and the
    test's recording afterwards (:class:`~streambus.cassette.Cassette`).
    ``--streambus-record-mode=none|once|new_episodes|all`` (or the
    ``streambus_record_mode`` ini key, default ``none``) and
    ``@pytest.mark.streambus_recording(record_mode=..., path=..., match=...,
    speed=..., scrub_fields=[...])`` choose how; ``--streambus-upstream``
    (or ``STREAMBUS_UPSTREAM``, or overriding the ``streambus_upstream``
    fixture) names the real server. Recordings live in ``recordings/<module>/<test>.jsonl``
    next to the test module. See ``docs/testing.md``.

Everything here is also importable outside fixtures (pytest must be installed)
(``from streambus.testing import EventCapture``), as structlog ships
``structlog.testing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import orjson
import pytest

from .bus import Bus
from .events import DeltaEvent, EndEvent, Event, StartEvent, is_terminal
from .replay import ReplayProducer
from .subscription import Filter, Subscription

if TYPE_CHECKING:
    from .cassette import Cassette, RecordMode
    from .mockserver import MockServer

__all__ = [
    "EventCapture",
    "LLMRecording",
    "Reply",
    "ScriptedUpstream",
    "event_capture",
    "mock_model_server",
    "pytest_addoption",
    "pytest_configure",
    "recording_path",
    "replay_recording",
    "scripted_upstream",
    "streambus_bus",
    "streambus_recording",
    "streambus_upstream",
]


class EventCapture:
    """A sink that keeps every event it sees, with assertion helpers.

    Attach it with :meth:`attach` (``block`` policy, so it loses nothing)
    *before* the streams you want start. ``raw=True`` sees events before any
    interposed stage such as moderation.
    """

    overflow: ClassVar[str] = "block"

    def __init__(self, *, raw: bool = False, filter: Filter | None = None) -> None:
        self.raw = raw
        self.filter = filter
        self.events: list[Event] = []
        """Every captured event, in delivery order."""
        self._changed: anyio.Event | None = None
        self._done = False

    def attach(self, bus: Bus, *, name: str = "capture") -> EventCapture:
        """Subscribe to *bus* as a sink; return self."""
        bus.add_sink(self, name=name, filter=self.filter, raw=self.raw)
        return self

    async def run(self, events: Subscription) -> None:
        """Sink entry point: collect events until the subscription ends."""
        try:
            while batch := await events.receive_batch():
                self.events.extend(batch)
                self._notify()
        finally:
            self._done = True
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- waiting -------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[EventCapture], bool]) -> None:
        """Wait until ``predicate(self)`` holds; wrap in ``anyio.fail_after`` to bound it.

        Raises ``AssertionError`` if the capture ends (its bus stopped) first.
        """
        while not predicate(self):
            if self._done:
                raise AssertionError(f"the capture ended before the condition held ({len(self.events)} events)")
            changed = self._changed = self._changed or anyio.Event()
            await changed.wait()

    async def wait_streams(self, count: int = 1) -> None:
        """Wait until *count* streams have ended (any terminal event)."""
        await self.wait_for(lambda c: len(c.ended) >= count)

    # -- inspecting --------------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        """Ids of the captured streams in order of first appearance."""
        return list(dict.fromkeys(e.stream for e in self.events))

    @property
    def ended(self) -> list[str]:
        """Ids of the streams whose terminal event was captured."""
        return [e.stream for e in self.events if is_terminal(e)]

    def _resolve(self, stream: str | None) -> str:
        streams = self.streams
        if stream is None:
            if len(streams) != 1:
                raise AssertionError(f"pass stream=...: the capture holds {len(streams)} streams {streams}")
            return streams[0]
        if stream not in streams:
            raise AssertionError(f"no captured events for stream {stream!r} (captured: {streams})")
        return stream

    def of(self, stream: str | None = None) -> list[Event]:
        """The events of one stream (the only one when *stream* is None)."""
        sid = self._resolve(stream)
        return [e for e in self.events if e.stream == sid]

    def text(self, stream: str | None = None, channel: str = "content") -> str:
        """The text of one stream's *channel*, concatenated."""
        return "".join(e.text for e in self.of(stream) if type(e) is DeltaEvent and e.channel == channel)

    def texts(self, channel: str = "content") -> dict[str, str]:
        """Every stream's text of *channel*, by stream id."""
        return {sid: self.text(sid, channel) for sid in self.streams}

    def start(self, stream: str | None = None) -> StartEvent:
        """The ``start`` event of one stream."""
        for event in self.of(stream):
            if type(event) is StartEvent:
                return event
        raise AssertionError(f"stream {self._resolve(stream)!r} has no captured start event")

    def terminal(self, stream: str | None = None) -> Event:
        """The terminal event (``end``, ``error`` or ``abort``) of one stream."""
        for event in self.of(stream):
            if is_terminal(event):
                return event
        raise AssertionError(f"stream {self._resolve(stream)!r} has not ended")

    def end(self, stream: str | None = None) -> EndEvent:
        """The ``end`` event of one stream; fails if it ended otherwise."""
        event = self.terminal(stream)
        if type(event) is not EndEvent:
            raise AssertionError(f"stream {event.stream!r} ended with {type(event).__name__}: {event!r}")
        return event

    # -- asserting ---------------------------------------------------------------------
    def assert_text(self, expected: str, stream: str | None = None, channel: str = "content") -> None:
        """Assert one stream's text equals *expected*, showing where they differ."""
        actual = self.text(stream, channel)
        if actual == expected:
            return
        at = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
        if at is None:
            at = min(len(actual), len(expected))
        diff = "\n".join(
            difflib.unified_diff(expected.splitlines(), actual.splitlines(), "expected", "actual", lineterm="")
        )
        raise AssertionError(
            f"text of stream {self._resolve(stream)!r} ({channel}) differs at character {at}: "
            f"expected ...{expected[max(0, at - 20) : at + 20]!r}, got ...{actual[max(0, at - 20) : at + 20]!r}"
            + (f"\n{diff}" if diff else "")
        )

    def assert_complete(self, stream: str | None = None) -> None:
        """Assert a stream is well formed: ``start`` first, gap-free ``seq``, one terminal event, last."""
        events = self.of(stream)
        sid = events[0].stream
        if type(events[0]) is not StartEvent:
            raise AssertionError(f"stream {sid!r} does not begin with start: {events[0]!r}")
        expected = 0
        for event in events:
            first = event.first_seq if type(event) is DeltaEvent and event.first_seq is not None else event.seq
            if first != expected:
                raise AssertionError(f"stream {sid!r}: expected seq {expected}, got {first} ({event!r})")
            expected = event.seq + 1
        terminals = [e for e in events if is_terminal(e)]
        if len(terminals) != 1 or terminals[0] is not events[-1]:
            raise AssertionError(f"stream {sid!r} must end with exactly one terminal event, got {terminals!r}")


# -- pytest fixtures ---------------------------------------------------------------------


@pytest.fixture
async def streambus_bus() -> AsyncIterator[Bus]:
    """A running :class:`~streambus.Bus`; leaving the test drains it."""
    async with Bus() as bus:
        yield bus


@pytest.fixture
def event_capture() -> Callable[..., EventCapture]:
    """Return ``capture(bus, raw=False, filter=None) -> EventCapture``, attached to *bus*."""

    def capture(bus: Bus, *, raw: bool = False, filter: Filter | None = None) -> EventCapture:
        return EventCapture(raw=raw, filter=filter).attach(bus)

    return capture


@pytest.fixture
def replay_recording() -> Callable[..., Awaitable[ReplayProducer]]:
    """Return ``await replay(bus, path, wait=True, **options) -> ReplayProducer``.

    Options are those of :class:`~streambus.replay.ReplayProducer`; the
    default is ``burst=True`` unless ``speed`` is given. With ``wait=True`` it
    returns once the replay is over and every sink has taken in what it
    published.
    """

    async def replay(bus: Bus, path: str | Path, *, wait: bool = True, **options: Any) -> ReplayProducer:
        if "speed" not in options:
            options.setdefault("burst", True)
        producer = ReplayProducer(path=str(path), **options)
        if wait:
            await producer.run(bus)
            # Let sinks (an EventCapture) take in everything just published.
            await anyio.wait_all_tasks_blocked()
        else:
            bus.start_producer(producer, name="replay")
        return producer

    return replay


@pytest.fixture
def mock_model_server() -> Iterator[Callable[..., MockServer]]:
    """Return ``start(recording, **options) -> MockServer`` serving on a free loopback port.

    Options are those of :class:`~streambus.mockserver.MockServer` (``speed``,
    ``burst``, ``idle_limit``, ``formats``, ...). Every server started is
    stopped when the test ends.
    """
    from contextlib import ExitStack

    from .mockserver import MockServer

    with ExitStack() as stack:

        def start(recording: Any, *, host: str = "127.0.0.1", **options: Any) -> MockServer:
            server = MockServer(recording, **options)
            stack.enter_context(server.running(host=host))
            return server

        yield start


# -- record once, replay forever -------------------------------------------------------------

_MODES = ("none", "once", "new_episodes", "all")
_MARKER = (
    "streambus_recording(record_mode=None, path=None, match=None, speed=None, scrub_fields=(), upstream=None): "
    "how this test's LLM recording is used (see streambus docs/testing.md)"
)
_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}
_PLACEHOLDER_KEY = "streambus-replay"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--streambus-*`` options and ini keys of the recording workflow."""
    group = parser.getgroup("streambus", "streambus LLM recordings")
    group.addoption(
        "--streambus-record-mode",
        choices=_MODES,
        default=None,
        help="none (replay only, the default), once (record what has no recording), "
        "new_episodes (record what the recording lacks), all (record everything anew); overrides markers",
    )
    group.addoption(
        "--streambus-upstream",
        default=None,
        help="the real model server recordings are made from (default: $STREAMBUS_UPSTREAM)",
    )
    group.addoption(
        "--streambus-speed",
        default=None,
        help="replay timing: 'instant' (the default: no pauses, chunks in recorded order) or a speed factor",
    )
    parser.addini(
        "streambus_record_mode", "record mode when neither the command line nor a marker says", default="none"
    )
    parser.addini(
        "streambus_recordings", "folder (next to each test module) holding the recordings", default="recordings"
    )
    parser.addini("streambus_scrub_fields", "request body keys scrubbed from recordings", type="linelist", default=[])


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``streambus_recording`` marker."""
    config.addinivalue_line("markers", _MARKER)


def _speed(value: Any, where: str) -> float | None:
    if value is None or value == "instant":
        return None
    try:
        speed = float(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{where}: expected 'instant' or a positive number, got {value!r}") from None
    if not speed > 0:
        raise pytest.UsageError(f"{where}: expected 'instant' or a positive number, got {value!r}")
    return speed


def recording_path(node: pytest.Item, folder: str = "recordings") -> Path:
    """Where *node*'s recording lives: ``<folder>/<module>/<test name>.jsonl`` next to its module.

    Characters a file name cannot hold (parametrize ids: ``test_x[a/b]``) become ``_``.
    """
    module = Path(str(node.path))
    name = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", node.name).strip("._") or "test"
    return module.parent / folder / module.stem / f"{name}.jsonl"


class LLMRecording:
    """What the ``streambus_recording`` fixture gives a test: the base URL and ready clients.

    Every client reaches the test's :class:`~streambus.cassette.Cassette`:
    the recording, or the real upstream through the proxy when recording.
    Client helpers need the client library installed and say which to install
    otherwise. Synchronous clients are closed after the test; use the async
    ones with ``async with`` (their connections belong to the test's event loop).
    """

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        self._closers: list[Callable[[], Any]] = []

    @property
    def url(self) -> str:
        """The base URL (Ollama clients, Gemini); see :attr:`openai_url` for OpenAI clients."""
        return self.cassette.url

    @property
    def openai_url(self) -> str:
        """The base URL for OpenAI clients (``url + "/v1"``), LangChain's ``ChatOpenAI(base_url=...)`` too."""
        return self.cassette.url + "/v1"

    @property
    def mode(self) -> RecordMode:
        """The record mode in use."""
        return self.cassette.mode

    @property
    def path(self) -> Path:
        """The recording file."""
        return self.cassette.path

    def api_key(self, provider: str = "openai") -> str:
        """The key clients send: the real one from the environment when recording, a placeholder when replaying.

        The proxy forwards it to the upstream; recordings never hold it (scrubbed).
        """
        if self.cassette.records:
            env = _KEY_ENV.get(provider)
            if env and os.environ.get(env):
                return os.environ[env]
            if provider == "gemini" and os.environ.get("GOOGLE_API_KEY"):
                return os.environ["GOOGLE_API_KEY"]
        return _PLACEHOLDER_KEY

    @staticmethod
    def _need(module: str, distribution: str) -> Any:
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError:
            raise ImportError(f"this client needs {distribution}: pip install {distribution}") from None

    def openai(self, **options: Any) -> Any:
        """An ``openai.OpenAI`` client for the recording."""
        openai = self._need("openai", "openai")
        client = openai.OpenAI(base_url=self.openai_url, api_key=self.api_key("openai"), max_retries=0, **options)
        self._closers.append(client.close)
        return client

    def async_openai(self, **options: Any) -> Any:
        """An ``openai.AsyncOpenAI`` client for the recording."""
        openai = self._need("openai", "openai")
        return openai.AsyncOpenAI(base_url=self.openai_url, api_key=self.api_key("openai"), max_retries=0, **options)

    def ollama(self, **options: Any) -> Any:
        """An ``ollama.Client`` for the recording."""
        ollama = self._need("ollama", "ollama")
        client = ollama.Client(host=self.url, **options)
        self._closers.append(client.close)
        return client

    def async_ollama(self, **options: Any) -> Any:
        """An ``ollama.AsyncClient`` for the recording."""
        ollama = self._need("ollama", "ollama")
        return ollama.AsyncClient(host=self.url, **options)

    def anthropic(self, **options: Any) -> Any:
        """An ``anthropic.Anthropic`` client for the recording."""
        anthropic = self._need("anthropic", "anthropic")
        client = anthropic.Anthropic(base_url=self.url, api_key=self.api_key("anthropic"), max_retries=0, **options)
        self._closers.append(client.close)
        return client

    def async_anthropic(self, **options: Any) -> Any:
        """An ``anthropic.AsyncAnthropic`` client for the recording."""
        anthropic = self._need("anthropic", "anthropic")
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=self.api_key("anthropic"), max_retries=0, **options)

    def gemini(self, **options: Any) -> Any:
        """A ``google.genai.Client`` for the recording (its ``aio`` attribute is the async one)."""
        genai = self._need("google.genai", "google-genai")
        types = self._need("google.genai.types", "google-genai")
        http = types.HttpOptions(base_url=self.url)
        client = genai.Client(api_key=self.api_key("gemini"), http_options=http, **options)
        self._closers.append(client.close)
        return client

    def close(self) -> None:
        """Close the synchronous clients made here (the fixture does it after the test)."""
        for close in self._closers:
            close()
        self._closers.clear()


@pytest.fixture
def streambus_upstream(request: pytest.FixtureRequest) -> str | None:
    """The real model server recordings are made from: ``--streambus-upstream``, else ``$STREAMBUS_UPSTREAM``.

    Override this fixture to start a server of your own (a fake one in tests).
    """
    value: str | None = request.config.getoption("streambus_upstream") or os.environ.get("STREAMBUS_UPSTREAM")
    return value or None


@pytest.fixture
def streambus_recording(request: pytest.FixtureRequest, streambus_upstream: str | None) -> Iterator[LLMRecording]:
    """This test's recording, used as the record mode says; yields an :class:`LLMRecording`.

    The record mode is ``--streambus-record-mode`` if given, else the
    ``streambus_recording`` marker's ``record_mode``, else the
    ``streambus_record_mode`` ini key (default ``none``). The test fails when a
    request is not in the recording (modes ``none`` and ``once`` with a
    recording) or when a recording holds something that looks like a key.
    """
    from .cassette import Cassette
    from .errors import StreamBusError

    config = request.config
    marker = request.node.get_closest_marker("streambus_recording")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    unknown = set(options) - {"record_mode", "path", "match", "speed", "scrub_fields", "upstream"}
    if unknown:
        raise pytest.UsageError(f"streambus_recording marker: unknown option(s) {sorted(unknown)}")
    mode = (
        config.getoption("streambus_record_mode")
        or options.get("record_mode")
        or config.getini("streambus_record_mode")
    )
    if mode not in _MODES:
        raise pytest.UsageError(f"streambus record mode: expected one of {', '.join(_MODES)}, got {mode!r}")
    node = request.node
    assert isinstance(node, pytest.Item)
    path = options.get("path")
    if path is None:
        file = recording_path(node, str(config.getini("streambus_recordings")))
    else:
        file = Path(str(node.path)).parent / path
    if "speed" in options:
        speed = _speed(options["speed"], "streambus_recording marker: speed")
    else:
        speed = _speed(config.getoption("streambus_speed"), "--streambus-speed")
    scrub = [*config.getini("streambus_scrub_fields"), *options.get("scrub_fields", ())]
    try:
        cassette = Cassette(
            file,
            mode=mode,
            upstream=options.get("upstream") or streambus_upstream,
            match=options.get("match"),
            speed=speed,
            scrub_fields=scrub,
            name=node.nodeid,
        )
    except ValueError as exc:
        pytest.fail(f"streambus_recording: {exc}", pytrace=False)
    try:
        cassette.__enter__()
    except (StreamBusError, ValueError) as exc:  # a key in it, a damaged recording, no proxy installed
        pytest.fail(f"streambus_recording: {exc}", pytrace=False)
    recording = LLMRecording(cassette)
    try:
        yield recording
    finally:
        recording.close()
        try:
            cassette.__exit__(None, None, None)
        except StreamBusError as exc:
            pytest.fail(f"streambus_recording: {exc}", pytrace=False)
    if cassette.unrecorded:
        pytest.fail(
            f"streambus: not recorded in {cassette.path}, so a replay could not answer: "
            + "; ".join(cassette.unrecorded),
            pytrace=False,
        )
    missed = [m for m in cassette.unmatched if not cassette.records]
    if missed:
        lines = "\n".join(f"  - {m.message}" for m in missed)
        pytest.fail(
            f"{len(missed)} request(s) not in the recording {cassette.path} (record mode {mode}); nothing went to "
            f"the network:\n{lines}",
            pytrace=False,
        )


# -- a scripted upstream HTTP server, for provider plugins' tests ----------------


@dataclass
class Reply:
    """How the fake upstream answers one request.

    ``chunks`` are written one ``write`` each (with a yield in between, so
    the client usually sees them as separate reads). ``then`` says what
    happens after the last chunk: ``end`` (clean end of body), ``drop``
    (close the connection mid-body) or ``hang`` (keep the connection open,
    sending nothing, until the client goes away). ``stall_headers`` sends
    nothing at all, not even the status line, until the client goes away.
    """

    chunks: list[bytes] = field(default_factory=list)
    status: int = 200
    content_type: str | None = None
    """Defaults to the upstream's ``default_content_type``."""
    then: str = "end"
    body: bytes | None = None
    stall_headers: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """Further response headers (``Retry-After``...)."""


@dataclass
class ScriptedUpstream:
    """A scripted model server: ``replies`` are used in order (the last one repeats)."""

    url: str = ""
    default_content_type: str = "application/x-ndjson"
    replies: list[Reply] = field(default_factory=list)
    by_path: dict[str, Callable[[Any, Any], Awaitable[Any]]] = field(default_factory=dict)
    requests: list[Any] = field(default_factory=list)
    """Each request's JSON body (``{}`` when empty, ``None`` when not JSON)."""
    bodies: list[bytes] = field(default_factory=list)
    """Each request's raw body."""
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a request has arrived."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: int = 0
    max_inflight: int = 0

    @property
    def reply(self) -> Reply:
        """The reply every request gets when only one is scripted (created on first use)."""
        if not self.replies:
            self.replies.append(Reply())
        return self.replies[-1]

    def reply_for(self, index: int) -> Reply:
        """The reply for the *index*-th request (the last reply repeats)."""
        if not self.replies:
            return self.reply
        return self.replies[min(index, len(self.replies) - 1)]


async def _scripted_handle(upstream: ScriptedUpstream, request: Any) -> Any:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = None
    custom = upstream.by_path.get(request.path)
    if custom is not None:
        return await custom(request, body)
    index = len(upstream.requests)
    upstream.requests.append(body)
    upstream.bodies.append(raw)
    upstream.headers.append(dict(request.headers))
    upstream.arrived.set()
    reply = upstream.reply_for(index)
    upstream.inflight += 1
    upstream.max_inflight = max(upstream.max_inflight, upstream.inflight)
    try:
        return await _scripted_reply(upstream, request, reply)
    finally:
        upstream.inflight -= 1


async def _until_client_gone(
    request: Any, tick: Callable[[], Awaitable[Any]] | None = None, limit: float = 20.0
) -> None:
    """Return once the client closed its connection (or after *limit* seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        await asyncio.sleep(0.005)
        if request.transport is None or request.transport.is_closing():
            return
        if tick is not None:
            await tick()


async def _scripted_reply(upstream: ScriptedUpstream, request: Any, reply: Reply) -> Any:
    from aiohttp import web

    if reply.body is not None:
        return web.Response(
            status=reply.status, body=reply.body, content_type="application/json", headers=reply.headers
        )
    if reply.stall_headers:
        await _until_client_gone(request)
        upstream.disconnected.set()
        return web.Response(status=504)
    content_type = reply.content_type or upstream.default_content_type
    response = web.StreamResponse(status=reply.status, headers={**reply.headers, "Content-Type": content_type})
    await response.prepare(request)
    try:
        for chunk in reply.chunks:
            await response.write(chunk)
            await asyncio.sleep(0)
        if reply.then == "drop":
            assert request.transport is not None
            request.transport.close()
            return response
        if reply.then == "hang":
            # Keep the response open; a client that goes away makes writes fail.
            await _until_client_gone(request, tick=lambda: response.write(b""))
            upstream.disconnected.set()
            return response
        await response.write_eof()
    except ConnectionError:
        upstream.disconnected.set()
    return response


@contextlib.asynccontextmanager
async def scripted_upstream(content_type: str = "application/x-ndjson") -> AsyncIterator[ScriptedUpstream]:
    """Serve scripted byte streams on 127.0.0.1 (a free port) as a fake model server.

    Set ``upstream.replies`` to :class:`Reply` objects (used in order, the last
    one repeating); requests, their headers and client disconnects are
    recorded. *content_type* is the default of replies built with
    ``Reply(...)`` defaults replaced. Needs aiohttp (``pip install 'streambus[testing]'``)
    and asyncio::

        async with scripted_upstream() as upstream:
            upstream.replies = [Reply(chunks=[b'{"response":"Hi","done":false}\\n'])]
            ...  # point a producer at upstream.url
    """
    from aiohttp import web

    state = ScriptedUpstream(default_content_type=content_type)
    app = web.Application()

    async def handler(request: web.Request) -> web.StreamResponse:
        result: web.StreamResponse = await _scripted_handle(state, request)
        return result

    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()
