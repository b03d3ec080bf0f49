"""The ``http`` sink: serve the bus's streams over HTTP, standalone (aiohttp).

::

    [[sinks]]
    type = "http"
    host = "127.0.0.1"
    port = 8090
    cors_origins = ["http://localhost:3000"]
    allowed_hosts = ["streams.example.com"]

Routes are those of :func:`streambus_http.aio.add_routes`; every request first
meets :func:`streambus_http.aio.origin_guard` (``Host`` must be one of the
sink's names, ``Origin`` one of ``cors_origins`` or the sink's own). aiohttp is
bound to asyncio: under trio the sink fails at start with a clear error.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import structlog
from aiohttp import web

from streambus import Bus, PluginBase, Subscription
from streambus.access import OriginPolicy, is_loopback_host
from streambus.plugins import NonNegativeFloat, PositiveFloat, PositiveInt
from streambus.serving import AppServer, server_logger
from streambus.tokens import Authenticator, TokenVerifier, check_jwt_settings, verifier_from_settings

from ._hub import StreamHub
from ._serve import UNKNOWN_STREAM_TIMEOUT
from .aio import _require_asyncio, add_routes, origin_guard

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
        jwt_secret_env: str | None = None
        """Environment variable holding the HMAC secret that scoped tokens (JWT) are verified with."""
        jwt_secret_file: str | None = None
        """File holding that secret (whitespace stripped); instead of ``jwt_secret_env``."""
        jwt_public_key_file: str | None = None
        """PEM public key (RSA, EC, Ed25519) that scoped tokens are verified with."""
        jwt_algorithms: list[str] = msgspec.field(default_factory=list)
        """Accepted token algorithms (default: HS256 with a secret, RS256/ES256/EdDSA after the key's type)."""
        jwt_leeway: NonNegativeFloat = 5.0
        """Seconds of clock skew tolerated on a token's ``exp``/``nbf``/``iat`` (0-300)."""
        jwt_audience: str | None = None
        """When set, every token must carry this ``aud``."""
        jwt_issuer: str | None = None
        """When set, every token must carry this ``iss``."""
        allow_public_without_token: bool = False
        """Bind a non-loopback ``host`` without a ``token`` (every stream readable by anyone who can connect)."""
        cors_origins: list[str] = msgspec.field(default_factory=list)
        """Browser origins allowed to read (``*`` for any); other pages' requests get 403."""
        allowed_hosts: list[str] = msgspec.field(default_factory=list)
        """Names the sink is reached by besides the loopback names and ``host`` (``*``: any).

        Requests with another ``Host`` get 403 (DNS rebinding)."""
        per_stream: PositiveInt = 10_000
        """Events kept per stream for late readers and ``Last-Event-ID`` resume."""
        max_streams: PositiveInt = 1000
        """Ended streams kept in the history."""
        max_events: PositiveInt = 100_000
        """Events kept in the global log that filter readers resume from."""
        start_timeout: PositiveFloat = 30.0
        """Seconds a request for the live or next stream of a filter (a model, a chat) waits for one (then 404)."""
        unknown_stream_timeout: PositiveFloat = UNKNOWN_STREAM_TIMEOUT
        """Seconds a request naming a stream id the history does not hold waits for it to start (then 404)."""
        keepalive: PositiveFloat = 15.0
        """Seconds of silence before an SSE keepalive comment."""
        retry_ms: PositiveInt = 3000
        """The SSE ``retry`` field: the browser's reconnect delay."""
        write_interval: NonNegativeFloat = 0.005
        """Least seconds between two writes to one client: tokens arriving meanwhile share a write (0: none)."""
        chat_meta_key: str = "chat"
        """The ``start.meta`` tag that ``POST /api/chat`` matches the AI SDK chat id against."""
        allow_stop: bool = True
        """Serve ``POST /streams/{id}/abort`` and ``POST /api/chat/{id}/abort`` (with ``token``, only to its bearer)."""

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
            for key in ("start_timeout", "unknown_stream_timeout", "keepalive"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
            if self.token is not None and not self.token:
                raise ValueError("token: must not be empty (leave it out to serve without a token)")
            check_jwt_settings(self)
            has_jwt = bool(self.jwt_secret_env or self.jwt_secret_file or self.jwt_public_key_file)
            if (
                self.token is None
                and not has_jwt
                and not self.allow_public_without_token
                and not is_loopback_host(self.host)
            ):
                raise ValueError(
                    f"host: binding {self.host or 'every interface'!r} without a token would expose every stream; "
                    "set token or a jwt_* key, bind 127.0.0.1, or set allow_public_without_token = true"
                )
            try:
                OriginPolicy(bind_host=self.host, allowed_hosts=self.allowed_hosts, allowed_origins=self.cors_origins)
            except ValueError as exc:
                raise ValueError(str(exc).replace("allowed_origins", "cors_origins")) from None
            for name in self.allowed_hosts:
                if not name.strip():
                    raise ValueError("allowed_hosts: a name must not be empty")

    overflow = "coalesce"
    buffer = 4096

    def __init__(
        self, options: Options | None = None, *, verifier: TokenVerifier | None = None, **keywords: Any
    ) -> None:
        self.options: HttpSink.Options = self.resolve_options(options, keywords)
        self._verifier = verifier
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

    def preflight(self) -> None:
        """Check that the ``jwt_*`` secret or public key loads; nothing is opened for serving."""
        self.authenticator()

    def authenticator(self) -> Authenticator:
        """The credentials this sink accepts: its static ``token`` and its scoped-token verifier.

        Raises :class:`ValueError` naming the option when a ``jwt_*`` source
        cannot be read (never the secret itself).
        """
        opts = self.options
        verifier = self._verifier or verifier_from_settings(opts)
        return Authenticator([opts.token] if opts.token else (), verifier)

    def make_app(self, port: int | None = None) -> web.Application:
        """The aiohttp application with every route, behind the Host/Origin guard (to embed in a larger server).

        *port* is the port it is served on (``None``: unknown, then a same-origin
        page may be on any port).
        """
        opts = self.options
        policy = OriginPolicy(
            bind_host=opts.host, port=port, allowed_hosts=opts.allowed_hosts, allowed_origins=opts.cors_origins
        )
        app = web.Application(middlewares=[origin_guard(policy)])
        add_routes(
            app,
            self.hub,
            prefix=opts.prefix,
            auth=self.authenticator(),
            cors_origins=opts.cors_origins,
            chat_meta_key=opts.chat_meta_key,
            start_timeout=opts.start_timeout,
            unknown_stream_timeout=opts.unknown_stream_timeout,
            keepalive=opts.keepalive,
            retry_ms=opts.retry_ms,
            write_interval=opts.write_interval,
            allow_stop=opts.allow_stop,
        )
        return app

    async def setup(self, bus: Bus) -> None:
        """Check the event loop before serving (aiohttp needs asyncio)."""
        _require_asyncio()
        self.hub.bus = bus

    async def run(self, events: Subscription) -> None:
        """Serve HTTP while recording events into the hub; stop when the bus closes."""
        _require_asyncio()
        server = AppServer(self.options.host, self.options.port)
        try:
            app = self.make_app(server.port)
            await server.start(app, handler_cancellation=True, logger=server_logger("streambus.http.server"))
            self.port = server.port
            log.info("http.serving", url=self.url)
            if self._started is not None:
                self._started.set()
            await self.hub.run(events)
        finally:
            self.hub.close()
            await server.close()
            self.port = None
