"""The ``websocket`` sink: broadcast bus events to WebSocket clients.

::

    async with Bus() as bus:
        sink = WebSocketSink(port=8765)
        bus.add_sink(sink)
        url = await sink.wait_ready()      # "ws://127.0.0.1:8765/ws"
        ...

Each event is encoded once. The sink takes events from the bus in batches
(everything published since it last ran) and writes only through websockets'
public API: under asyncio, the clients of an event that have write credit
(see :mod:`streambus_websocket.client`) get it in one
``websockets.asyncio.server.broadcast()`` call; every other client queues it
in its own bounded :class:`~streambus.coalesce.Coalescer`, drained by a
per-client sender with ``await ws.send()`` (the backpressure), and is closed
with the *lagged* close code past ``client_buffer_bytes``. Under trio every
frame goes through that queue. A bounded per-stream history
(:class:`streambus.history.StreamHistory`) serves recovery (``since``) and
snapshots. The same server answers ``GET /`` with the live page.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import operator
import os
import secrets
import socket
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import sniffio
import structlog
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED

from streambus import (
    AbortEvent,
    Bus,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    Filter,
    Overflowed,
    PluginBase,
    StartEvent,
    StopFailed,
    StopOutcome,
    StreamBusError,
    Subscription,
    encode_each,
    is_terminal,
)
from streambus.access import OriginPolicy, is_loopback_host, split_host_port
from streambus.archive import add_interest, archive_of
from streambus.plugins import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, require_readable_file
from streambus.tokens import (
    Authenticator,
    OutOfScope,
    Scope,
    TokenError,
    TokenVerifier,
    bearer_credential,
    check_jwt_settings,
    verifier_from_settings,
)

from .client import Client
from .history import History
from .protocol import (
    PROTOCOL_VERSION,
    Abort,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    control_frame,
    error_frame,
    parse_client_message,
)

__all__ = ["BroadcasterError", "WebSocketSink"]

log = structlog.get_logger("streambus.websocket")

_VERSION = "0.1.0"
_TERMINAL = frozenset({EndEvent, ErrorEvent, AbortEvent})
_ONLY_DELTAS = {DeltaEvent}
_stream_of = operator.attrgetter("stream")
_first = operator.itemgetter(0)
# Each connection's write buffer high-water mark (twice websockets' default): send() waits above
# it. A client's broadcast() credit (32 KiB, client.py) comes on top: 96 KiB at most, plus a frame.
_WRITE_LIMIT = 65536
# The page is one self-contained file: inline script and style, sockets to this host only.
_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"


class BroadcasterError(StreamBusError):
    """The broadcaster could not start (port in use, token missing, ...); the message says what to fix."""


def _host_name(value: str) -> bool:
    try:
        _name, port = split_host_port(value)
    except ValueError:
        return False
    return port is None


class WebSocketSink(PluginBase):
    """Broadcast events to WebSocket clients, with recovery, snapshots and a live page.

    Build it from options (``WebSocketSink(WebSocketSink.Options(port=0))``)
    or keywords (``WebSocketSink(port=0, token="s3cret")``), add it with
    ``bus.add_sink(sink)``, then ``await sink.wait_ready()`` for its URL.
    The protocol is described in ``docs/websocket-protocol.md``.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``websocket`` sink (see ``docs/plugins/websocket.md``)."""

        host: str = "127.0.0.1"
        port: int = 8765
        path: str = "/ws"
        token_env: str | None = None
        tokens_file: str | None = None
        jwt_secret_env: str | None = None
        jwt_secret_file: str | None = None
        jwt_public_key_file: str | None = None
        jwt_algorithms: list[str] = []
        jwt_leeway: NonNegativeFloat = 5.0
        jwt_audience: str | None = None
        jwt_issuer: str | None = None
        allow_public_without_token: bool = False
        allowed_origins: list[str] = []
        allowed_hosts: list[str] = []
        max_clients: PositiveInt = 2000
        max_message_bytes: PositiveInt = 65536
        max_message_rate: PositiveFloat = 20.0
        max_subscriptions: PositiveInt = 16
        max_subscribe_streams: PositiveInt = 256
        client_buffer_bytes: PositiveInt = 1048576
        history_events: NonNegativeInt = 2000
        history_ttl: NonNegativeFloat = 300.0
        history_streams: PositiveInt = 10000
        ping_interval: PositiveFloat | None = 20.0
        ping_timeout: PositiveFloat | None = 20.0
        close_timeout: NonNegativeFloat = 5.0
        socket_send_buffer: PositiveInt | None = None
        compression: bool = False
        page: bool = True
        allow_stop: bool = True

        def __post_init__(self) -> None:
            if not 0 <= self.port <= 65535:
                raise ValueError(f"port: must be within 0-65535, got {self.port}")
            if not self.path.startswith("/") or "?" in self.path:
                raise ValueError(f"path: must start with '/' and have no query, got {self.path!r}")
            if self.page and self.path in ("/", "/index.html"):
                raise ValueError("path: '/' serves the live page; use another path or set page = false")
            for key in (
                "max_clients",
                "max_message_bytes",
                "max_subscriptions",
                "max_subscribe_streams",
                "client_buffer_bytes",
            ):
                if getattr(self, key) < 1:
                    raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
            if self.history_events < 0 or self.history_streams < 1:
                raise ValueError("history_events: must be >= 0 (and history_streams >= 1)")
            if self.max_message_rate <= 0:
                raise ValueError(f"max_message_rate: must be positive, got {self.max_message_rate}")
            if self.socket_send_buffer is not None and self.socket_send_buffer < 4096:
                raise ValueError(f"socket_send_buffer: must be at least 4096 bytes, got {self.socket_send_buffer}")
            for key in ("history_ttl", "close_timeout"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
            for key in ("ping_interval", "ping_timeout"):
                value = getattr(self, key)
                if value is not None and value <= 0:
                    raise ValueError(f"{key}: must be positive or omitted (no keepalive), got {value}")
            for origin in self.allowed_origins:
                if origin != "*" and not origin.startswith(("http://", "https://")):
                    raise ValueError(f"allowed_origins: {origin!r} must be '*' or start with http:// or https://")
            for name in self.allowed_hosts:
                if name != "*" and not _host_name(name):
                    raise ValueError(f"allowed_hosts: {name!r} must be '*' or a host name (no scheme, port or path)")
            if self.token_env is not None and not self.token_env:
                raise ValueError("token_env: must name an environment variable")
            check_jwt_settings(self)

        @property
        def has_jwt_source(self) -> bool:
            """Whether scoped tokens are accepted (a secret or a public key to verify them is configured)."""
            return bool(self.jwt_secret_env or self.jwt_secret_file or self.jwt_public_key_file)

        @property
        def has_token_source(self) -> bool:
            """Whether a token is configured (``token_env``, ``tokens_file`` or a ``jwt_*`` key)."""
            return bool(self.token_env or self.tokens_file) or self.has_jwt_source

    overflow: ClassVar[str] = "coalesce"
    """Never ``block``: the bus must not wait for this sink, whatever its clients do.

    The sink's own loop never awaits a client (it hands frames to sockets or
    per-client queues synchronously), so it keeps up; if the loop is ever
    too busy to run it, deltas coalesce (the text stays whole) instead of
    slowing every producer and every other sink.
    """
    buffer: ClassVar[int] = 4096

    def preflight(self) -> None:
        """Check the token sources (``tokens_file`` holds a token, ``jwt_*`` keys load); nothing is served."""
        self._verifier_from_options()
        path = self.options.tokens_file
        if path:
            require_readable_file("tokens_file", path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"tokens_file: cannot read {path}: {exc}") from None
            if not any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines()):
                raise ValueError(f"tokens_file: {path} holds no token (one per line)")

    def __init__(
        self,
        options: Options | None = None,
        *,
        token: str | Iterable[str] | None = None,
        verifier: TokenVerifier | None = None,
        **kwargs: Any,
    ) -> None:
        self.options: WebSocketSink.Options = self.resolve_options(options, kwargs)
        self._tokens: list[bytes] | None = None
        self._verifier = verifier
        self._auth = Authenticator()
        if token is not None:
            given = [token] if isinstance(token, str) else list(token)
            if not given or not all(given):
                raise ValueError("token: must be a non-empty string")
            self._tokens = [t.encode() for t in given]
        opts = self.options
        if not (
            is_loopback_host(opts.host)
            or opts.has_token_source
            or token is not None
            or verifier is not None
            or opts.allow_public_without_token
        ):
            raise ValueError(
                f"host: binding {opts.host or 'every interface'!r} without a token would expose every stream; "
                "set token_env, tokens_file or a jwt_* key, or allow_public_without_token = true"
            )
        self.history = History(opts.history_events, opts.history_ttl, opts.history_streams, anyio.current_time)
        """The per-stream history recovery and snapshots are served from."""
        # Host and Origin are judged against the server's own names, never the request's Host.
        self._policy = OriginPolicy(
            bind_host=opts.host, allowed_hosts=opts.allowed_hosts, allowed_origins=opts.allowed_origins
        )
        self._clients: dict[Client, None] = {}
        self._wanted: _Wanted | None = None  # every client's filters, for wants(); None: rebuild (they changed)
        self._routes: dict[str, dict[Client, None]] = {}
        self._bus: Bus | None = None
        self._early: dict[str, StartEvent] = {}
        # Streams filled from the engine (see _consult_archive): their events up to this seq come again, dropped.
        self._filled: OrderedDict[str, int] = OrderedDict()
        self._ready: anyio.Event | None = None
        self._port: int | None = None
        self._start_error: BaseException | None = None
        # websockets.asyncio.server.broadcast under asyncio; trio queues every frame instead.
        self._write_many: Callable[..., None] | None = None
        self._page: bytes | None = None
        self._session = secrets.token_hex(8)
        self.events = 0
        """Events broadcast so far."""

    # -- public surface ---------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``); raises before the server is ready."""
        if self._port is None:
            raise BroadcasterError("the broadcaster is not listening yet; await wait_ready() first")
        return self._port

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        host = self.options.host
        if ":" in host:
            host = f"[{host}]"
        elif host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        return f"ws://{host}:{self.port}{self.options.path}"

    @property
    def page_url(self) -> str:
        """The URL of the live page."""
        return "http" + self.url.removeprefix("ws").removesuffix(self.options.path) + "/"

    @property
    def clients(self) -> int:
        """How many clients are connected (not counting those being closed)."""
        return sum(1 for client in self._clients if client.close_code is None)

    @property
    def connections(self) -> list[Client]:
        """The connected clients, with their counters (``sent``, ``merged``, ``queued_bytes``)."""
        return list(self._clients)

    async def wait_ready(self) -> str:
        """Wait until the server listens; return its WebSocket URL.

        Raises :class:`BroadcasterError` if it could not start.
        """
        if self._ready is None:
            self._ready = anyio.Event()
        await self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        return self.url

    def close_clients(self, code: CloseCode = CloseCode.SERVICE_RESTART, reason: str = "server restart") -> int:
        """Close every connection with *code* (clients should reconnect and resume); return how many."""
        clients = list(self._clients)
        for client in clients:
            client.close(code, reason)
        return len(clients)

    # -- sink protocol --------------------------------------------------------------------
    async def setup(self, bus: Bus) -> None:
        """Remember the streams already live: they are routed by their ``start``."""
        self._bus = bus
        # Copied now: such a stream may end before its first event here is dispatched.
        self._early = dict(bus.live_streams)
        # A distributed source on this bus reads only the streams some sink wants (streambus.archive).
        add_interest(bus, self)

    def wants(self, start: StartEvent) -> bool:
        """Whether a connected client's subscription matches the stream *start* begins.

        The :class:`streambus.archive.Interest` of this sink: a distributed
        source (Redis ``per_stream``) reads a stream's events only if some
        sink on the bus wants it.
        """
        # An interest edge asks this for every start in its index (1,000 live streams x every client's
        # filters): the filters are indexed once per change of them, not walked per start.
        wanted = self._wanted
        if wanted is None:
            wanted = self._wanted = _Wanted(flt for client in self._clients for flt in client.subscriptions.values())
        return wanted.matches(start)

    async def run(self, events: Subscription) -> None:
        """Serve clients and broadcast *events* until the subscription ends."""
        if self._ready is None:
            self._ready = anyio.Event()
        self._start_error = None
        try:
            self._load_tokens()
            self._page = self._load_page()
        except BroadcasterError as exc:
            self._start_error = exc
            self._ready.set()
            raise
        backend = sniffio.current_async_library()
        if backend == "trio":
            await self._run_trio(events)
        else:
            await self._run_asyncio(events)

    def _serve_kwargs(self) -> dict[str, Any]:
        opts = self.options
        return {
            "process_request": self._process_request,
            "compression": "deflate" if opts.compression else None,
            "max_size": opts.max_message_bytes,
            "ping_interval": opts.ping_interval,
            "ping_timeout": opts.ping_timeout,
            "close_timeout": opts.close_timeout,
            "server_header": f"streambus-websocket/{_VERSION}",
        }

    async def _run_asyncio(self, events: Subscription) -> None:
        from websockets.asyncio.server import broadcast, serve

        self._write_many = broadcast
        try:
            server = await serve(
                self._handle,
                self.options.host or None,
                self.options.port,
                write_limit=_WRITE_LIMIT,
                **self._serve_kwargs(),
            )
        except OSError as exc:
            raise self._fail_start(exc) from exc
        async with server:
            self._listening([sock.getsockname() for sock in server.sockets])
            try:
                await self._pump(events)
            finally:
                await self._drain()
        self._port = None

    async def _run_trio(self, events: Subscription) -> None:
        import trio
        from websockets.trio.server import serve

        async with trio.open_nursery() as nursery:
            try:
                server = await nursery.start(
                    functools.partial(
                        serve, self._handle, self.options.port, host=self.options.host or None, **self._serve_kwargs()
                    )
                )
            except OSError as exc:
                raise self._fail_start(exc) from exc
            try:
                self._listening([listener.socket.getsockname() for listener in server.listeners])
                await self._pump(events)
            finally:
                await self._drain()
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self.options.close_timeout + 1
                    await server.aclose()
        self._port = None

    def _fail_start(self, exc: OSError) -> BroadcasterError:
        where = f"{self.options.host}:{self.options.port}"
        if exc.errno == errno.EADDRINUSE:
            error = BroadcasterError(
                f"cannot listen on {where}: the port is in use (choose another, or 0 for a free one)"
            )
        else:
            error = BroadcasterError(f"cannot listen on {where}: {exc}")
        error.__cause__ = exc  # the OSError, for callers that react to its errno
        self._start_error = error
        assert self._ready is not None
        self._ready.set()
        return error

    def _listening(self, names: list[Any]) -> None:
        self._port = int(names[0][1])
        self._policy = self._policy.with_port(self._port)
        log.info("websocket.listening", url=self.url, page=self.page_url if self.options.page else None)
        assert self._ready is not None
        self._ready.set()

    async def _pump(self, events: Subscription) -> None:
        own: Subscription | None = None
        try:
            while True:
                try:
                    batch = await events.receive_batch()
                except Overflowed as exc:
                    if self._bus is None or not self._bus.running:
                        raise
                    events = own = self._resubscribe(self._bus, events, exc)
                    continue
                if not batch:
                    return
                self._dispatch(batch)
        finally:
            if own is not None:
                own.close()

    def _resubscribe(self, bus: Bus, lost: Subscription, exc: Overflowed) -> Subscription:
        """Start over after the sink's own subscription overflowed (the loop was too busy to run it).

        Events were lost between the two subscriptions, so nothing may pretend
        otherwise: every client is told to reconnect, and the history is
        emptied, so a ``since`` over the gap answers ``recovered: false``.
        """
        log.error("websocket.fell_behind", error=str(exc), clients=len(self._clients))
        self.close_clients(CloseCode.SERVICE_RESTART, "the broadcaster fell behind the bus; reconnect")
        opts = self.options
        self.history = History(opts.history_events, opts.history_ttl, opts.history_streams, anyio.current_time)
        self._filled.clear()
        self._routes.clear()
        self._early = dict(bus.live_streams)
        return bus.subscribe(
            lost.filter,
            buffer=lost.buffer,
            overflow=lost.overflow,
            max_bytes=lost.max_bytes,
            name=lost.name,
            raw=lost.raw,
        )

    async def _drain(self) -> None:
        # Give connected clients what was already accepted, bounded in time.
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.options.close_timeout
            for client in list(self._clients):
                await client.wait_idle()

    def _verifier_from_options(self) -> TokenVerifier | None:
        """The scoped-token verifier; raises ``ValueError`` naming the ``jwt_*`` key (never the secret)."""
        opts = self.options
        if self._verifier is not None:
            return self._verifier
        return verifier_from_settings(opts)

    def _load_verifier(self) -> TokenVerifier | None:
        try:
            return self._verifier_from_options()
        except ValueError as exc:
            raise BroadcasterError(str(exc)) from None

    def _load_tokens(self) -> None:
        self._load_static_tokens()
        self._auth = Authenticator(self._tokens or (), self._load_verifier())

    def _load_static_tokens(self) -> None:
        opts = self.options
        if self._tokens is not None and not (opts.token_env or opts.tokens_file):
            return
        tokens: list[bytes] = list(self._tokens or [])
        if opts.token_env:
            value = os.environ.get(opts.token_env, "")
            if not value.strip():
                raise BroadcasterError(f"token_env: environment variable {opts.token_env} is not set or empty")
            tokens.extend(t.strip().encode() for t in value.split(",") if t.strip())
        if opts.tokens_file:
            try:
                lines = Path(opts.tokens_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise BroadcasterError(f"tokens_file: cannot read {opts.tokens_file}: {exc.strerror}") from None
            from_file = [ln.strip().encode() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not from_file:
                raise BroadcasterError(f"tokens_file: {opts.tokens_file} holds no token (one per line)")
            tokens.extend(from_file)
        self._tokens = tokens or None

    def _load_page(self) -> bytes:
        html = (files("streambus_websocket") / "static" / "index.html").read_text(encoding="utf-8")
        return html.replace("__STREAMBUS_WS_PATH__", msgspec.json.encode(self.options.path).decode()).encode()

    # -- HTTP: page, routing, origin -------------------------------------------------
    def _process_request(self, ws: Any, request: Request) -> Response | None:
        headers = request.headers
        # Before anything else, on every path: DNS rebinding (a foreign Host), foreign
        # origins and duplicate Host/Origin/Authorization headers are refused.
        refusal = self._policy.check(
            hosts=headers.get_all("Host"),
            origins=headers.get_all("Origin"),
            authorizations=len(headers.get_all("Authorization")),
        )
        if refusal is not None:
            peer = str(ws.remote_address[0]) if ws.remote_address else "?"
            log.warning("websocket.refused", peer=peer, status=refusal.status, reason=refusal.reason)
            phrase = "Bad Request" if refusal.status == 400 else "Forbidden"
            return _response(refusal.status, phrase, "text/plain; charset=utf-8", (refusal.reason + "\n").encode())
        path, _, _query = request.path.partition("?")
        upgrade = any("websocket" in value.lower() for value in headers.get_all("Upgrade"))
        if not upgrade:
            if self.options.page and path in ("/", "/index.html") and self._page is not None:
                return _response(200, "OK", "text/html; charset=utf-8", self._page)
            if path == "/healthz":
                return _response(200, "OK", "text/plain; charset=utf-8", b"ok\n")
            return _response(404, "Not Found", "text/plain; charset=utf-8", b"not found\n")
        if path != self.options.path:
            return _response(404, "Not Found", "text/plain; charset=utf-8", b"no WebSocket endpoint here\n")
        return None

    def _authenticate(self, request: Request) -> Scope:
        """The scope the request's credential grants; raises :class:`TokenError` (its reason is safe to send)."""
        if not self._auth.required:
            return self._auth.authenticate(None)
        # One value at most: _process_request refused duplicates before the upgrade.
        headers = request.headers.get_all("Authorization")
        tokens = urllib.parse.parse_qs(request.path.partition("?")[2]).get("token")
        return self._auth.authenticate(
            bearer_credential(headers[0] if headers else None, tokens[0] if tokens else None)
        )

    # -- one connection ----------------------------------------------------------------
    async def _handle(self, ws: Any) -> None:
        opts = self.options
        peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        try:
            token_scope = self._authenticate(ws.request)
        except TokenError as exc:
            # The reason is one of a few fixed sentences: never the token or the key.
            log.warning("websocket.unauthorized", peer=peer, reason=exc.reason)
            await self._refuse(ws, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED, exc.reason)
            return
        if len(self._clients) >= opts.max_clients:
            log.warning("websocket.too_many_clients", peer=peer, max_clients=opts.max_clients)
            await self._refuse(
                ws, ErrorCode.TOO_MANY_CLIENTS, CloseCode.TOO_MANY_CLIENTS, f"server full ({opts.max_clients} clients)"
            )
            return
        if opts.socket_send_buffer is not None:
            self._shrink_send_buffer(ws, opts.socket_send_buffer)
        client = Client(
            ws,
            buffer_bytes=opts.client_buffer_bytes,
            peer=peer,
            write_now=self._write_many,
            token_scope=token_scope,
        )
        hello = control_frame(
            "hello",
            protocol=PROTOCOL_VERSION,
            server=f"streambus-websocket/{_VERSION}",
            session=self._session,
            limits={
                "max_message_bytes": opts.max_message_bytes,
                "max_message_rate": opts.max_message_rate,
                "max_subscriptions": opts.max_subscriptions,
                "max_subscribe_streams": opts.max_subscribe_streams,
                "client_buffer_bytes": opts.client_buffer_bytes,
            },
            history={"events": opts.history_events, "ttl": opts.history_ttl},
        )
        try:
            await ws.send(hello, text=True)
        except ConnectionClosed:
            return
        self._clients[client] = None
        log.debug("websocket.connected", peer=peer, clients=len(self._clients))
        try:
            with anyio.CancelScope() as scope:
                client.scope = scope
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._send, client)
                    tg.start_soon(self._watchdog, client)
                    if token_scope.expires is not None:
                        tg.start_soon(self._expire, client, token_scope.expires)
                    await self._receive(client)
                    tg.cancel_scope.cancel()
        finally:
            self._forget(client)
        if client.close_code is not None:
            log.info("websocket.closing", peer=peer, code=int(client.close_code), reason=client.close_reason)
            lagged = client.close_code == CloseCode.LAGGED
            notice = error_frame(ErrorCode.LAGGED, client.close_reason) if lagged else None
            await self._close(ws, client.close_code, client.close_reason, notice)

    @staticmethod
    def _shrink_send_buffer(ws: Any, size: int) -> None:
        # The kernel would otherwise hide megabytes of backlog from the
        # per-client buffer (Linux autotunes send buffers up to tcp_wmem[2]).
        transport = getattr(ws, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else getattr(ws.stream, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    async def _send(self, client: Client) -> None:
        with contextlib.suppress(ConnectionClosed):
            await client.send_loop()
        # The peer is gone or closing: stop reading too.
        if client.scope is not None:
            client.scope.cancel()

    async def _expire(self, client: Client, expires: float) -> None:
        # A token is checked once, at the upgrade: its end (exp + leeway) closes the connection it opened.
        await anyio.sleep(max(0.0, expires - time.time()))
        log.info("websocket.token_expired", peer=client.peer)
        client.push(error_frame(ErrorCode.TOKEN_EXPIRED, "token expired; reconnect with a new token"))
        client.close(CloseCode.TOKEN_EXPIRED, "token expired", flush=True)

    async def _watchdog(self, client: Client) -> None:
        # A close requested while a frame is being written waits for that write,
        # but not longer than close_timeout.
        await client.closing.wait()
        await anyio.sleep(self.options.close_timeout)
        if client.scope is not None:
            client.scope.cancel()

    async def _refuse(self, ws: Any, error: ErrorCode, code: CloseCode, message: str) -> None:
        try:
            await ws.send(error_frame(error, message), text=True)
        except ConnectionClosed:
            return
        await self._close(ws, code, message)

    async def _close(self, ws: Any, code: CloseCode, reason: str, notice: bytes | None = None) -> None:
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.options.close_timeout + 1
            if notice is not None:
                # Queued behind whatever the socket still holds; the client reads it just before the close.
                with contextlib.suppress(Exception):
                    await ws.send(notice, text=True)
            closer = getattr(ws, "aclose", None) or ws.close

            async def discard() -> None:
                # Frames the client sent before our close must be read, or its
                # close frame stays stuck behind them until close_timeout.
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.recv()

            async with anyio.create_task_group() as tg:
                tg.start_soon(discard)
                with contextlib.suppress(ConnectionClosed):
                    await closer(int(code), reason[:120])
                tg.cancel_scope.cancel()
        if ws.state is not CLOSED:
            # websockets' close first waits for the peer to read what is buffered: a peer
            # that never reads would hold the connection, its buffers and its handler
            # forever, outside max_clients. Past the deadline, the socket goes.
            log.info("websocket.aborted", peer=str(ws.remote_address[0]) if ws.remote_address else "?")
            transport = getattr(ws, "transport", None)
            if transport is not None:
                transport.abort()
            else:
                import trio

                with anyio.CancelScope(shield=True):
                    await trio.aclose_forcefully(ws.stream)

    def _forget(self, client: Client) -> None:
        self._clients.pop(client, None)
        self._wanted = None
        for targets in self._routes.values():
            targets.pop(client, None)
        log.debug("websocket.disconnected", peer=client.peer, clients=len(self._clients))

    async def _receive(self, client: Client) -> None:
        opts = self.options
        rate = opts.max_message_rate
        burst = max(1.0, rate * 2)
        allowance = burst
        last = anyio.current_time()
        strikes = 0
        failed = False
        ws = client.ws
        try:
            while True:
                # recv(), not `async for`: leaving early must not strand an async generator.
                message = await ws.recv()
                now = anyio.current_time()
                allowance = min(burst, allowance + (now - last) * rate)
                last = now
                if allowance < 1:
                    strikes += 1
                    if strikes > burst:
                        client.close(CloseCode.RATE_LIMITED, f"more than {rate:g} messages/s", flush=True)
                        with anyio.move_on_after(opts.close_timeout):
                            await client.wait_idle()
                        return
                    client.push(error_frame(ErrorCode.RATE_LIMITED, f"message dropped: limit is {rate:g} messages/s"))
                    continue
                allowance -= 1
                strikes = 0
                if not isinstance(message, str):
                    client.push(error_frame(ErrorCode.BINARY_FRAME, "send JSON in text frames"))
                    continue
                try:
                    parsed = parse_client_message(message)
                    if type(parsed) is Abort:
                        await self._abort(client, parsed)
                    else:
                        if type(parsed) is Subscribe and archive_of(self._bus) is not None:
                            await self._consult_archive(parsed)
                            if client not in self._clients:
                                continue  # it left while the engine answered: the next recv() says how
                        self._on_message(client, parsed)
                except ProtocolError as exc:
                    client.push(error_frame(exc.code, exc.message, field=exc.field, id=exc.id))
                except Exception as exc:
                    # Logged here with its traceback, once per client: a client that keeps
                    # sending what fails must not flood the log. It only learns that it failed.
                    if not failed:
                        failed = True
                        log.error("websocket.handler_failed", peer=client.peer, error=repr(exc), exc_info=exc)
                    client.push(error_frame(ErrorCode.INTERNAL, "the server failed handling this message"))
        except ConnectionClosed:
            pass

    def _on_message(self, client: Client, message: ClientMessage) -> None:
        if type(message) is Subscribe:
            self._subscribe(client, message)
        elif type(message) is Unsubscribe:
            if message.id not in client.subscriptions:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_SUBSCRIPTION, f"no subscription with id {message.id!r}", id=message.id
                )
            del client.subscriptions[message.id]
            self._wanted = None
            for stream, targets in self._routes.items():
                if client in targets and not self._wants(client, stream):
                    del targets[client]
            client.push(control_frame("unsubscribed", id=message.id))
        elif type(message) is Ping:
            client.push(control_frame("pong", id=message.id))

    async def _consult_archive(self, message: Subscribe) -> None:
        """Before a subscribe is answered: get from the engine what this process's memory lacks.

        Each ``since`` stream the history cannot answer is fetched whole (all
        or nothing) and held in the history, then followed for what comes
        next; live streams the filter matches that this process does not read
        yet are followed. The subscribe itself is then answered from the
        history as always.
        """
        archive = archive_of(self._bus)
        opts = self.options
        if archive is None:
            return
        if len(set(message.streams or ()).union(message.since or ())) > opts.max_subscribe_streams:
            return  # refused by _subscribe, which names the limit
        history = self.history
        for stream, last_seq in (message.since or {}).items():
            if history.missed(stream, last_seq) is not None:
                continue
            events = await archive.fetch(stream)
            if events is None:
                continue  # answered "not recovered"
            if self.history.fill(events):
                self._filled[stream] = events[-1].seq
                self._filled.move_to_end(stream)
                while len(self._filled) > opts.history_streams:
                    self._filled.popitem(last=False)
            if not is_terminal(events[-1]):
                archive.follow(stream)
        flt = message.to_filter()
        wanted = (
            [start for start in archive.live_starts() if start.stream in flt.streams]
            if flt.streams
            else archive.live_starts()
        )
        for start in wanted:
            if self.history.get(start.stream) is None and flt.matches(start):
                archive.follow(start.stream)

    def may_stop(self, client: Client, stream: str) -> bool:
        """Whether *client* may stop *stream*: the one place this sink decides it (see :meth:`stop_refusal`)."""
        return self.stop_refusal(client, stream) is None

    def stop_refusal(self, client: Client, stream: str) -> str | None:
        """Why *client* may not stop *stream* (a reason safe to send), or ``None`` when it may.

        With ``allow_stop = false`` nobody may. A connection exists only after
        the handshake checked its token: a static token (or none configured)
        may stop any stream. A scoped token needs the stop right, and the
        stream within its scope, judged on the stream's ``start``; a stream
        this server knows no ``start`` of is refused alike, so the answer says
        nothing about streams outside the scope.
        """
        if not self.options.allow_stop:
            return "stopping streams is disabled on this server (allow_stop = false)"
        scope = client.token_scope
        if not scope.stop:
            return "this token may not stop streams (it lacks the stop right)"
        if scope.unrestricted:
            return None
        stream_log = self.history.get(stream)
        start = stream_log.start if stream_log is not None else None
        if start is None and self._bus is not None:
            start = self._bus.live_streams.get(stream)
        try:
            if start is None:
                raise OutOfScope(f"stream {stream[:64]!r} is outside this token's scope", streams=[stream])
            scope.check_stop(start)
        except OutOfScope as exc:
            return exc.message
        return None

    async def _abort(self, client: Client, message: Abort) -> None:
        stream = message.stream
        refusal = self.stop_refusal(client, stream)
        if refusal is not None:
            raise ProtocolError(ErrorCode.FORBIDDEN, refusal, field="stream", id=message.id)
        bus = self._bus
        if bus is None or not bus.running:
            raise ProtocolError(ErrorCode.STOP_FAILED, "the bus is not running", id=message.id)
        try:
            outcome = await bus.stop(stream, reason=message.reason or "stopped by a client", by="client")
        except StopFailed as exc:
            log.warning("websocket.stop_failed", peer=client.peer, stream=stream, error=str(exc))
            raise ProtocolError(
                ErrorCode.STOP_FAILED, f"the stop could not reach the stream's owner: {exc}", id=message.id
            ) from None
        if outcome is StopOutcome.UNKNOWN:
            stream_log = self.history.get(stream)
            if stream_log is not None and stream_log.ended:
                outcome = StopOutcome.ENDED
        log.info("websocket.stop", peer=client.peer, stream=stream, outcome=outcome.value)
        if outcome is StopOutcome.UNKNOWN:
            raise ProtocolError(
                ErrorCode.UNKNOWN_STREAM, f"no live stream {stream!r} to stop", field="stream", id=message.id
            )
        client.push(control_frame("aborted", id=message.id, stream=stream, outcome=outcome.value))

    def _wants(self, client: Client, stream: str) -> bool:
        log_ = self.history.get(stream)
        start = log_.start if log_ is not None else None
        return start is not None and any(f.matches(start) for f in client.subscriptions.values())

    def _subscribe(self, client: Client, message: Subscribe) -> None:
        opts = self.options
        if message.id in client.subscriptions:
            raise ProtocolError(
                ErrorCode.DUPLICATE_SUBSCRIPTION,
                f"subscription {message.id!r} exists; unsubscribe it first",
                id=message.id,
            )
        if len(client.subscriptions) >= opts.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {opts.max_subscriptions} subscriptions per client",
                id=message.id,
            )
        named = len(set(message.streams or ()).union(message.since or ()))
        if named > opts.max_subscribe_streams:
            raise ProtocolError(
                ErrorCode.TOO_MANY_STREAMS,
                f"a subscribe may name at most {opts.max_subscribe_streams} streams (streams and since together), "
                f"this one names {named}",
                field="since" if len(message.since or ()) > len(message.streams or ()) else "streams",
                id=message.id,
            )
        history = self.history
        history.expire()
        flt = self._scoped_filter(client.token_scope, message)
        # Streams this client already receives through another subscription.
        already = {stream for stream, targets in self._routes.items() if client in targets}
        live = [lg for lg in history.live() if lg.start is not None and flt.matches(lg.start)]
        new_live = [lg.start.stream for lg in live if lg.start is not None and lg.start.stream not in already]
        # What the replay will add to the client's queue. It is measured before anything is
        # gathered (StreamHistory.missed_size), and the measuring stops once it passes the
        # client's whole budget: a replay the server refuses costs it no copy of the history.
        frames: list[bytes] = []
        cost = 0
        unrecovered: list[str] = []
        recovering = message.since is not None
        recovered = False
        too_large = False
        replayed = 0
        snapshots = 0
        if message.since is not None:
            since = message.since
            # (stream, the last seq the client holds: -1 for all of it, None when it may not be replayed)
            asked: list[tuple[str, int | None]] = []
            for stream, last_seq in since.items():
                if stream in already:
                    continue
                stream_log = history.get(stream)
                if stream_log is not None and stream_log.start is not None and not flt.matches(stream_log.start):
                    continue
                if stream_log is not None and stream_log.start is None and not client.token_scope.unrestricted:
                    # Its start is unknown here, so its scope cannot be judged: the client reloads instead.
                    asked.append((stream, None))
                    continue
                asked.append((stream, last_seq))
            # Live streams the client never saw started while it was away: replay them whole.
            asked.extend((stream, -1) for stream in new_live if stream not in since)
            measured: list[tuple[str, int]] = []
            for stream, held in asked:
                size = None if held is None else history.missed_size(stream, held)
                if held is None or size is None:
                    unrecovered.append(stream)
                    continue
                measured.append((stream, held))
                cost += Client.cost_of(*size)
                if cost > client.buffer_bytes:
                    too_large = True
                    break
            recovered = not unrecovered and not too_large
            if recovered:
                for stream, held in measured:
                    frames.extend(history.missed(stream, held) or ())  # measured just now: never None
                replayed = len(frames)
            else:
                if too_large:
                    # It could never fit, even in an empty buffer: reload instead (all or nothing).
                    unrecovered = [stream for stream, _ in asked]
                cost = 0
        # A page that opens after streams ended still shows them; a resuming client asks for what it missed
        # instead. They count toward the budget like a replay: gathering stops before they would not fit.
        # The newest are kept when not all fit; they are sent in the order they ended.
        recent: list[list[bytes]] = []
        if message.recent and not recovering:
            for whole in reversed(history.recently_ended(message.recent, flt.matches)):
                whole_cost = Client.cost(whole)
                if cost + whole_cost > client.room:
                    break
                cost += whole_cost
                recent.append(whole)
            recent.reverse()
            for whole in recent:
                frames.extend(whole)
        if message.snapshot and not (recovering and recovered):
            for stream in new_live:
                snap = history.snapshot(stream)
                if snap is not None:
                    frames.extend(snap)
                    cost += Client.cost(snap)
                    snapshots += 1
        client.subscriptions[message.id] = flt
        self._wanted = None
        for stream in new_live:
            self._routes.setdefault(stream, {})[client] = None
        client.push(
            control_frame(
                "subscribed",
                id=message.id,
                recovering=recovering,
                recovered=recovered,
                replayed=replayed,
                snapshot=snapshots,
                recent=len(recent),
                streams=[lg.start.stream for lg in live if lg.start is not None],
                unrecovered=unrecovered or None,
                reason="too_large" if too_large else None,
            )
        )
        budget = client.buffer_bytes
        if client.replayed + cost > budget:
            # The kernel's socket buffers (megabytes) hide what a client has not read, so
            # replays are also capped per connection: asking again and again for replays
            # it never reads makes a client pay a reconnect per budget of them.
            client.close(
                CloseCode.LAGGED,
                f"replays on this connection would pass client_buffer_bytes ({client.replayed} + {cost} > "
                f"{budget} bytes); reconnect to resume",
            )
            return
        if cost > client.room:
            # Counted like any backlog: a client that does not read its replays is lagged.
            client.close(
                CloseCode.LAGGED,
                f"the events this subscribe replays ({cost} bytes) do not fit in what is left of "
                f"client_buffer_bytes ({client.room} of {budget})",
            )
            return
        client.replayed += cost
        client.push_many(frames)

    def _scoped_filter(self, scope: Scope, message: Subscribe) -> Filter:
        """The subscription's filter narrowed to the token's scope; ``forbidden`` when it asks for more.

        Streams named by id (``streams`` and ``since``) must be within the
        token's ids, and, when the server holds their ``start``, match its
        meta; a meta value asked for must be one the token allows. Anything
        left open is closed to the scope, so a wildcard subscription of a
        tenant's token only ever sees that tenant's streams.
        """
        flt = message.to_filter()
        if scope.unrestricted:
            return flt
        named = set(message.streams or ()).union(message.since or ())
        try:
            scope.check_ids(named)
            for stream in sorted(named):
                stream_log = self.history.get(stream)
                if stream_log is not None and stream_log.start is not None:
                    scope.check_read(stream_log.start)
            return scope.narrow(flt)
        except OutOfScope as exc:
            field = (
                "meta"
                if exc.meta is not None
                else ("streams" if set(exc.streams) & set(message.streams or ()) else "since")
            )
            raise ProtocolError(ErrorCode.FORBIDDEN, exc.message, field=field, id=message.id) from None

    # -- the hot path -------------------------------------------------------------------
    def _dispatch(self, batch: list[Event]) -> None:
        self.events += len(batch)
        payloads = encode_each(batch)
        if len(batch) == 1 or self._write_many is None:
            for event, data in zip(batch, payloads, strict=True):
                self._dispatch_one(event, data)
            return
        # Runs of one stream's tokens (the batch holds everything published since the sink
        # last ran) are recorded and written once per run (see _deliver_run), in batch order.
        at = 0
        for _stream, group in itertools.groupby(batch, _stream_of):
            events: list[Any] = list(group)
            end = at + len(events)
            if set(map(type, events)) == _ONLY_DELTAS:
                self._dispatch_run(events, payloads[at:end])
            else:
                # A start or an end among them: each on its own, the deltas between them as runs.
                begin = 0
                for cut in [*(i for i, e in enumerate(events) if type(e) is not DeltaEvent), len(events)]:
                    if cut > begin:
                        self._dispatch_run(events[begin:cut], payloads[at + begin : at + cut])
                    if cut < len(events):
                        self._dispatch_one(events[cut], payloads[at + cut])
                    begin = cut + 1
            at = end

    def _dispatch_run(self, deltas: list[DeltaEvent], payloads: list[bytes]) -> None:
        targets = self._routes.get(deltas[0].stream)
        if targets is not None and len(deltas) > 1 and not self._filled:
            self._deliver_run(deltas, payloads, targets)
        else:
            for event, data in zip(deltas, payloads, strict=True):
                self._dispatch_one(event, data)

    def _dispatch_one(self, event: Event, data: bytes) -> None:
        targets = self._route(event, data)
        if targets:
            write = self._write_many
            if write is None:
                # trio: every frame goes through the client's queue and sender task.
                delta = event if type(event) is DeltaEvent else None
                for client in targets:
                    client.push_event(event.stream, delta, data)
            else:
                self._deliver(event, data, targets, write)
        if type(event) in _TERMINAL:
            self._routes.pop(event.stream, None)
            self.history.expire()

    def _deliver_run(self, deltas: list[DeltaEvent], payloads: list[bytes], targets: dict[Client, None]) -> None:
        """asyncio: consecutive deltas of one routed stream, recorded at once, one broadcast() per frame.

        Each client writes the prefix of the run its credit covers at once
        (:meth:`Client.take_run`) and queues the rest, as event by event.
        """
        self.history.record_deltas(deltas, payloads)
        if not targets:
            return
        write = self._write_many
        assert write is not None
        sizes = list(map(len, payloads))
        count = len(payloads)
        stream = deltas[0].stream
        if len(targets) == 1:
            (client,) = targets
            taken = client.take_run(sizes)
            if taken:
                conns = [client.ws]
                for data in payloads[:taken] if taken < count else payloads:
                    write(conns, data, text=True)
            if taken < count:
                client.push_deltas(stream, deltas[taken:], payloads[taken:])
            return
        takes = sorted(((client.take_run(sizes), client) for client in targets), key=_first, reverse=True)
        conns = [client.ws for _, client in takes]
        writing = len(takes)
        for index, data in enumerate(payloads):
            while writing and takes[writing - 1][0] <= index:
                writing -= 1
            if not writing:
                break
            write(conns if writing == len(conns) else conns[:writing], data, text=True)
        for taken, client in takes:
            if taken < count:
                client.push_deltas(stream, deltas[taken:], payloads[taken:])

    def _route(self, event: Event, data: bytes) -> dict[Client, None] | None:
        """Record *event* in the history; return the clients that follow its stream."""
        stream = event.stream
        history = self.history
        routes = self._routes
        if self._filled:
            upto = self._filled.get(stream)
            if upto is not None:
                if event.seq <= upto:
                    # Already held, from the engine: the followed stream comes again from its start.
                    if type(event) is StartEvent and stream not in routes:
                        routes[stream] = self._match(event)
                    return None
                del self._filled[stream]
        if type(event) is StartEvent:
            history.record(event, data)
            routes[stream] = self._match(event)
            return routes[stream]
        targets = routes.get(stream)
        if targets is not None or history.get(stream) is not None:
            history.record(event, data)
            return targets
        # A stream that started before this sink subscribed: route it by its start.
        stream_log = history.record(event, data)
        start = self._early.pop(stream, None)
        if start is None and self._bus is not None:
            start = self._bus.live_streams.get(stream)
        if start is None or is_terminal(event):
            return None
        stream_log.start = start
        routes[stream] = self._match(start)
        return routes[stream]

    @staticmethod
    def _deliver(event: Event, data: bytes, targets: dict[Client, None], write: Callable[..., None]) -> None:
        """asyncio: one broadcast() to the clients that have credit; the others queue the event."""
        size = len(data)
        now = []
        delta = event if type(event) is DeltaEvent else None
        for client in targets:
            if client.take(size):
                now.append(client.ws)
            else:
                client.push_event(event.stream, delta, data)
        if now:
            write(now, data, text=True)

    def _match(self, start: StartEvent) -> dict[Client, None]:
        matched: dict[Client, None] = {}
        for client in self._clients:
            for flt in client.subscriptions.values():
                if flt.matches(start):
                    matched[client] = None
                    break
        return matched


class _Wanted:
    """Filters, matched against a start as :meth:`Filter.matches` would, any of them.

    The usual subscription asks for one meta value (``{"user": 7}``): such
    filters are a set of wanted values per meta key, looked up once per
    start; any other filter is matched on its own.
    """

    __slots__ = ("by_meta", "others")

    def __init__(self, filters: Iterable[Filter]) -> None:
        self.by_meta: dict[str, set[str | int]] = {}
        self.others: list[Filter] = []
        for flt in filters:
            meta = flt.meta
            if meta and len(meta) == 1 and flt.streams is None and flt.models is None and flt.providers is None:
                ((key, want),) = meta.items()
                if type(want) in (str, int, bool):  # equal to a value exactly when its set holds that value
                    self.by_meta.setdefault(key, set()).add(want)
                    continue
            self.others.append(flt)

    def matches(self, start: StartEvent) -> bool:
        """Whether any of the filters lets the stream *start* begins through."""
        have = start.meta
        for key, wanted in self.by_meta.items():
            try:
                if have.get(key) in wanted:
                    return True
            except TypeError:  # an unhashable value (a list, an object) equals no string or number
                pass
        others = self.others
        return bool(others) and any(flt.matches(start) for flt in others)


def _response(status: int, reason: str, content_type: str, body: bytes) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", _CSP),
            ("Connection", "close"),
        ]
    )
    return Response(status, reason, headers, body)
