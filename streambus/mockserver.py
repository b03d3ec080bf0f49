"""A mock model server: recorded streams served over real HTTP as Ollama and OpenAI do.

::

    server = MockServer("tests/data/chat.jsonl", speed=1.0)
    with server.running() as url:          # a background thread; any test style
        client = ollama.Client(host=url)
        for part in client.chat(model="llama3.2", messages=[...], stream=True):
            ...
        openai.OpenAI(base_url=url + "/v1", api_key="unused")

    async with MockServer("chat.jsonl") as server:   # inside an asyncio app
        print(server.url)

The server answers the routes of every installed provider wire format
(:func:`streambus.formats.load_format`): Ollama's ``/api/chat``,
``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version`` and OpenAI's ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/models``, ``/v1/models/{id}``, and those of any
other installed format (Anthropic's ``/v1/messages``, Gemini's
``/v1beta/models/{model}:streamGenerateContent``...) with the model list at
the format's :class:`~streambus.formats.ModelsRoute`. Two formats may share
a models path (OpenAI's and Anthropic's ``/v1/models``): the one whose
``claims`` accepts the request's headers answers, else the first. The bytes come from the provider
plugin's own encoder, so what a client receives is what the plugin's
producer parses. ``/api/show`` reports the capabilities the recordings show
(``thinking`` for reasoning, ``tools`` for tool calls); ``/api/ps`` lists the
models answered in the last :data:`KEEP_ALIVE` seconds, as Ollama keeps a
model loaded that long after its last use.

Which recording answers a request: when the recording stores the requests
its streams answered (the ``request`` of a ``start`` line, written by
:mod:`streambus.cassette`), the stream whose request *matches* the incoming
one (:mod:`streambus.matching`: ``normalized`` by default, ``exact``, or a
function), in recorded order among equal requests, cycling. A request that
matches none gets the provider's error body (status 404) naming the closest
recorded request and how the two differ, or is forwarded to *fallback* when
one is set. A recording without requests is answered by model: the recorded
streams of the requested model, in recorded order, cycling (``llama3.2`` and
``llama3.2:latest`` are the same model). An unknown model gets the
provider's own error body and status (404). A streamed answer reproduces the recorded gaps between events
(scaled by *speed*, capped by *idle_limit*, or none with *burst*); a request
with ``stream: false`` waits the recorded duration and gets the assembled body.

A recorded ``end`` without provider timings (an OpenAI recording, say) gets
them from the recorded timestamps, so Ollama clients can compute tokens per
second: ``prompt_eval_duration`` = start to first delta,
``eval_duration`` = first delta to end (at least 1 µs), ``total_duration`` =
start to end, ``load_duration`` = 0 (the model counts as loaded).

This module needs :mod:`aiohttp` (``pip install 'streambus[testing]'``) and its
async API runs on asyncio; :meth:`MockServer.running` works from any code,
trio included, because the server then runs in its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import orjson
import structlog

try:
    import aiohttp
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "streambus's mock model server needs aiohttp, which is not installed. "
        "Install it with: pip install 'streambus[testing]'"
    ) from exc

from .errors import AsyncioRequired, PluginError
from .events import DeltaEvent, EndEvent, Event, StartEvent
from .formats import LoadedModels, ModelDetails, ModelsRoute, WireFormat, load_format
from .matching import Matcher, RecordedRequest, closest, exact, matcher
from .plugins import discover, install_hint
from .recording import Recording, read_recording
from .replay import plan_streams
from .scrubbing import Scrubber, mask_secrets
from .serving import AppServer

__all__ = ["KEEP_ALIVE", "UNMATCHED_STATUS", "MockServer", "ServedRequest", "Unmatched"]

UNMATCHED_STATUS = 404
"""The status of the provider-shaped error a request that matches no recorded request gets."""

log = structlog.get_logger("streambus.mockserver")

KEEP_ALIVE = 300.0
"""Seconds a model stays listed by ``/api/ps`` after it answered (Ollama's default ``keep_alive``)."""

_NOT_FOUND = {
    "ollama": "model '{model}' not found",
    "openai": "The model `{model}` does not exist or you do not have access to it.",
}


@dataclasses.dataclass(frozen=True)
class ServedRequest:
    """One request the server answered (see :attr:`MockServer.requests`)."""

    method: str
    path: str
    model: str | None
    status: int
    stream: str | None
    """The recorded stream id that answered, if any."""
    streamed: bool
    request: RecordedRequest | None = None
    """The model request as the matchers saw it (credentials scrubbed); ``None`` for other routes."""


@dataclasses.dataclass(frozen=True)
class Unmatched:
    """A model request no recorded request matched (see :attr:`MockServer.unmatched`)."""

    request: RecordedRequest
    closest: RecordedRequest | None
    """The nearest recorded request, ``None`` when the recording holds none."""
    differences: tuple[str, ...]
    """How :attr:`request` differs from :attr:`closest`."""

    @property
    def message(self) -> str:
        """What the client is told: the request, the closest recorded one, and how they differ.

        Anything in them that looks like a key is shown masked (:func:`~streambus.scrubbing.mask_secrets`).
        """
        text = f"streambus mock: no recorded request matches {self.request.describe()}"
        if self.closest is None:
            return mask_secrets(text + "; the recording holds no requests (record it first)")
        shown = "; ".join(self.differences[:5]) + ("; ..." if len(self.differences) > 5 else "")
        closest = self.closest.describe()
        return mask_secrets(f"{text}; closest recorded: {closest}, which differs in {shown or 'nothing compared'}")


@dataclasses.dataclass(frozen=True)
class _Answer:
    events: tuple[Event, ...]
    offsets: tuple[float, ...]  # seconds from the stream's start, idle limit applied


def _base_model(name: str) -> str:
    return name.removesuffix(":latest")


def _with_timings(events: Sequence[Event]) -> Sequence[Event]:
    """*events*, their ``end`` given timings from the recorded timestamps if it has none."""
    end = events[-1]
    if not isinstance(end, EndEvent) or end.timings:
        return events
    begun = events[0].ts
    first = next((e.ts for e in events if isinstance(e, DeltaEvent)), end.ts)
    # Rounded to the microsecond: that is all a float UNIX time holds.
    timings = {
        "total_duration": round(max(0.0, end.ts - begun), 6),
        "load_duration": 0.0,
        "prompt_eval_duration": round(max(0.0, first - begun), 6),
        # Never 0: clients divide eval_count by it.
        "eval_duration": round(max(1e-6, end.ts - first), 6),
    }
    return [*events[:-1], msgspec.structs.replace(end, timings=timings)]


class MockServer:
    """Serve recorded streams over HTTP in the providers' wire formats.

    :param source: a recording path (or several), a :class:`~streambus.recording.Recording`,
        or events.
    :param speed: recorded pauses are divided by this.
    :param burst: send everything at once, no pauses.
    :param idle_limit: cap every recorded pause at this many seconds.
    :param formats: the wire formats to serve (entry point names); missing ones are skipped
        with a warning, but at least one must load. The default is ``ollama``, ``openai``
        and every other installed format.
    :param lenient: read the recording skipping invalid lines.
    :param ollama_version: what ``/api/version`` reports.
    :param match: how a request finds its recorded stream: ``"normalized"``, ``"exact"``
        or a function ``(recorded, incoming) -> bool`` (:mod:`streambus.matching`), or
        ``"model"`` (by model, cycling). ``None`` (default): ``"normalized"`` when the
        recording stores requests, else ``"model"``.
    :param requests: the recorded requests by stream id, when *source* is events
        (a recording file or :class:`~streambus.recording.Recording` brings its own).
    :param scrubber: scrubs incoming requests as the recorded ones were before they are
        compared (so a scrubbed body field still matches); the default scrubs headers only.
    :param fallback: a base URL unmatched model requests are forwarded to (the proxy in
        front of the real upstream, to record new episodes); ``None``: answer them 404.
    :param unmatched_hint: added to the error an unmatched request gets (where the
        recording lives, how to record the request).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path] | Recording | Iterable[Event],
        *,
        speed: float = 1.0,
        burst: bool = False,
        idle_limit: float | None = None,
        formats: Sequence[str] | None = None,
        lenient: bool = False,
        ollama_version: str = "0.6.0",
        match: str | Matcher | None = None,
        requests: Mapping[str, Mapping[str, Any]] | None = None,
        scrubber: Scrubber | None = None,
        fallback: str | None = None,
        unmatched_hint: str = "",
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed: must be positive, got {speed}")
        if idle_limit is not None and idle_limit < 0:
            raise ValueError(f"idle_limit: must be at least 0, got {idle_limit}")
        self.speed = speed
        self.burst = burst
        self.idle_limit = idle_limit
        self.ollama_version = ollama_version
        asked: dict[str, Mapping[str, Any]] = dict(requests or {})
        events = self._events(source, lenient, asked)
        plans, _, _ = plan_streams(events)
        self._answers: dict[str, list[_Answer]] = {}
        self._channels: dict[str, set[str]] = {}
        self.recorded: list[tuple[RecordedRequest, str]] = []
        """The recorded requests with the id of the stream that answered each, in recorded order."""
        by_stream: dict[str, _Answer] = {}
        for plan in plans:
            key = _base_model(plan.start.model)
            answer = self._answer(_with_timings(plan.events))
            by_stream[plan.stream] = answer
            self._answers.setdefault(key, []).append(answer)
            channels = self._channels.setdefault(key, set())
            channels.update(e.channel for e in plan.events if isinstance(e, DeltaEvent))
            if plan.stream in asked:
                try:
                    self.recorded.append((RecordedRequest.from_json(asked[plan.stream]), plan.stream))
                except ValueError as exc:
                    raise ValueError(f"the request of recorded stream {plan.stream!r}: {exc}") from None
        self._by_stream = by_stream
        if match is None:
            match = "normalized" if self.recorded else "model"
        self.match: Matcher | None = None if match == "model" else matcher(match)
        """The matcher in use; ``None`` when requests are answered by model."""
        self.scrubber = scrubber or Scrubber()
        self.fallback = fallback.rstrip("/") if fallback else None
        self.unmatched_hint = unmatched_hint
        self.unmatched: list[Unmatched] = []
        """Every model request no recorded request matched (forwarded to *fallback* or answered 404)."""
        self._fallback_session: Any = None
        self._loaded: dict[str, float] = {}  # model -> UNIX time its keep-alive ends
        self._cursor: dict[str, int] = {}
        self._lock = threading.Lock()
        self.formats: dict[str, WireFormat] = {}
        """The loaded wire formats by name."""
        failures: list[str] = []
        if formats is None:
            others = [info.name for info in discover("formats") if info.ok and info.name not in ("ollama", "openai")]
            formats = ["ollama", "openai", *others]
        for name in formats:
            try:
                self.formats[name] = load_format(name)
            except PluginError as exc:
                failures.append(str(exc))
                log.warning("mockserver.format_missing", format=name, error=str(exc))
        if not self.formats:
            raise PluginError(
                "no provider wire format could be loaded: " + "; ".join(failures),
                name=",".join(formats),
                hint=f"Install one with: {install_hint('streambus-ollama')}, or {install_hint('streambus-openai')}",
            )
        self.requests: list[ServedRequest] = []
        """Every request answered so far, in order."""
        self._server: AppServer | None = None
        self._url: str | None = None

    @staticmethod
    def _events(source: Any, lenient: bool, requests: dict[str, Mapping[str, Any]]) -> list[Event]:
        if isinstance(source, Recording):
            requests.update(source.requests)
            return list(source.events)
        if isinstance(source, str | Path):
            recording = read_recording(source, lenient=lenient)
            requests.update(recording.requests)
            return recording.events
        items = list(source)
        if items and all(isinstance(p, str | Path) for p in items):
            out: list[Event] = []
            for path in items:
                recording = read_recording(path, lenient=lenient)
                requests.update(recording.requests)
                out.extend(recording.events)
            return out
        return items

    def _answer(self, events: Sequence[Event]) -> _Answer:
        offsets = [0.0]
        latest = events[0].ts
        for event in events[1:]:
            gap = max(0.0, event.ts - latest)
            latest = max(latest, event.ts)
            offsets.append(offsets[-1] + (gap if self.idle_limit is None else min(gap, self.idle_limit)))
        return _Answer(tuple(events), tuple(offsets))

    @property
    def models(self) -> list[str]:
        """The recorded models, in order of first appearance."""
        names: dict[str, None] = {}
        for answers in self._answers.values():
            start = answers[0].events[0]
            assert isinstance(start, StartEvent)
            names[start.model] = None
        return list(names)

    def _pick(self, model: str) -> _Answer | None:
        key = _base_model(model)
        answers = self._answers.get(key)
        if not answers:
            return None
        with self._lock:
            index = self._cursor.get(key, 0)
            self._cursor[key] = index + 1
            answer = answers[index % len(answers)]
            start = answer.events[0]
            assert isinstance(start, StartEvent)
            self._loaded[start.model] = time.time() + KEEP_ALIVE
        return answer

    def _matched(self, incoming: RecordedRequest) -> _Answer | None:
        """The next recorded stream whose request matches *incoming* (equal requests cycle in recorded order)."""
        assert self.match is not None
        found = [stream for recorded, stream in self.recorded if self.match(recorded, incoming)]
        if not found:
            return None
        key = "\x00".join(found)
        with self._lock:
            index = self._cursor.get(key, 0)
            self._cursor[key] = index + 1
            answer = self._by_stream[found[index % len(found)]]
            start = answer.events[0]
            assert isinstance(start, StartEvent)
            self._loaded[start.model] = time.time() + KEEP_ALIVE
        return answer

    def _unmatched(self, incoming: RecordedRequest) -> Unmatched:
        recorded = [r for r, _ in self.recorded]
        near = closest(recorded, incoming, exactly=self.match is exact)
        miss = Unmatched(incoming, None, ()) if near is None else Unmatched(incoming, recorded[near[0]], tuple(near[1]))
        self.unmatched.append(miss)
        return miss

    def _known(self, model: str) -> str | None:
        """The recorded name of *model* (``:latest`` or not), or ``None``."""
        answers = self._answers.get(_base_model(model))
        if not answers:
            return None
        start = answers[0].events[0]
        assert isinstance(start, StartEvent)
        return start.model

    # -- the aiohttp application ---------------------------------------------------
    def app(self) -> web.Application:
        """Build the :class:`aiohttp.web.Application` (to mount it in your own server)."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        served: set[str] = set()
        listings: dict[str, list[WireFormat]] = {}
        for fmt in self.formats.values():
            for path, route in fmt.routes.items():
                if path in ("/api/tags", "/api/version", "/v1/models"):
                    continue
                app.router.add_post(path, self._handler(fmt, path, route))
                served.add(path)
            if isinstance(fmt, ModelsRoute):
                for models_path in fmt.models_paths:
                    listings.setdefault(models_path, []).append(fmt)
        if "ollama" in self.formats:
            ollama = self.formats["ollama"]
            app.router.add_get("/api/tags", self._models_handler(ollama))
            app.router.add_get("/api/version", self._version)
            app.router.add_get("/", self._root)
            if isinstance(ollama, ModelDetails):
                app.router.add_post("/api/show", self._show_handler(ollama))
            if isinstance(ollama, LoadedModels):
                app.router.add_get("/api/ps", self._loaded_handler(ollama))
        if "openai" in self.formats:
            listings.setdefault("/v1/models", []).insert(0, self.formats["openai"])
        for path, fmts in listings.items():
            app.router.add_get(path, self._models_handler(*fmts))
            if any(isinstance(fmt, ModelDetails) for fmt in fmts):
                app.router.add_get(path + "/{model:.+}", self._show_handler(*fmts))
        return app

    @staticmethod
    def _choose(fmts: Sequence[WireFormat], request: web.Request) -> WireFormat:
        # A client that the format recognises (Anthropic's send anthropic-version) gets that format.
        for fmt in fmts:
            if isinstance(fmt, ModelsRoute) and fmt.claims(request.headers):
                return fmt
        return next((fmt for fmt in fmts if not isinstance(fmt, ModelsRoute)), fmts[0])

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        self._log(request, None, 200, None, False)
        return web.json_response({"version": self.ollama_version})

    def _models_handler(self, *fmts: WireFormat) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            fmt = self._choose(fmts, request)
            self._log(request, None, 200, None, False)
            return web.json_response(fmt.models_body(self.models))

        return handler

    def _show_handler(self, *fmts: WireFormat) -> Any:
        # Ollama: POST /api/show {"model": ...} (older clients send "name"); OpenAI: GET /v1/models/{id}.
        async def handler(request: web.Request) -> web.StreamResponse:
            fmt = self._choose(fmts, request)
            if not isinstance(fmt, ModelDetails):
                return self._error(request, fmt, 404, f"no route {request.path}", None)
            details: ModelDetails = fmt
            model: Any = request.match_info.get("model")
            if model is None:
                try:
                    body = orjson.loads(await request.read())
                except orjson.JSONDecodeError as exc:
                    return self._error(request, fmt, 400, f"invalid JSON request body: {exc}", None)
                model = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
                if not isinstance(model, str) or not model:
                    return self._error(request, fmt, 400, "model is required", None)
            name = self._known(model)
            if name is None:
                message = _NOT_FOUND.get(fmt.name, "model '{model}' not found").format(model=model)
                return self._error(request, fmt, 404, message, model)
            self._log(request, model, 200, None, False)
            return web.json_response(details.model_body(name, sorted(self._channels[_base_model(name)])))

        return handler

    def _loaded_handler(self, fmt: LoadedModels) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            now = time.time()
            with self._lock:
                loaded = {model: until for model, until in self._loaded.items() if until > now}
            self._log(request, None, 200, None, False)
            return web.json_response(fmt.loaded_body(loaded))

        return handler

    def _log(
        self,
        request: web.Request,
        model: str | None,
        status: int,
        stream: str | None,
        streamed: bool,
        asked: RecordedRequest | None = None,
    ) -> None:
        self.requests.append(ServedRequest(request.method, request.path, model, status, stream, streamed, asked))

    def _error(
        self,
        request: web.Request,
        fmt: WireFormat,
        status: int,
        message: str,
        model: str | None,
        asked: RecordedRequest | None = None,
    ) -> web.Response:
        self._log(request, model, status, None, False, asked)
        log.info("mockserver.error", path=request.path, status=status, message=message)
        return web.json_response(fmt.error_body(status, message), status=status)

    def _handler(self, fmt: WireFormat, path: str, route: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._error(request, fmt, 400, f"invalid JSON request body: {exc}", None)
            if not isinstance(body, dict):
                return self._error(request, fmt, 400, "the request body must be a JSON object", None)
            # Gemini names the model in the path (/v1beta/models/{model}:...), the others in the body.
            model = request.match_info.get("model") or body.get("model")
            if not isinstance(model, str) or not model:
                return self._error(request, fmt, 400, "model is required", None)
            asked = RecordedRequest(
                method=request.method,
                path=request.path,
                body=self.scrubber.body(body),
                format=fmt.name,
                route=route,
                model=model,
                headers=self.scrubber.headers(request.headers),
            )
            if self.match is not None:
                answer = self._matched(asked)
                if answer is None:
                    miss = self._unmatched(asked)
                    if self.fallback is not None:
                        return await self._forward(request, raw, model, asked)
                    log.warning("mockserver.unmatched", message=miss.message)
                    message = miss.message + (f" ({self.unmatched_hint})" if self.unmatched_hint else "")
                    return self._error(request, fmt, UNMATCHED_STATUS, message, model, asked)
            else:
                answer = self._pick(model)
                if answer is None:
                    message = _NOT_FOUND.get(fmt.name, "model '{model}' not found").format(model=model)
                    return self._error(request, fmt, 404, message, model, asked)
            recorded = answer.events[0].stream
            if not fmt.is_streaming(route, body):
                await self._pause(answer.offsets[-1])
                assembled = fmt.assemble(route, body, answer.events)
                # A recorded stream that failed assembles to the provider's
                # error body, which real servers send with status 500.
                status = 500 if "error" in assembled else 200
                self._log(request, model, status, recorded, False, asked)
                return web.json_response(assembled, status=status, dumps=_dumps)
            return await self._stream(request, fmt, route, body, answer, model, asked)

        return handler

    async def _pause(self, seconds: float) -> None:
        if not self.burst and seconds > 0:
            await asyncio.sleep(seconds / self.speed)

    async def _forward(
        self, request: web.Request, raw: bytes, model: str, asked: RecordedRequest
    ) -> web.StreamResponse:
        """Pass an unmatched request to :attr:`fallback` and its answer back, byte for byte as it arrives."""
        assert self.fallback is not None
        if self._fallback_session is None:
            self._fallback_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300), auto_decompress=False
            )
        skip = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        url = self.fallback + request.rel_url.raw_path_qs
        log.info("mockserver.forwarded", request=mask_secrets(asked.describe()), to=self.fallback)
        async with self._fallback_session.post(url, data=raw, headers=headers, allow_redirects=False) as upstream:
            keep = {"content-type", "x-streambus-stream"}
            response = web.StreamResponse(
                status=upstream.status, headers={k: v for k, v in upstream.headers.items() if k.lower() in keep}
            )
            await response.prepare(request)
            self._log(request, model, upstream.status, None, True, asked)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                log.info("mockserver.client_gone", path=request.path, model=model)
        return response

    async def _stream(
        self,
        request: web.Request,
        fmt: WireFormat,
        route: str,
        body: Mapping[str, Any],
        answer: _Answer,
        model: str,
        asked: RecordedRequest,
    ) -> web.StreamResponse:
        encoder = fmt.stream_encoder(route, body)
        response = web.StreamResponse(status=200, headers={"Content-Type": encoder.content_type})
        await response.prepare(request)
        self._log(request, model, 200, answer.events[0].stream, True, asked)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            for event, offset in zip(answer.events, answer.offsets, strict=True):
                if not self.burst:
                    delay = t0 + offset / self.speed - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                data = encoder.encode(event)
                if data:
                    await response.write(data)
            tail = encoder.close()
            if tail:
                await response.write(tail)
            await response.write_eof()
        except ConnectionResetError:
            log.info("mockserver.client_gone", path=request.path, model=model)
        return response

    # -- running --------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:PORT``) once started; OpenAI clients add ``/v1``."""
        if self._url is None:
            raise RuntimeError("the mock server is not running; use `async with` or start() first")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving on *host*:*port* (0 = a free port) in the running asyncio loop; return the URL."""
        AsyncioRequired.check(
            "MockServer.start()",
            needs="aiohttp",
            hint="use `with server.running() as url:` to serve from a background thread instead",
        )
        if self._server is not None:
            raise RuntimeError("the mock server is already running")
        server = AppServer(host, port)
        try:
            self._url = await server.start(self.app(), shutdown_timeout=1.0)
        except BaseException:
            await server.close()
            raise
        self._server = server
        log.info("mockserver.started", url=self._url, models=self.models, formats=list(self.formats))
        return self._url

    async def close(self) -> None:
        """Stop serving (in-flight responses are cut off)."""
        server, self._server = self._server, None
        if server is not None:
            await server.close()
        session, self._fallback_session = self._fallback_session, None
        if session is not None:
            await session.close()
        self._url = None

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve from a background thread with its own event loop; yield the base URL.

        Works from synchronous tests and from async ones under any backend,
        since the server never shares the caller's loop.
        """
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        stop = threading.Event()
        loops: list[asyncio.AbstractEventLoop] = []

        def serve() -> None:
            # The thread owns its loop and its (empty) context from start to close.
            loop = asyncio.new_event_loop()
            loops.append(loop)
            try:
                try:
                    started.set_result(loop.run_until_complete(self.start(host, port)))
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                if not stop.is_set():
                    loop.run_forever()
                loop.run_until_complete(self.close())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        thread = threading.Thread(target=serve, name="streambus-mockserver", daemon=True)
        thread.start()
        try:
            yield started.result(timeout=30)
        finally:
            stop.set()
            if loops and not loops[0].is_closed():
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loops[0].call_soon_threadsafe(loops[0].stop)
            thread.join(timeout=30)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
