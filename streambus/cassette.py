"""Record once, replay forever: one recording file per test, made through the proxy, served by the mock.

::

    with Cassette("tests/recordings/test_app/test_ask.jsonl", mode="once",
                  upstream="http://127.0.0.1:11434") as cassette:
        client = ollama.Client(host=cassette.url)
        ...                                   # first run: the real upstream, recorded
                                              # later runs: the recording, no network

The record modes are pytest-recording's:

``none``
    Replay only. A request that is not in the recording gets the provider's
    error naming it (and the closest recorded one); nothing reaches the network.
``once``
    Replay when the recording exists; otherwise every request goes to the
    upstream through the proxy and the recording is written when the cassette closes.
``new_episodes``
    Replay what matches; what does not goes to the upstream and is added to the recording.
``all``
    Every request goes to the upstream; the recording is written anew.

Recording goes through the streambus proxy (``streambus-proxy``, found by its
``streambus.proxies`` entry point) in front of the upstream, so every wire
format the proxy parses records the same way: the proxy publishes what the
upstream answers on a bus, the cassette keeps those events and, on each
stream's ``start`` line, the request that asked for it (credentials scrubbed,
see :mod:`streambus.scrubbing`). Before the file is written it is searched for
anything that looks like a key; if one is found, nothing is written and
:class:`SecretInRecording` names the line and the kind of key (masked).

Everything runs in a background thread with its own asyncio loop, so the
cassette works from synchronous tests and async tests under asyncio or trio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import orjson
import structlog
from aiohttp import web

from .bus import Bus
from .errors import PluginError, StreamBusError
from .events import Event, StartEvent
from .formats import AnswerParsing, installed_formats
from .matching import Matcher, RecordedRequest, find_route
from .mockserver import MockServer, Unmatched
from .plugins import install_hint
from .recording import Recording, event_line, header_line, read_recording
from .scrubbing import Scrubber, SecretHit, find_secrets
from .subscription import Subscription

__all__ = [
    "PROXY_ENTRY_POINTS",
    "RECORD_MODES",
    "Cassette",
    "RecordMode",
    "SecretInRecording",
    "check_recording",
]

log = structlog.get_logger("streambus.cassette")

RecordMode = Literal["none", "once", "new_episodes", "all"]
"""How a cassette uses its recording and the upstream (see the module docs)."""

RECORD_MODES: tuple[RecordMode, ...] = ("none", "once", "new_episodes", "all")
"""The record modes, as pytest-recording names them."""

PROXY_ENTRY_POINTS = "streambus.proxies"
"""The entry point group where a proxy distribution registers its ``create_app(bus, upstream, **options)``."""

STREAM_HEADER = "x-streambus-stream"


class SecretInRecording(StreamBusError):
    """A recording holds something that looks like a key (``hits``: line, kind, masked value; ``path``)."""

    def __init__(self, path: str, hits: list[SecretHit]) -> None:
        self.path = path
        self.hits = hits
        shown = "; ".join(f"line {h.line}: {h.kind} {h.masked}" for h in hits[:5])
        more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
        super().__init__(
            f"{path}: the recording holds something that looks like a key: {shown}{more}. "
            "Scrub it (scrub_fields=[...] for body fields) or remove it from the file"
        )


def check_recording(path: str | Path, *, known: Iterable[str] = ()) -> None:
    """Raise :class:`SecretInRecording` if the recording at *path* holds anything key-like."""
    text = Path(path).read_bytes().decode("utf-8", "replace")
    hits = find_secrets(text, known=known)
    if hits:
        raise SecretInRecording(str(path), hits)


def _proxy_factory() -> Callable[..., web.Application]:
    found = entry_points(group=PROXY_ENTRY_POINTS, name="proxy")
    for ep in found:
        factory: Callable[..., web.Application] = ep.load()
        return factory
    raise PluginError(
        "recording needs the streambus proxy, which is not installed",
        name="proxy",
        hint=f"Install it with: {install_hint('streambus-proxy')}",
    )


class _Collector:
    """A lossless sink keeping every event the proxy published."""

    overflow = "block"

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def run(self, events: Subscription) -> None:
        while batch := await events.receive_batch():
            self.events.extend(batch)


class Cassette:
    """One recording file used by one test: replayed, recorded, or both (see the module docs).

    :param path: the recording file (created with its folder when recorded).
    :param mode: ``none``, ``once``, ``new_episodes`` or ``all``.
    :param upstream: the real server's base URL; needed when the mode records.
    :param match: how requests find their recorded stream (:mod:`streambus.matching`);
        ``None``: ``normalized``, or by model for a recording made without requests.
    :param speed: replay speed (recorded pauses divided by it); ``None``: instant,
        no pauses, every chunk still sent in recorded order.
    :param scrub_fields: request body keys (any depth) whose values are scrubbed.
    :param proxy_options: further keywords for the proxy's ``create_app``.
    :param name: stored in the recording's header ``meta`` (the test's id).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        mode: RecordMode = "none",
        upstream: str | None = None,
        match: str | Matcher | None = None,
        speed: float | None = None,
        scrub_fields: Iterable[str] = (),
        proxy_options: dict[str, Any] | None = None,
        name: str = "",
    ) -> None:
        if mode not in RECORD_MODES:
            raise ValueError(f"record mode: expected one of {', '.join(RECORD_MODES)}, got {mode!r}")
        if speed is not None and not speed > 0:
            raise ValueError(f"speed: must be positive (or None for instant), got {speed}")
        self.path = Path(path)
        self.mode: RecordMode = mode
        self.upstream = upstream.rstrip("/") if upstream else None
        self.match = match
        self.speed = speed
        self.scrubber = Scrubber(scrub_fields)
        self.proxy_options = dict(proxy_options or {})
        self.name = name
        exists = self.path.exists()
        self.replays = mode in ("none", "new_episodes") or (mode == "once" and exists)
        """Whether requests are answered from the recording (first)."""
        self.records = mode in ("all", "new_episodes") or (mode == "once" and not exists)
        """Whether requests (the unmatched ones, with ``new_episodes``) go to the upstream and are recorded."""
        if self.records and not self.upstream:
            raise ValueError(
                f"record mode {mode!r} needs the real upstream to record {self.path}: pass "
                "--streambus-upstream URL (or set STREAMBUS_UPSTREAM), or replay with --streambus-record-mode=none"
            )
        self.recorded: list[Event] = []
        """The events recorded by this cassette (after it closed)."""
        self.requests: dict[str, RecordedRequest] = {}
        """The recorded requests by stream id (after it closed)."""
        self.written = False
        """Whether the recording file was written when the cassette closed."""
        self.unrecorded: list[str] = []
        """Model requests that could not be recorded, each with why (a format the proxy does not parse...)."""
        self.mock: MockServer | None = None
        self._url: str | None = None
        self._stop: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._collector = _Collector()
        self._captured: dict[str, RecordedRequest] = {}
        self._formats = installed_formats() if self.records else {}
        # The proxy's own rule: it parses (and publishes) the answers of the formats that can parse them.
        self._parsed = {name for name, fmt in self._formats.items() if isinstance(fmt, AnswerParsing)}

    # -- what the test uses --------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL to point clients at (Ollama's; OpenAI clients add ``/v1``)."""
        if self._url is None:
            raise RuntimeError("the cassette is not open; use `with Cassette(...) as cassette:`")
        return self._url

    @property
    def unmatched(self) -> list[Unmatched]:
        """Requests the recording could not answer (forwarded upstream with ``new_episodes``)."""
        return list(self.mock.unmatched) if self.mock is not None else []

    # -- running ---------------------------------------------------------------------------
    def __enter__(self) -> Cassette:
        if self.replays and self.path.exists():
            check_recording(self.path)
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            stop = asyncio.Event()
            loops.append((loop, stop))
            try:
                loop.run_until_complete(self._serve(started, stop))
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                else:
                    log.error("cassette.failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=serve, name="streambus-cassette", daemon=True)
        thread.start()
        self._thread = thread

        def stop_serving() -> None:
            if loops and not loops[0][0].is_closed():
                with contextlib.suppress(RuntimeError):
                    loops[0][0].call_soon_threadsafe(loops[0][1].set)

        self._stop = stop_serving
        try:
            self._url = started.result(timeout=30)
        except BaseException:
            stop_serving()
            thread.join(timeout=30)
            raise
        return self

    async def _serve(self, started: concurrent.futures.Future[str], stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            proxy_url = None
            if self.records:
                bus = await stack.enter_async_context(Bus())
                bus.add_sink(self._collector, name="cassette")
                assert self.upstream is not None
                app = _proxy_factory()(bus, self.upstream, **self.proxy_options)
                app.middlewares.append(self._capture_requests)
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                proxy_url = f"http://127.0.0.1:{port}"
            url = proxy_url
            if self.replays:
                source: Recording | list[Event] = read_recording(self.path) if self.path.exists() else []
                match = self.match
                if match is None:
                    # A recording made without requests (by hand, by the recorder sink) is answered by model.
                    by_model = isinstance(source, Recording) and source.events and not source.requests
                    match = "model" if by_model else "normalized"
                hint = (
                    f"recording {self.path}, record mode {self.mode}; record it with --streambus-record-mode=once"
                    if self.mode == "none"
                    else f"recording {self.path}, record mode {self.mode}"
                )
                self.mock = MockServer(
                    source,
                    burst=self.speed is None,
                    speed=self.speed or 1.0,
                    match=match,
                    scrubber=self.scrubber,
                    fallback=proxy_url,
                    unmatched_hint=hint,
                )
                url = await self.mock.start()
                stack.push_async_callback(self.mock.close)
            assert url is not None
            started.set_result(url)
            await stop.wait()

    @web.middleware
    async def _capture_requests(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Keep each model request the proxy answers with a stream, by the stream id it answers with."""
        route = find_route(request.path, self._formats) if request.method == "POST" else None
        if route is None:
            result: web.StreamResponse = await handler(request)
            return result
        if route[0] not in self._parsed:
            # The proxy passes these through unparsed (streaming the body on): nothing to record.
            passed: web.StreamResponse = await handler(request)
            if passed.status < 400:
                self.unrecorded.append(
                    f"{request.method} {request.path}: the installed proxy passes {route[0]} answers through unparsed"
                )
                log.warning("cassette.not_recorded", path=request.path, format=route[0])
            return passed
        # Read here, the proxy reads the same (cached) bytes.
        raw = await request.read()
        try:
            response: web.StreamResponse = await handler(request)
        except Exception as exc:
            self.unrecorded.append(
                f"{request.method} {request.path}: the proxy failed it ({type(exc).__name__}: {exc})"
            )
            raise
        stream = response.headers.get(STREAM_HEADER)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return response
        if stream and isinstance(body, dict):
            fmt, name, path_model = route
            model = path_model or body.get("model") or ""
            self._captured[stream] = RecordedRequest(
                method=request.method,
                path=request.path,
                body=self.scrubber.body(body),
                format=fmt,
                route=name,
                model=model if isinstance(model, str) else "",
                headers=self.scrubber.headers(request.headers),
            )
        return response

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stop is not None:
            self._stop()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._url = None
        if self.records:
            self.recorded = list(self._collector.events)
            self.requests = dict(self._captured)
            self._write()

    def _write(self) -> None:
        streams = [e.stream for e in self.recorded if type(e) is StartEvent]
        if not streams:
            return
        missing = {s for s in streams if s not in self.requests}
        if missing:
            # A stream without its request could never be matched: it is left out, and the test told.
            log.warning("cassette.request_missing", streams=sorted(missing), why="the proxy failed the request")
            self.unrecorded.extend(f"stream {s}: its request is unknown (the proxy failed it)" for s in sorted(missing))
            self.recorded = [e for e in self.recorded if e.stream not in missing]
            if len(missing) == len(streams):
                return
        events: list[Event] = []
        requests: dict[str, dict[str, Any]] = {}
        if self.mode == "new_episodes" and self.path.exists():
            old = read_recording(self.path)
            events.extend(old.events)
            requests.update(old.requests)
        events.extend(self.recorded)
        requests.update({sid: r.to_json() for sid, r in self.requests.items()})
        meta = {"recorded_by": "streambus.cassette", "test": self.name} if self.name else {}
        data = bytearray(header_line(meta))
        for event in events:
            data += event_line(event, requests.get(event.stream) if type(event) is StartEvent else None)
        hits = find_secrets(data.decode("utf-8", "replace"), known=self.scrubber.seen)
        if hits:
            raise SecretInRecording(str(self.path), hits)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside then renamed: a reader (another xdist worker) never sees half a file.
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_bytes(bytes(data))
        os.replace(partial, self.path)
        self.written = True
        log.info("cassette.written", path=str(self.path), streams=len(streams), mode=self.mode)
