"""The ``http`` sink: serve the bus's streams over HTTP, standalone (aiohttp).

::

    [[sinks]]
    type = "http"
    host = "127.0.0.1"
    port = 8090
    cors_origins = ["http://localhost:3000"]

Routes are those of :func:`streambus_http.aio.add_routes`. aiohttp is bound to
asyncio: under trio the sink fails at start with a clear error.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import structlog
from aiohttp import web

from streambus import Bus, PluginBase, Subscription
from streambus.plugins import NonNegativeFloat, PositiveFloat, PositiveInt

from ._hub import StreamHub
from .aio import _require_asyncio, add_routes

__all__ = ["HttpSink"]

log = structlog.get_logger("streambus.http")


class HttpSink(PluginBase):
    """Serve every bus stream as SSE, text, NDJSON, AI SDK UI stream and OpenAI chunks over HTTP.

    Build it from Python with keywords (``HttpSink(port=0)``) or an
    ``Options``; after it started, :attr:`url` is where it listens.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``http`` sink."""

        host: str = "127.0.0.1"
        port: int = 8090
        """TCP port; 0 picks a free one (see :attr:`HttpSink.url`)."""
        prefix: str = ""
        """Path prefix of every route, e.g. ``/bus``."""
        token: str | None = None
        """Bearer token every request must present (header, or ``?token=``)."""
        cors_origins: list[str] = msgspec.field(default_factory=list)
        """Browser origins allowed to read (``*`` for any)."""
        per_stream: PositiveInt = 10_000
        """Events kept per stream for late readers and ``Last-Event-ID`` resume."""
        max_streams: PositiveInt = 1000
        """Ended streams kept in the history."""
        max_events: PositiveInt = 100_000
        """Events kept in the global log that filter readers resume from."""
        start_timeout: PositiveFloat = 30.0
        """Seconds a request waits for a stream that has not started (then 404)."""
        keepalive: PositiveFloat = 15.0
        """Seconds of silence before an SSE keepalive comment."""
        retry_ms: PositiveInt = 3000
        """The SSE ``retry`` field: the browser's reconnect delay."""
        write_interval: NonNegativeFloat = 0.005
        """Least seconds between two writes to one client: tokens arriving meanwhile share a write (0: none)."""
        chat_meta_key: str = "chat"
        """The ``start.meta`` tag that ``POST /api/chat`` matches the AI SDK chat id against."""

        def __post_init__(self) -> None:
            if not 0 <= self.port <= 65535:
                raise ValueError(f"port: must be between 0 and 65535, got {self.port}")
            if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
                raise ValueError(f"prefix: must start with '/' and not end with it, got {self.prefix!r}")
            for key in ("per_stream", "max_streams", "max_events", "retry_ms"):
                if getattr(self, key) < 1:
                    raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
            if self.write_interval < 0:
                raise ValueError(f"write_interval: must not be negative, got {self.write_interval}")
            for key in ("start_timeout", "keepalive"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
            if self.token is not None and not self.token:
                raise ValueError("token: must not be empty (leave it out to serve without a token)")

    overflow = "coalesce"
    buffer = 4096

    def __init__(self, options: Options | None = None, **keywords: Any) -> None:
        if options is not None and keywords:
            raise TypeError("pass either an Options or keywords, not both")
        self.options = options or self.Options(**keywords)
        opts = self.options
        self.hub = StreamHub(per_stream=opts.per_stream, max_streams=opts.max_streams, max_events=opts.max_events)
        self.port: int | None = None
        """The bound port once serving."""
        self._started: anyio.Event | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server (with the prefix)."""
        if self.port is None:
            raise RuntimeError("the http sink is not serving yet; await started() first")
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{self.options.prefix}"

    async def started(self) -> str:
        """Wait until the server listens; return :attr:`url`."""
        if self.port is None:
            if self._started is None:
                self._started = anyio.Event()
            await self._started.wait()
        return self.url

    def make_app(self) -> web.Application:
        """The aiohttp application with every route (to embed in a larger server)."""
        opts = self.options
        app = web.Application()
        add_routes(
            app,
            self.hub,
            prefix=opts.prefix,
            token=opts.token,
            cors_origins=opts.cors_origins,
            chat_meta_key=opts.chat_meta_key,
            start_timeout=opts.start_timeout,
            keepalive=opts.keepalive,
            retry_ms=opts.retry_ms,
            write_interval=opts.write_interval,
        )
        return app

    async def setup(self, bus: Bus) -> None:
        """Check the event loop before serving (aiohttp needs asyncio)."""
        _require_asyncio()
        self.hub.bus = bus

    async def run(self, events: Subscription) -> None:
        """Serve HTTP while recording events into the hub; stop when the bus closes."""
        _require_asyncio()
        runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.options.host, self.options.port)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.options.port
            log.info("http.serving", url=self.url)
            if self._started is not None:
                self._started.set()
            await self.hub.run(events)
        finally:
            self.hub.close()
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5):
                    await runner.cleanup()
            self.port = None
